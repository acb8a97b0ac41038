"""Optimizers backed by autoscale's fused kernels (drop-in for torch.optim)."""

from ._adamw import AdamW
from ._lamb import LAMB
from ._lars import LARS
from ._schedule import scale_lr, warmup_lambda, warmup_schedule
from ._sgd import SGD

# 8-bit: see _adamw8bit

__all__ = ["LAMB", "LARS", "SGD", "AdamW", "scale_lr", "warmup_lambda", "warmup_schedule"]
