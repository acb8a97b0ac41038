"""Plan + model -> Result: the pass pipeline, the optimizer, the training step.

The runtime copies the user's model, applies the plan's passes in their declared order
(passes/base.py, ``PIPELINE``), builds the optimizer the plan names and runs
``Result.step(batch)`` with the plan's micro-batching, accumulation and loss scaling.
"""

from autoscale.runtime._result import Result, build_result

__all__ = ["Result", "build_result"]
