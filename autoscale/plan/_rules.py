"""Rules across a plan's fields and sections, checked in one place.

A section's ``__post_init__`` checks what involves its own fields alone (ranges, a null
that needs a 1). Every rule that ties fields together (the optimizer's kind, kernel and
state precision) or ties sections together (compression x precision, compression x
world size, as passes add them) is a function ``(plan) -> None`` registered with
:func:`plan_rule`; :class:`~autoscale.plan.Plan` runs all of them when it is built, so
a plan that constructs (from Python or from a file) satisfies every rule.
Each rule raises PlanError naming the field, the value and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from autoscale.errors import PlanError
from autoscale.kernels import adamw, adamw8bit, lamb, lars, sgd
from autoscale.plan._frozen import FrozenDict

if TYPE_CHECKING:
    from autoscale.plan._plan import OptimizerPlan, Plan

__all__ = ["OPTIMIZER_TABLE", "check_optimizer", "check_plan", "plan_rule", "rules"]

PlanRule = Callable[["Plan"], None]

# Keyed by qualified name, so that re-importing a module replaces its rules.
_RULES: dict[str, PlanRule] = {}


def plan_rule(rule: PlanRule) -> PlanRule:
    """Register ``rule`` to run on every Plan built, after the sections' own checks."""
    _RULES[f"{rule.__module__}.{rule.__qualname__}"] = rule
    return rule


def rules() -> tuple[PlanRule, ...]:
    """The registered rules, in registration order (the order they run in)."""
    return tuple(_RULES.values())


def check_plan(plan: Plan) -> None:
    """Run every registered rule on ``plan``; the first broken one raises PlanError."""
    for rule in _RULES.values():
        rule(plan)


# -- optimizer: kind x kernel x state precision ------------------------------------------

# The kernel= values of an autoscale kind are its op module's KERNELS, the list the optim
# class takes too (autoscale.optim's classes: ``kernels = <op>.KERNELS``), so a plan names
# a path exactly when it exists; 'torch' (torch.optim) is added where torch.optim has it.
OPTIMIZER_TABLE: FrozenDict[str, tuple[str, tuple[str, ...]]] = FrozenDict({
    # kind: (state precision, the kernel= values that build it)
    "adamw": ("fp32", ("torch", *adamw.KERNELS)),
    "sgd": ("fp32", ("torch", *sgd.KERNELS)),
    # autoscale.optim has no Adam: 'auto' builds torch.optim.Adam, as 'torch' does.
    "adam": ("fp32", ("torch", "auto")),
    # torch.optim has no LAMB/LARS.
    "lamb": ("fp32", lamb.KERNELS),
    "lars": ("fp32", lars.KERNELS),
    "adamw8bit": ("int8", adamw8bit.KERNELS),
})
"""Every valid (kind, state_precision, kernel) of an OptimizerPlan; anything else is refused.

A kernel listed here exists for the kind; whether it runs on this device and dtype
('triton' needs CUDA or TRITON_INTERPRET=1, 'native' the C library) is the kernel's
dispatcher's call at step time (KernelUnavailable naming the fix).
"""


def check_optimizer(optimizer: OptimizerPlan) -> None:
    """Refuse a (kind, kernel, state_precision) that OPTIMIZER_TABLE does not list.

    Used by the plan rule below and by runtime.build_optimizer, so that a plan that
    loads also builds and an OptimizerPlan built outside a Plan is held to the same table.
    """
    kind, kernel, precision = optimizer.kind, optimizer.kernel, optimizer.state_precision
    if kind not in OPTIMIZER_TABLE:
        raise PlanError(f"optimizer.kind={kind!r} is not one of {list(OPTIMIZER_TABLE)}; "
                        "pick one of those.")
    want, kernels = OPTIMIZER_TABLE[kind]
    if precision != want:
        hint = " or kind='adamw8bit'" if precision == "int8" else ""
        raise PlanError(
            f"optimizer.state_precision={precision!r} does not go with kind={kind!r}: int8 "
            f"state is kind 'adamw8bit', every other kind is fp32. Set "
            f"state_precision={want!r}{hint}."
        )
    if kernel not in kernels:
        why = (" (kernel='torch' is torch.optim, which has no such optimizer)"
               if kernel == "torch" else "")
        raise PlanError(
            f"optimizer.kernel={kernel!r} has no {kind!r} path{why}; kind={kind!r} takes "
            f"kernel in {list(kernels)}. Use kernel='auto' to let autoscale choose."
        )


@plan_rule
def optimizer_kind_kernel_precision(plan: Plan) -> None:
    """optimizer.(kind, kernel, state_precision) is a row of OPTIMIZER_TABLE."""
    check_optimizer(plan.optimizer)


# -- shard x precision -----------------------------------------------------------------
# Every strategy composes with every precision mode: FSDP2 (zero2/zero3) runs bf16 and fp16
# through its MixedPrecisionPolicy and fp16's loss scaling through ShardedGradScaler
# (passes/shard.py, Note: [fp16 under FSDP2]), so no rule ties the two sections.
