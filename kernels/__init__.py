"""Fused optimizer and quantization kernels.

Triton on CUDA; on CPU, the fastest correct torch path, chosen by measurement.
"""
