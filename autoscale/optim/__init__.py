"""Optimizers backed by autoscale's fused kernels (drop-in for torch.optim)."""

from ._adamw import AdamW
from ._adamw8bit import AdamW8bit
from ._lamb import LAMB
from ._lars import LARS
from ._schedule import scale_lr, warmup_lambda, warmup_schedule
from ._sgd import SGD

__all__ = [
    "LAMB",
    "LARS",
    "SGD",
    "AdamW",
    "AdamW8bit",
    "scale_lr",
    "warmup_lambda",
    "warmup_schedule",
]
