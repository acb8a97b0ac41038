"""Learning-rate rules for large-batch training (survey arXiv 2111.00856, section 3).

- :func:`scale_lr`: when the batch grows k-fold, grow the LR k-fold ("linear", Goyal et al.
  2017, for SGD) or sqrt(k)-fold ("sqrt", Krizhevsky 2014 / You et al. 2019, for Adam-type
  optimizers and LAMB), so each sample's contribution to the update stays comparable.
- :func:`warmup_lambda` / :func:`warmup_schedule`: ramp the LR linearly from near zero over
  the first steps (a large scaled LR diverges on a cold start), then hold it or decay it
  along a cosine to a floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

__all__ = ["scale_lr", "warmup_lambda", "warmup_schedule"]


def scale_lr(
    base_lr: float, base_batch: int, batch: int, rule: Literal["linear", "sqrt"] = "linear"
) -> float:
    """The LR for ``batch`` given ``base_lr`` tuned at ``base_batch``.

    ``linear``: base_lr * batch / base_batch; ``sqrt``: base_lr * sqrt(batch / base_batch).

    Raises:
        ValueError: a non-positive batch size or LR below 0, or an unknown rule.
    """
    if base_batch <= 0 or batch <= 0:
        raise ValueError(f"scale_lr: batch sizes must be > 0, got base_batch={base_batch}, "
                         f"batch={batch}.")
    if base_lr < 0:
        raise ValueError(f"scale_lr: base_lr={base_lr} must be >= 0.")
    k = batch / base_batch
    if rule == "linear":
        return base_lr * k
    if rule == "sqrt":
        return base_lr * math.sqrt(k)
    raise ValueError(f"scale_lr: rule={rule!r} is not 'linear' or 'sqrt'.")


def warmup_lambda(
    warmup_steps: int, total_steps: int | None = None, *,
    decay: Literal["constant", "cosine"] = "constant", min_factor: float = 0.0,
) -> Callable[[int], float]:
    """A multiplier of the LR per step (``LambdaLR``'s ``lr_lambda``).

    Steps ``0 .. warmup_steps-1`` give ``(step + 1) / warmup_steps`` (never 0, so the first
    step moves); then 1.0 (``constant``) or a cosine from 1.0 at the end of warm-up down to
    ``min_factor`` at ``total_steps`` and held there (``cosine``).

    Invariant: the multiplier is in (0, 1], non-decreasing during warm-up and non-increasing
    after it.

    Raises:
        ValueError: negative warm-up, cosine without ``total_steps`` > ``warmup_steps``,
            ``min_factor`` outside [0, 1], or an unknown decay.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_lambda: warmup_steps={warmup_steps} must be >= 0.")
    if not 0.0 <= min_factor <= 1.0:
        raise ValueError(f"warmup_lambda: min_factor={min_factor} must be in [0, 1].")
    if decay not in ("constant", "cosine"):
        raise ValueError(f"warmup_lambda: decay={decay!r} is not 'constant' or 'cosine'.")
    if decay == "cosine" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"warmup_lambda: decay='cosine' needs total_steps > warmup_steps "
                         f"({warmup_steps}), got {total_steps}.")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        assert total_steps is not None
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        # A cosine that reaches exactly 0 would stop training at the last step; floor at > 0.
        return max(min_factor + (1.0 - min_factor) * cos, 1e-12)

    return factor


def warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None = None, *,
    decay: Literal["constant", "cosine"] = "constant", min_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR(optimizer, warmup_lambda(...))``: call ``.step()`` after each optimizer step.

    Each group's LR becomes its initial LR times the multiplier (see :func:`warmup_lambda`).
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_lambda(warmup_steps, total_steps, decay=decay, min_factor=min_factor)
    )
