"""SGD on autoscale's multi-tensor kernels; a drop-in for torch.optim.SGD."""

from __future__ import annotations

from typing import Any

import torch

from autoscale.kernels import sgd as _op
from autoscale.kernels.sgd import sgd

from ._base import FusedOptimizer, ParamsT, _check_flags

__all__ = ["SGD"]


class SGD(FusedOptimizer):
    """SGD with momentum, dampening, Nesterov and L2 weight decay, as torch.optim.SGD.

    Invariant: with fp32 params each step equals torch.optim.SGD's up to fp32 rounding order
    (bit-identical with ``kernel="reference"``). State per param, only when momentum != 0:
    ``momentum_buffer`` (fp32), allocated at the param's first step, torch's key name.

    Args:
        kernel: one of :attr:`kernels` ("auto", "triton", "torch_fused", "native",
            "reference"), and the flags, as for :class:`autoscale.optim.AdamW`.

    Raises:
        ValueError: bad hyper-parameters (torch's rules), or differentiable=True.
    """

    kernels = _op.KERNELS

    def __init__(
        self, params: ParamsT, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
        dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
        maximize: bool = False, foreach: bool | None = None, differentiable: bool = False,
        fused: bool | None = None, kernel: str = "auto",
    ) -> None:
        _check_flags("SGD", differentiable=differentiable)
        if float(lr) < 0.0:
            raise ValueError(f"SGD: invalid lr={lr}; must be >= 0.")
        if momentum < 0.0:
            raise ValueError(f"SGD: invalid momentum={momentum}; must be >= 0.")
        if weight_decay < 0.0:
            raise ValueError(f"SGD: invalid weight_decay={weight_decay}; must be >= 0.")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov=True requires momentum > 0 and dampening = 0.")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=False,
            fused=fused,
        )
        super().__init__(params, defaults, kernel=kernel)

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        # Buffers are allocated lazily per step in _step_bucket (torch keeps none when
        # momentum == 0); nothing to do, but mark nothing either so state stays torch-shaped.
        return

    def _step_bucket(self, group: dict[str, Any], params: list[torch.Tensor], kernel: str) -> str:
        momentum = group["momentum"]
        hyper = dict(lr=float(group["lr"]), momentum=momentum, dampening=group["dampening"],
                     weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                     maximize=group["maximize"], kernel=kernel)
        if momentum == 0:
            return sgd(params, [p.grad for p in params], [], first_step=False, **hyper)
        name = kernel
        for part, first in self._momentum_parts(params):
            name = sgd(part, [p.grad for p in part],
                       [self.state[p]["momentum_buffer"] for p in part], first_step=first,
                       **hyper)
        return name
