"""autoscale: make a PyTorch training job fit a memory budget and run as fast as it can.

    result = autoscale.optimize(model, example_inputs, memory_budget="16GiB", trials=30)
    loss = result.step(batch)
    result.plan.save("plan.json")
    ...
    result = autoscale.apply(autoscale.Plan.load("plan.json"), model, example_inputs)

Everything public is re-exported here; names not in ``__all__`` may change without notice.
"""

__version__ = "0.1.0"

from autoscale._api import Report, apply, optimize
from autoscale._units import parse_bytes
from autoscale.capture import BlockInfo, ModelGraph, NodeMeta, capture
from autoscale.cost import MemoryEstimate, estimate
from autoscale.errors import (
    AutoscaleError,
    CaptureError,
    InfeasibleError,
    KernelUnavailable,
    PassError,
    PlanError,
    PlanMismatchError,
    TunerError,
)
from autoscale.measure import Measurement, measure
from autoscale.plan import (
    BatchPlan,
    BlockPolicy,
    CheckpointPlan,
    CompilePlan,
    CompressPlan,
    Environment,
    Fingerprint,
    Measured,
    OptimizerPlan,
    Plan,
    PrecisionPlan,
    SchedulePlan,
    ShardPlan,
    plan_section,
)
from autoscale.runtime import Result

__all__ = [
    "AutoscaleError",
    "BatchPlan",
    "BlockInfo",
    "BlockPolicy",
    "CaptureError",
    "CheckpointPlan",
    "CompilePlan",
    "CompressPlan",
    "Environment",
    "Fingerprint",
    "InfeasibleError",
    "KernelUnavailable",
    "Measured",
    "Measurement",
    "MemoryEstimate",
    "ModelGraph",
    "NodeMeta",
    "OptimizerPlan",
    "PassError",
    "Plan",
    "PlanError",
    "PlanMismatchError",
    "PrecisionPlan",
    "Report",
    "Result",
    "SchedulePlan",
    "ShardPlan",
    "TunerError",
    "__version__",
    "apply",
    "capture",
    "estimate",
    "measure",
    "optimize",
    "parse_bytes",
    "plan_section",
]
