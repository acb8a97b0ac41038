"""Fused optimizer and quantization kernels: Triton on CUDA, the fastest correct torch path on CPU."""
