"""AdamW on autoscale's multi-tensor kernels; a drop-in for torch.optim.AdamW."""

from __future__ import annotations

from typing import Any

import torch

from autoscale.kernels import adamw as _op
from autoscale.kernels.adamw import adamw

from ._base import FusedOptimizer, ParamsT, _check_flags, adam_state

__all__ = ["AdamW"]


class AdamW(FusedOptimizer):
    """AdamW with decoupled weight decay; same arguments and defaults as torch.optim.AdamW.

    Invariant: with fp32 params each step equals torch.optim.AdamW's up to fp32 rounding
    order (bit-identical with ``kernel="reference"``, which is torch's foreach=False order).
    State per param: ``step`` (fp32 CPU scalar), ``exp_avg``, ``exp_avg_sq`` (fp32, also for
    bf16 params), the layout of torch.optim.AdamW, so its state dicts load both ways.

    Args:
        kernel: one of :attr:`kernels`: "auto" (Triton on CUDA, fastest measured path on
            CPU), "triton", "torch_fused", "native" or "reference"; any other name is
            refused here. ``fused=True`` and ``foreach=True`` mean "triton" on CUDA and
            "torch_fused" elsewhere (there is no foreach AdamW: ``kernels.adamw``).

    Raises:
        ValueError: amsgrad, capturable or differentiable set, or a bad hyper-parameter.
    """

    kernels = _op.KERNELS

    def __init__(
        self, params: ParamsT, lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
        foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
        fused: bool | None = None, kernel: str = "auto",
    ) -> None:
        if amsgrad:
            raise ValueError("AdamW(amsgrad=True) is not supported by autoscale's kernels; use "
                             "torch.optim.AdamW(amsgrad=True) or amsgrad=False.")
        _check_flags("AdamW", capturable=capturable, differentiable=differentiable)
        if not float(lr) >= 0.0:
            raise ValueError(f"AdamW: invalid lr={lr}; must be >= 0.")
        if not eps >= 0.0:
            raise ValueError(f"AdamW: invalid eps={eps}; must be >= 0.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: invalid betas={betas}; each must be in [0, 1).")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: invalid weight_decay={weight_decay}; must be >= 0.")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False,
            maximize=maximize, foreach=foreach, capturable=False, differentiable=False,
            fused=fused, decoupled_weight_decay=True,
        )
        super().__init__(params, defaults, kernel=kernel)

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        self.state[p].update(adam_state(p))

    def _step_bucket(self, group: dict[str, Any], params: list[torch.Tensor], kernel: str) -> str:
        if group.get("amsgrad"):
            raise ValueError("AdamW: a loaded param group has amsgrad=True, which autoscale does "
                             "not support; load it into torch.optim.AdamW instead.")
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        return adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], maximize=group["maximize"], kernel=kernel,
        )
