"""Optimizers backed by autoscale's fused kernels (drop-in for torch.optim)."""
