"""Building the optimizer a plan names."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from autoscale.errors import PlanError
from autoscale.plan._plan import OptimizerPlan

__all__ = ["OPTIMIZER_KINDS", "build_optimizer", "optimizer_plan"]

OPTIMIZER_KINDS: tuple[str, ...] = ("adamw", "adam", "sgd", "lamb", "lars", "adamw8bit")

_TORCH = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}
_AUTOSCALE = {"adamw": "AdamW", "sgd": "SGD", "lamb": "LAMB", "lars": "LARS",
              "adamw8bit": "AdamW8bit"}
_DEFAULT_LR = {"sgd": 0.01, "lars": 0.01}


def optimizer_plan(name: str, kwargs: dict[str, Any] | None, *, kernel: str = "auto"
                   ) -> OptimizerPlan:
    """Validate a user's optimizer name and kwargs into an OptimizerPlan."""
    if not isinstance(name, str) or name.lower() not in OPTIMIZER_KINDS:
        raise PlanError(
            f"optimizer={name!r} is not known; choose one of {list(OPTIMIZER_KINDS)}."
        )
    name = name.lower()
    kwargs = dict(kwargs or {})
    if name in _DEFAULT_LR:
        kwargs.setdefault("lr", _DEFAULT_LR[name])
    for key, value in kwargs.items():
        if isinstance(value, tuple):
            kwargs[key] = list(value)
        elif not isinstance(value, (int, float, bool, str, list, type(None))):
            raise PlanError(f"optimizer_kwargs[{key!r}]={value!r} cannot be stored in a plan; "
                            "use numbers, booleans, strings or lists.")
    if name == "adam" and kernel == "auto":
        kernel = "torch"
    return OptimizerPlan(kind=name, kernel=kernel,
                         state_precision="int8" if name == "adamw8bit" else "fp32",
                         kwargs=kwargs)


def build_optimizer(plan: OptimizerPlan, params: Iterable[torch.nn.Parameter]
                    ) -> torch.optim.Optimizer:
    """Construct the optimizer ``plan`` names over ``params``.

    kernel='torch' uses torch.optim; any other kernel uses autoscale.optim's class with
    that kernel choice ('auto' lets its dispatcher pick by measurement).
    """
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in plan.kwargs.items()}
    params = [p for p in params if p.requires_grad]
    try:
        if plan.kernel == "torch":
            return getattr(torch.optim, _TORCH[plan.kind])(params, **kwargs)
        import autoscale.optim as optim

        cls = getattr(optim, _AUTOSCALE[plan.kind])
        return cls(params, kernel=plan.kernel, **kwargs)
    except TypeError as err:
        raise PlanError(f"optimizer {plan.kind!r} does not take these arguments "
                        f"{sorted(kwargs)}: {err}. Fix optimizer_kwargs.") from err
