"""Building the optimizer a plan names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from autoscale.errors import PlanError
from autoscale.passes.shard import shard_optimizer
from autoscale.plan._plan import OptimizerPlan
from autoscale.plan._rules import OPTIMIZER_TABLE, check_optimizer
from autoscale.plan._shard import ShardPlan

__all__ = ["OPTIMIZER_KINDS", "build_optimizer", "optimizer_plan"]

OPTIMIZER_KINDS: tuple[str, ...] = tuple(OPTIMIZER_TABLE)

_TORCH = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}
_AUTOSCALE = {"adamw": "AdamW", "sgd": "SGD", "lamb": "LAMB", "lars": "LARS",
              "adamw8bit": "AdamW8bit"}
_DEFAULT_LR = {"sgd": 0.01, "lars": 0.01}


def optimizer_plan(name: str, kwargs: Mapping[str, Any] | None, *, kernel: str = "auto"
                   ) -> OptimizerPlan:
    """Validate a user's optimizer name and kwargs into an OptimizerPlan.

    SGD and LARS get lr=0.01 unless given (neither torch nor autoscale has a default lr
    for them that suits every model); 'adam' with kernel 'auto' is written as 'torch',
    the one path it has.
    """
    if not isinstance(name, str) or name.lower() not in OPTIMIZER_KINDS:
        raise PlanError(
            f"optimizer={name!r} is not known; choose one of {list(OPTIMIZER_KINDS)}."
        )
    name = name.lower()
    kwargs = dict(kwargs or {})
    if name in _DEFAULT_LR:
        kwargs.setdefault("lr", _DEFAULT_LR[name])
    for key, value in kwargs.items():
        if not isinstance(value, (int, float, bool, str, list, tuple, type(None))):
            raise PlanError(f"optimizer_kwargs[{key!r}]={value!r} cannot be stored in a plan; "
                            "use numbers, booleans, strings or lists.")
    if name == "adam" and kernel == "auto":
        kernel = "torch"
    return OptimizerPlan(kind=name, kernel=kernel,  # type: ignore[arg-type]
                         state_precision=OPTIMIZER_TABLE[name][0],  # type: ignore[arg-type]
                         kwargs=kwargs)


def build_optimizer(plan: OptimizerPlan, params: Iterable[torch.nn.Parameter], *,
                    shard: ShardPlan | None = None, process_group: Any = None
                    ) -> torch.optim.Optimizer:
    """Construct the optimizer ``plan`` names over ``params``.

    kernel='torch' uses torch.optim; any other kernel uses autoscale.optim's class with
    that kernel choice ('auto' lets its dispatcher pick by measurement), except kind
    'adam', which autoscale.optim lacks: 'auto' builds torch.optim.Adam. Under a
    ``shard`` plan of strategy zero1 that optimizer is built sharded over
    ``process_group`` (passes/shard.py's ``shard_optimizer``: a ZeroRedundancyOptimizer
    around the class).

    Raises PlanError (naming field, value and fix) for a combination outside
    autoscale.plan._rules.OPTIMIZER_TABLE, the same table a Plan is checked against,
    so every plan that loads builds; and for kwargs the optimizer does not take.
    """
    check_optimizer(plan)
    # Frozen plan values: tuples already (betas=(0.9, 0.999)); nested mappings, which no
    # optimizer here takes, are handed over as they are.
    kwargs = dict(plan.kwargs)
    params = [p for p in params if p.requires_grad]
    if plan.kernel == "torch" or plan.kind not in _AUTOSCALE:
        cls: type[torch.optim.Optimizer] = getattr(torch.optim, _TORCH[plan.kind])
    else:
        import autoscale.optim as optim

        cls = getattr(optim, _AUTOSCALE[plan.kind])
        kwargs["kernel"] = plan.kernel
    try:
        return shard_optimizer(cls, params, plan=shard or ShardPlan(),
                               process_group=process_group, **kwargs)
    except TypeError as err:
        given = sorted(k for k in kwargs if k != "kernel")
        raise PlanError(f"optimizer {plan.kind!r} does not take these arguments "
                        f"{given}: {err}. Fix optimizer_kwargs.") from err
