"""A plan's memory and time, predicted on fake tensors without running it.

The tuner asks it first, so that a plan that cannot fit is rejected before a worker
spends a measurement on it. Each pass reports its own contribution (passes/base.py).
"""

from autoscale.cost._cost import MemoryEstimate, estimate
from autoscale.cost._rates import MachineRates, machine_rates
from autoscale.cost._time import StepTimeEstimate, estimate_step_time, refine

__all__ = ["MachineRates", "MemoryEstimate", "StepTimeEstimate", "estimate",
           "estimate_step_time", "machine_rates", "refine"]
