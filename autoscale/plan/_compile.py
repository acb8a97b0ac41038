"""The ``compile`` plan section: whether the planned model's forward runs under torch.compile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from autoscale.errors import PlanError
from autoscale.plan._plan import plan_section
from autoscale.plan._rules import plan_rule

if TYPE_CHECKING:
    from autoscale.plan._plan import Plan

__all__ = ["COMPILE_MODES", "SOLVER_MODES", "CompilePlan"]

COMPILE_MODES = ("off", "inductor", "inductor-eager-rng", "inductor-budget")

SOLVER_MODES = ("inductor", "inductor-eager-rng")
"""The compiled modes whose checkpointing is the plan's ``checkpoint`` section (the solver's)."""


@plan_section("compile", omit_default=True)
@dataclass(frozen=True, slots=True)
class CompilePlan:
    """torch.compile of the planned model (passes/compile.py applies it, last of the passes).

    The defaults (mode 'off') leave the model eager, so plan files written before this
    section existed load and mean 'off'; at its defaults the section is left out of the
    plan's JSON and digest (``omit_default``), which therefore stay unchanged.

    Invariants: ``activation_memory_budget`` is set exactly when ``mode`` is
    'inductor-budget', and then lies in (0, 1]; so one behaviour has one plan (and one
    digest).
    """

    mode: Literal["off", "inductor", "inductor-eager-rng", "inductor-budget"] = "off"
    """off: eager. inductor: ``torch.compile(fullgraph=True)`` with the inductor backend and
    torch's default partitioner (``activation_memory_budget=1.0``); blocks are checkpointed
    as the plan's ``checkpoint`` section says (torch.utils.checkpoint under compile).
    inductor-eager-rng: the same with the random ops (dropout) run by eager's kernels on
    torch's generator inside the compiled graph (inductor's ``fallback_random``): faster
    than inductor's own random numbers on CPU, and the same masks as the eager model's
    (Note: [eager RNG in compiled code] in passes/compile.py); a checkpoint policy that
    saves kind 'dropout' keeps its bool mask and recomputes the rest (Note: [a dropout's
    mask is what a checkpoint keeps] in passes/_dropout_mask.py). inductor-budget: the same
    with inductor's own activation-memory budget, its min-cut partitioner choosing what to
    recompute (``torch._functorch.config.activation_memory_budget``)."""
    activation_memory_budget: float | None = None
    """inductor-budget only: the fraction in (0, 1] of the default strategy's activation
    memory that the compiled region may save (1.0: torch's default; lower recomputes more).
    Null for the other modes."""

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise PlanError(f"compile.mode={self.mode!r} is not one of {list(COMPILE_MODES)}; "
                            "pick one of those ('off' runs eager).")
        budget = self.activation_memory_budget
        if self.mode != "inductor-budget":
            if budget is not None:
                raise PlanError(
                    f"compile.activation_memory_budget={budget!r} is read by mode "
                    f"'inductor-budget' only, got mode={self.mode!r}; remove "
                    "activation_memory_budget or set mode='inductor-budget'.")
            return
        if budget is None:
            raise PlanError("compile.mode='inductor-budget' needs compile.activation_memory_"
                            "budget, a fraction in (0, 1], e.g. 0.5; or use mode='inductor'.")
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not (
                0 < budget <= 1):
            raise PlanError(
                f"compile.activation_memory_budget must lie in (0, 1], got {budget!r}; e.g. "
                "0.5 saves half the activations of torch's default partition (1.0).")
        object.__setattr__(self, "activation_memory_budget", float(budget))

    @property
    def active(self) -> bool:
        """Whether the model is compiled (mode is not 'off')."""
        return self.mode != "off"

    @property
    def eager_rng(self) -> bool:
        """Whether random ops run as eager's kernels in the compiled graph."""
        return self.mode == "inductor-eager-rng"

    @property
    def budget(self) -> float:
        """The ``activation_memory_budget`` the compilation runs under: the plan's for
        inductor-budget, torch's default 1.0 for the other compiled modes."""
        return self.activation_memory_budget if self.activation_memory_budget is not None else 1.0


@plan_rule
def compile_one_process(plan: Plan) -> None:
    """torch.compile is refused under data parallelism (shard.strategy is not 'none').

    See passes/compile.py, Note: [compile and sharding]: DDP's and FSDP2's hooks around a
    compiled root forward are not checked to keep gradients equal here yet.
    """
    mode, strategy = plan.compile.mode, plan.shard.strategy
    if mode != "off" and strategy != "none":
        raise PlanError(
            f"compile.mode={mode!r} with shard.strategy={strategy!r} is not supported: "
            "autoscale compiles one-process plans only (DDP/FSDP2 with torch.compile is not "
            "checked yet). Set compile.mode='off', or shard.strategy='none'.")
