"""The exceptions autoscale raises.

One root, :class:`AutoscaleError`, so a caller can catch everything autoscale refuses
with one ``except``; the subclasses say which part refused. Each message names what is
wrong (field, value) and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AutoscaleError",
    "CaptureError",
    "InfeasibleError",
    "KernelUnavailable",
    "PassError",
    "PlanError",
    "PlanMismatchError",
    "TunerError",
]


class AutoscaleError(Exception):
    """Base class of every error autoscale raises on purpose."""


class CaptureError(AutoscaleError):
    """The model could not be captured, or the example inputs do not fit the model."""


class PlanError(AutoscaleError, ValueError):
    """A plan, or a plan file, holds a bad, unknown or missing field."""


class PlanMismatchError(PlanError):
    """A plan was made for a different model than the one it is applied to."""


class PassError(AutoscaleError):
    """A rewrite pass cannot be applied with the given configuration."""


class KernelUnavailable(AutoscaleError):
    """A kernel was asked for on a device or dtype it does not support."""


class TunerError(AutoscaleError):
    """The search could not produce a plan (bad budget, nothing fits, bad storage)."""


class InfeasibleError(TunerError):
    """No plan in the search space fits the memory budget."""
