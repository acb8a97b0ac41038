"""Full activation checkpointing of whole blocks."""

from __future__ import annotations

import functools
from typing import Any

import torch.utils.checkpoint
from torch import nn

from autoscale.capture import ModelGraph
from autoscale.errors import PassError
from autoscale.passes.base import MemoryTerms, PassContext
from autoscale.plan import CheckpointPlan

__all__ = ["CheckpointPass", "checkpoint_blocks"]

_MARK = "_autoscale_checkpointed"


def checkpoint_blocks(model: nn.Module, *, plan: CheckpointPlan) -> nn.Module:
    """Recompute each block in ``plan.blocks`` during backward instead of saving its activations.

    Rewrites ``model`` in place (the runtime passes its own copy) and returns it.

    Invariant: outputs and gradients equal the unrewritten model's, dropout included,
    because the RNG state is saved at the block's forward and replayed in the recompute
    (``preserve_rng_state=True``); only the set of tensors saved for backward changes.
    Parameter names and the state_dict are unchanged (the block's ``forward`` is wrapped
    on the instance, the module tree is not restructured).
    """
    for fqn in plan.blocks:
        try:
            block = model.get_submodule(fqn)
        except AttributeError as err:
            raise PassError(
                f"checkpoint.blocks names {fqn!r}, which is not a submodule of "
                f"{type(model).__name__}; use the FQNs in capture(model, inputs).blocks."
            ) from err
        if getattr(block, _MARK, False):
            continue
        block.forward = functools.partial(_checkpointed_forward, block.forward)
        setattr(block, _MARK, True)
    return model


def _checkpointed_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    # Non-reentrant: supports kwargs and inputs that do not require grad (the first
    # block's input often does not), and is the variant PyTorch recommends.
    return torch.utils.checkpoint.checkpoint(
        forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs
    )


class CheckpointPass:
    """The pipeline entry for :func:`checkpoint_blocks` (plan section ``checkpoint``)."""

    section = "checkpoint"
    invariant = ("outputs and gradients equal the unrewritten model's (RNG replayed); only "
                 "the set of tensors saved for backward changes")

    def enabled(self, section: CheckpointPlan) -> bool:
        return bool(section.blocks)

    def apply(self, model: nn.Module, section: CheckpointPlan, ctx: PassContext) -> nn.Module:
        return checkpoint_blocks(model, plan=section)

    def memory(self, section: CheckpointPlan, graph: ModelGraph,
               terms: MemoryTerms) -> MemoryTerms:
        """A checkpointed block keeps only its inputs; while it is recomputed in backward
        its own activations are live again, one block at a time (the largest counts)."""
        by_fqn = {b.fqn: b for b in graph.blocks}
        saved, recompute = dict(terms.saved), terms.recompute
        for fqn in section.blocks:
            block = by_fqn.get(fqn)
            if block is None:
                continue
            saved[fqn] = block.input_bytes
            recompute = max(recompute, block.activation_bytes)
        return terms.replace(saved=saved, recompute=recompute)
