"""Mixed precision by autocast around the model's forward."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from autoscale.capture import ModelGraph
from autoscale.errors import PassError
from autoscale.passes.base import MemoryTerms, PassContext
from autoscale.plan import PrecisionPlan

__all__ = ["PrecisionPass", "autocast_forward"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_forward(model: nn.Module, *, plan: PrecisionPlan, device_type: str) -> nn.Module:
    """Run ``model``'s forward under autocast to ``plan.mode`` (bf16/fp16); fp32 is a no-op.

    Rewrites ``model`` in place (the runtime passes its own copy) and returns it.

    Invariant: parameters, gradients and optimizer state keep their dtype (fp32 master
    weights); only matmul-like ops inside forward run in the low precision, so the loss
    differs from fp32 by rounding only (tests bound it). Loss scaling for fp16 is the
    runtime's job (it owns backward).
    """
    if plan.mode == "fp32":
        return model
    if device_type == "cpu" and plan.mode == "fp16" and not _cpu_supports_fp16():
        raise PassError("precision.mode='fp16' is not supported by autocast on this CPU "
                        "build of torch; use 'bf16' or 'fp32'.")
    # A partial of the bound method (not a closure) so that deepcopy of the rewritten
    # model rebinds to the copy instead of calling the original's forward.
    model.forward = functools.partial(_autocast_call, model.forward, device_type,
                                      _DTYPES[plan.mode])
    return model


def _autocast_call(forward: Any, device_type: str, dtype: torch.dtype, *args: Any,
                   **kwargs: Any) -> Any:
    with torch.autocast(device_type=device_type, dtype=dtype):
        return forward(*args, **kwargs)


def _cpu_supports_fp16() -> bool:
    return torch.amp.autocast_mode.is_autocast_available("cpu")


# Autocast stores most forward outputs at 2 bytes instead of 4; norms, softmax and the
# loss stay fp32, hence not 0.5 (fitted on examples/gpt.py and tests' tiny GPT).
_ACTIVATION_FACTOR = {"fp32": 1.0, "bf16": 0.6, "fp16": 0.6}


class PrecisionPass:
    """The pipeline entry for :func:`autocast_forward` (plan section ``precision``)."""

    section = "precision"
    invariant = ("parameters, gradients and optimizer state keep their dtype; the loss "
                 "differs from fp32 by low-precision rounding only")

    def enabled(self, section: PrecisionPlan) -> bool:
        return section.mode != "fp32"

    def apply(self, model: nn.Module, section: PrecisionPlan, ctx: PassContext) -> nn.Module:
        return autocast_forward(model, plan=section, device_type=ctx.device.type)

    def memory(self, section: PrecisionPlan, graph: ModelGraph,
               terms: MemoryTerms) -> MemoryTerms:
        """Low-precision activations, plus autocast's cached low-precision weight copy
        (half the fp32 parameters) among the temporaries."""
        if section.mode == "fp32":
            return terms
        factor = _ACTIVATION_FACTOR[section.mode]
        return terms.replace(activation_factor=terms.activation_factor * factor,
                             temporaries=int(terms.temporaries * factor)
                             + terms.parameters // 2)
