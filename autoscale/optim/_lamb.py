"""LAMB (layer-wise adaptive moments) on autoscale's multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch

from autoscale.kernels import lamb as _op
from autoscale.kernels.lamb import lamb

from ._base import FusedOptimizer, ParamsT, adam_state, excluded

__all__ = ["LAMB"]


class LAMB(FusedOptimizer):
    """LAMB (You et al. 2019): Adam moments, then a per-tensor trust ratio ||p|| / ||u||.

    Maths: :mod:`autoscale.kernels.lamb`. Param-group keys besides torch's: ``exclude_1d``
    (default True: 1-D tensors such as biases and norm weights get no trust ratio and no
    weight decay), ``adapt`` (default True; False excludes the whole group),
    ``bias_correction`` (default True). State per param as AdamW: ``step``, ``exp_avg``,
    ``exp_avg_sq`` (fp32).

    Args:
        kernel: one of :attr:`kernels`: "auto" (Triton on CUDA, the fastest measured path
            on CPU), "triton", "foreach", "native" or "reference".
    """

    kernels = _op.KERNELS

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6, weight_decay: float = 1e-2, *, bias_correction: bool = True,
        exclude_1d: bool = True, adapt: bool = True, kernel: str = "auto",
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"LAMB: lr={lr}, eps={eps}, weight_decay={weight_decay} must be >= 0.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LAMB: invalid betas={betas}; each must be in [0, 1).")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, exclude_1d=exclude_1d, adapt=adapt)
        super().__init__(params, defaults, kernel=kernel)

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        self.state[p].update(adam_state(p))

    def _step_bucket(self, group: dict[str, Any], params: list[torch.Tensor], kernel: str) -> str:
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        return lamb(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
            [excluded(group, p) for p in params], lr=float(group["lr"]), beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            bias_correction=group["bias_correction"], kernel=kernel,
        )
