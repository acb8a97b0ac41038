"""The Plan: what the tuner writes and the runtime reads.

Frozen sections (one per pass), JSON with a schema version, the model fingerprint and
the environment it was measured on; one validation place for cross-field rules
(``_rules``: functions registered with ``plan_rule``, run whenever a Plan is built).
Immutable all the way down (``FrozenDict``, tuples), so it pickles, deep-copies and
round-trips through JSON unchanged. A plan file reproduces a run.
"""

from autoscale.plan._compile import COMPILE_MODES, SOLVER_MODES, CompilePlan
from autoscale.plan._compress import CompressPlan
from autoscale.plan._frozen import FrozenDict
from autoscale.plan._plan import (
    SCHEMA_VERSION,
    BatchPlan,
    BlockPolicy,
    CheckpointPlan,
    Environment,
    Fingerprint,
    Measured,
    OpKind,
    OptimizerPlan,
    Plan,
    PrecisionPlan,
    SchedulePlan,
    plan_section,
)
from autoscale.plan._rules import OPTIMIZER_TABLE, plan_rule
from autoscale.plan._shard import ShardPlan

__all__ = [
    "COMPILE_MODES",
    "OPTIMIZER_TABLE",
    "SCHEMA_VERSION",
    "SOLVER_MODES",
    "BatchPlan",
    "BlockPolicy",
    "CheckpointPlan",
    "CompilePlan",
    "CompressPlan",
    "Environment",
    "Fingerprint",
    "FrozenDict",
    "Measured",
    "OpKind",
    "OptimizerPlan",
    "Plan",
    "PrecisionPlan",
    "SchedulePlan",
    "ShardPlan",
    "plan_rule",
    "plan_section",
]
