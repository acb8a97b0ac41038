"""The Plan: what the tuner writes and the runtime reads.

Frozen sections (one per pass), JSON with a schema version, the model fingerprint and
the environment it was measured on; one validation place for cross-field rules
(``_plan.Plan.__post_init__``). A plan file reproduces a run.
"""

from autoscale.plan._plan import (
    SCHEMA_VERSION,
    BatchPlan,
    CheckpointPlan,
    Environment,
    Fingerprint,
    Measured,
    OptimizerPlan,
    Plan,
    PrecisionPlan,
    SchedulePlan,
    plan_section,
)

__all__ = [
    "SCHEMA_VERSION",
    "BatchPlan",
    "CheckpointPlan",
    "Environment",
    "Fingerprint",
    "Measured",
    "OptimizerPlan",
    "Plan",
    "PrecisionPlan",
    "SchedulePlan",
    "plan_section",
]
