"""LARS (layer-wise adaptive rate scaling) on autoscale's multi-tensor kernels."""

from __future__ import annotations

from typing import Any

import torch

from autoscale.kernels import lars as _op
from autoscale.kernels.lars import lars

from ._base import FusedOptimizer, ParamsT, excluded

__all__ = ["LARS"]


class LARS(FusedOptimizer):
    """LARS (You et al. 2017): SGD with momentum on a per-tensor trust-ratio-scaled step.

    Maths: :mod:`autoscale.kernels.lars`. Arguments shared with torch.optim.SGD keep its
    names; ``eta`` is the trust coefficient. Param-group keys ``exclude_1d`` (default True:
    1-D tensors get no trust ratio and no weight decay) and ``adapt`` (default True). State
    per param when momentum != 0: ``momentum_buffer`` (fp32).

    Args:
        kernel: one of :attr:`kernels`: "auto", "triton", "foreach", "native" or
            "reference".
    """

    kernels = _op.KERNELS

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, momentum: float = 0.9, dampening: float = 0.0,
        weight_decay: float = 0.0, nesterov: bool = False, *, eta: float = 1e-3,
        eps: float = 1e-8, exclude_1d: bool = True, adapt: bool = True, kernel: str = "auto",
    ) -> None:
        if lr < 0.0 or momentum < 0.0 or weight_decay < 0.0 or eta <= 0.0:
            raise ValueError(f"LARS: lr={lr}, momentum={momentum}, weight_decay={weight_decay} "
                             f"must be >= 0 and eta={eta} > 0.")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("LARS: nesterov=True requires momentum > 0 and dampening = 0.")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eta=eta, eps=eps, exclude_1d=exclude_1d, adapt=adapt)
        super().__init__(params, defaults, kernel=kernel)

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        return  # buffers are created at a param's first momentum step, as in SGD

    def _step_bucket(self, group: dict[str, Any], params: list[torch.Tensor], kernel: str) -> str:
        momentum = group["momentum"]
        hyper = dict(lr=float(group["lr"]), momentum=momentum, dampening=group["dampening"],
                     weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                     eta=group["eta"], eps=group["eps"], kernel=kernel)
        if momentum == 0:
            return lars(params, [p.grad for p in params], [],
                        [excluded(group, p) for p in params], first_step=False, **hyper)
        name = kernel
        for part, first in self._momentum_parts(params):
            name = lars(part, [p.grad for p in part],
                        [self.state[p]["momentum_buffer"] for p in part],
                        [excluded(group, p) for p in part], first_step=first, **hyper)
        return name
