"""The ``compress`` plan section: how data-parallel gradient communication is compressed."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from autoscale.errors import PlanError
from autoscale.kernels import quant
from autoscale.plan._plan import plan_section
from autoscale.plan._rules import plan_rule

if TYPE_CHECKING:
    from autoscale.plan._plan import Plan

__all__ = ["COMPRESS_METHODS", "INT8_BLOCK", "CompressPlan"]

COMPRESS_METHODS = ("none", "bf16", "fp16", "int8", "topk", "powersgd")

#: The block size of kernels/quant.py's block-wise int8 quantization (its default).
INT8_BLOCK: int = inspect.signature(quant.quantize_with_feedback).parameters["block_size"].default

_TOPK_RATIO = 0.01
_POWERSGD_RANK = 1


@plan_section("compress", omit_default=True)
@dataclass(frozen=True, slots=True)
class CompressPlan:
    """Compressed gradient communication between data-parallel ranks (passes/compress.py).

    Under DDP (shard.strategy ddp/zero1) a comm hook replaces the bucket all-reduce; under
    FSDP2 (zero2/zero3) a custom reduce-scatter replaces each unit's. The defaults (method
    'none') switch it off, and at its defaults the section is left out of the plan's JSON
    and digest (``omit_default``), so plan files from before the section load unchanged.

    Invariants: a knob is set away from its default only for the method that reads it
    (``topk_ratio`` for topk, ``powersgd_rank`` for powersgd, ``int8_block`` for int8), and
    ``error_feedback`` is False only for int8/topk, so one behaviour has one plan (and one
    digest). Rules across sections (a compressor needs ranks to talk to; PowerSGD refuses
    fp16 loss scaling) are the ``@plan_rule`` functions below.
    """

    method: Literal["none", "bf16", "fp16", "int8", "topk", "powersgd"] = "none"
    """none: uncompressed all-reduce / reduce-scatter. bf16, fp16: the gradients travel cast
    to 16 bits (2x fewer bytes; no residual: the rounding is relative, ~2**-8 / 2**-11).
    int8: block-wise int8 with one fp32 scale per ``int8_block`` elements (~4x fewer).
    topk: each rank sends the ``topk_ratio`` fraction of entries of largest magnitude as
    (value, int32 index) pairs (1 / (2 * topk_ratio) fewer bytes). powersgd:
    rank-``powersgd_rank`` factors P, Q of every gradient matrix, all-reduced: under DDP
    torch's PowerSGD hook (its first 2 steps all-reduce uncompressed while DDP settles its
    buckets), under FSDP2 each unit's reduce-scatter (passes/_powersgd_fsdp.py; from the
    first step)."""
    error_feedback: bool = True
    """int8/topk: carry what compression dropped into the next step's gradient (a residual
    the size of the gradient each rank sends: the whole model's, under DDP and FSDP2 alike).
    False only for int8/topk: bf16/fp16 carry no residual and PowerSGD always keeps its own."""
    topk_ratio: float = _TOPK_RATIO
    """topk: the fraction of each bucket's (DDP) or each destination chunk's (FSDP2) entries
    sent per step, in (0, 1)."""
    powersgd_rank: int = _POWERSGD_RANK
    """powersgd: the rank of the low-rank approximation of each gradient matrix (>= 1);
    matrices it would not shrink 2x are all-reduced whole, as torch's hook does."""
    int8_block: int = INT8_BLOCK
    """int8: elements per fp32 scale (a power of two: the Triton kernel's block); the
    scales cost 4 / int8_block bytes per element."""

    def __post_init__(self) -> None:
        if self.method not in COMPRESS_METHODS:
            raise PlanError(f"compress.method={self.method!r} is not one of "
                            f"{list(COMPRESS_METHODS)}; pick one of those.")
        ratio = self.topk_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
            raise PlanError(f"compress.topk_ratio must lie in (0, 1), got {ratio!r}; e.g. "
                            "0.01 sends 1% of the entries.")
        rank = self.powersgd_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise PlanError(f"compress.powersgd_rank must be an integer >= 1, got {rank!r}.")
        block = self.int8_block
        if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block & (
                block - 1):
            raise PlanError(f"compress.int8_block must be a power of two >= 2, got {block!r}; "
                            f"{INT8_BLOCK} is kernels/quant.py's default.")
        self._check_knobs_belong()

    def _check_knobs_belong(self) -> None:
        m = self.method
        for name, default, owner in (("topk_ratio", _TOPK_RATIO, "topk"),
                                     ("powersgd_rank", _POWERSGD_RANK, "powersgd"),
                                     ("int8_block", INT8_BLOCK, "int8")):
            if getattr(self, name) != default and m != owner:
                raise PlanError(f"compress.{name} is read by method {owner!r} only, got "
                                f"method={m!r}; remove {name} or set method={owner!r}.")
        if not self.error_feedback and m not in ("int8", "topk"):
            why = ("PowerSGD always keeps its error feedback" if m == "powersgd"
                   else f"method {m!r} has no residual to feed back")
            raise PlanError(f"compress.error_feedback=false is for methods 'int8' and 'topk' "
                            f"only ({why}); remove error_feedback, or pick int8/topk.")

    @property
    def active(self) -> bool:
        """Whether any compression runs (method is not 'none')."""
        return self.method != "none"

    @property
    def keeps_residual(self) -> bool:
        """int8/topk with error feedback, and powersgd: a gradient-sized residual per rank."""
        return self.method == "powersgd" or (self.method in ("int8", "topk")
                                             and self.error_feedback)


@plan_rule
def compress_needs_ranks(plan: Plan) -> None:
    """A compressor needs data-parallel ranks to talk to (shard.strategy is not 'none')."""
    method = plan.compress.method
    if method != "none" and plan.shard.strategy == "none":
        raise PlanError(
            f"compress.method={method!r} asks for compression at world size 1 "
            "(shard.strategy='none'): one process sends no gradients. Set shard.strategy to "
            "'ddp', 'zero1', 'zero2' or 'zero3' with shard.world_size >= 2 (the job under "
            "torchrun --nproc-per-node N), or compress.method='none'."
        )


@plan_rule
def compress_powersgd_fp16(plan: Plan) -> None:
    """PowerSGD with fp16 loss scaling is refused: an overflowed step poisons its residual.

    torch's PowerSGD adds its error-feedback residual to every gradient and keeps
    ``input - decompressed`` as the next one, with no check for inf/NaN: one overflowed
    (skipped) GradScaler step leaves NaN in the residual for every later step.
    """
    if plan.compress.method == "powersgd" and plan.precision.mode == "fp16":
        raise PlanError(
            "compress.method='powersgd' with precision.mode='fp16' is not supported: an "
            "overflowed loss-scaled step would leave NaN in PowerSGD's residual for good. Use "
            "precision.mode='bf16' (no loss scaling), or compress.method 'int8'/'topk' (their "
            "residual skips non-finite steps)."
        )
