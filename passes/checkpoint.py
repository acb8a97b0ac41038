"""Activation checkpointing per block: full, or selective (op outputs saved by kind).

Note: [selective checkpointing]
A ``selective`` block runs under ``torch.utils.checkpoint.checkpoint`` (non-reentrant)
with ``context_fn=create_selective_checkpoint_contexts(policy)``, the engine torchtitan's
selective AC uses: in forward, outputs of the ops whose overload packet is in the block's
``save`` kinds (:data:`OP_KINDS`) are cached (``MUST_SAVE``) and everything else is
dropped (``PREFER_RECOMPUTE``); in backward the block's forward runs again and the cached
ops return their saved outputs instead of running. The policy sees the ops that reach the
dispatcher below autograd, so composite ops appear as what they decompose into
(``F.linear`` on a 3-D input is ``mm``/``addmm`` on its flattened view, attention is one of
the fused ``_scaled_dot_product_*`` ops or, in the math fallback, ``bmm`` + ``softmax``;
dropout is ``native_dropout`` under torch.compile and on CUDA, and ``bernoulli_`` plus
pointwise ops in CPU eager, where kind 'dropout' saves nothing; under compile mode
'inductor-eager-rng' it keeps the bool mask alone, Note: [a dropout's mask is what a
checkpoint keeps] in passes/_dropout_mask.py).
Random ops are recomputed with the RNG state saved at the block's forward
(``preserve_rng_state=True``), so dropout masks are the same in forward and recompute.

Note: [a recompute does not count a batch twice]
A block's recompute runs its forward again in training mode, and a BatchNorm (any
``_NormBase`` tracking running statistics) there would update its running mean and variance
and ``num_batches_tracked`` a second time: the loss and gradients stay the untouched
model's (training mode normalizes by the batch's own statistics), but the statistics a
production job keeps for evaluation drift from the untouched model's, by the momentum
applied twice per step (measured on the CNN example with every block checkpointed:
running means off after one step, ``num_batches_tracked`` 2 where it is 1). So in a
block holding such norms, each call's recompute (every call of the wrapped forward after
its first) runs with their momentum at 0.0 (the update ``(1 - m) * running + m * batch``
then leaves the statistics exactly as they were) and their ``num_batches_tracked``
buffer set aside (a norm without one skips the count, and ``momentum=None``'s cumulative
average then updates by 0.0 too), both put back afterwards. No tensor is copied: a
selective recompute must dispatch exactly the ops its forward did. Turning
``track_running_stats`` off instead, as fairscale's ``patch_batchnorm`` does for the
no-grad pass of its reentrant checkpoint, makes ``native_batch_norm`` save two tensors
fewer, and the non-reentrant checkpoint refuses a recompute whose saved tensors differ
from the forward's. Under torch.compile nothing is run twice (the
checkpoint becomes the partitioner's recompute of a traced graph, whose buffer updates
happen once), so the wrapper steps aside while Dynamo traces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, get_args

import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from autoscale.capture import ModelGraph
from autoscale.errors import PassError
from autoscale.passes.base import MemoryTerms, PassContext
from autoscale.plan import BlockPolicy, CheckpointPlan, OpKind

__all__ = ["OP_KINDS", "CheckpointPass", "checkpoint_blocks", "checkpointed_forward_of",
           "selective_policy"]

_MARK = "_autoscale_checkpointed"
#: What each checkpointed block keeps for its recompute's RNG replay: the CPU generator's
#: state (torch.get_rng_state(), 5056 bytes with torch's Mersenne Twister).
_RNG_STATE_BYTES = torch.get_rng_state().numel()
_aten = torch.ops.aten


def _packets(*names: str) -> frozenset[Any]:
    # getattr: the fused attention variants differ between torch builds.
    return frozenset(getattr(_aten, n) for n in names if hasattr(_aten, n))


OP_KINDS: dict[str, frozenset[Any]] = {
    "mm": _packets("mm"),
    "addmm": _packets("addmm"),
    "bmm": _packets("bmm", "baddbmm"),
    "sdpa": _packets("_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_efficient_attention",
                     "_scaled_dot_product_cudnn_attention",
                     "_scaled_dot_product_fused_attention_overrideable"),
    "conv": _packets("convolution"),
    "softmax": _packets("_softmax", "_safe_softmax"),
    "layer_norm": _packets("native_layer_norm"),
    "gelu": _packets("gelu"),
    "silu": _packets("silu"),
    # Dropout reaches the dispatcher as one op where it is traced (torch.compile) or fused
    # (CUDA); CPU eager runs it as bernoulli_ on a new tensor, an in-place op selective
    # checkpointing cannot cache, so there this kind saves nothing.
    "dropout": _packets("native_dropout"),
}
"""Op kind (autoscale.plan.OpKind) -> the aten overload packets whose outputs it saves."""

assert set(OP_KINDS) == set(get_args(OpKind)), "OP_KINDS and plan.OpKind must name the same"

_NODE_NAMES: dict[str, frozenset[str]] = {
    kind: frozenset(p.__name__ for p in packets) for kind, packets in OP_KINDS.items()
}
"""Op kind -> the function names a captured graph's node targets carry for it: the aten
names (export graphs) and torch-level ones (symbolic_trace graphs), for the graph estimate."""
for _kind, _extra in {"mm": ("matmul", "linear"), "addmm": ("linear",), "bmm": ("matmul",),
                      "sdpa": ("scaled_dot_product_attention",),
                      "conv": ("conv1d", "conv2d", "conv3d"), "softmax": ("softmax",),
                      "layer_norm": ("layer_norm",)}.items():
    _NODE_NAMES[_kind] = _NODE_NAMES[_kind] | frozenset(_extra)


def selective_policy(save: tuple[OpKind, ...] | tuple[str, ...]
                     ) -> Callable[..., CheckpointPolicy]:
    """The policy function for ``create_selective_checkpoint_contexts`` that saves the
    outputs of ops of the kinds in ``save`` and recomputes every other op."""
    kept = frozenset().union(*(OP_KINDS[kind] for kind in save))

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if getattr(op, "overloadpacket", op) in kept:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpoint_blocks(model: nn.Module, *, plan: CheckpointPlan) -> nn.Module:
    """Checkpoint each block of ``plan.blocks`` as its policy says: ``full`` recomputes
    the block's forward in backward from its inputs, ``selective`` saves the outputs of the
    policy's op kinds and recomputes the rest (Note: [selective checkpointing]).

    Rewrites ``model`` in place (the runtime passes its own copy) and returns it.

    Invariant: outputs and gradients equal the unrewritten model's, dropout included,
    because the RNG state is saved at the block's forward and replayed in the recompute
    (``preserve_rng_state=True``); only the set of tensors saved for backward changes.
    Autocast entered around the model's forward is re-entered by the recompute (torch's
    checkpoint records it). Parameter names and the state_dict are unchanged (the block's
    ``forward`` is wrapped on the instance, the module tree is not restructured).
    """
    for fqn, policy in plan.policies.items():
        try:
            block = model.get_submodule(fqn)
        except AttributeError as err:
            raise PassError(
                f"checkpoint.blocks names {fqn!r}, which is not a submodule of "
                f"{type(model).__name__}; use the FQNs in capture(model, inputs).blocks."
            ) from err
        if getattr(block, _MARK, False):
            continue
        block.forward = checkpointed_forward_of(block, policy)
        setattr(block, _MARK, True)
    return model


def checkpointed_forward_of(block: nn.Module, policy: BlockPolicy) -> Callable[..., Any]:
    """``block.forward`` run under ``policy`` (full or selective), as
    :func:`checkpoint_blocks` installs it; ``block`` itself is not changed."""
    return functools.partial(_checkpointed_forward, block.forward, _context_fn(policy),
                             _tracking_norms(block))


def _context_fn(policy: BlockPolicy) -> Callable[[], Any] | None:
    if policy.policy != "selective":
        return None
    return functools.partial(create_selective_checkpoint_contexts,
                             selective_policy(policy.save))


def _tracking_norms(block: nn.Module) -> tuple[_NormBase, ...]:
    """The norms in ``block`` that update running statistics in training mode."""
    return tuple(m for m in block.modules()
                 if isinstance(m, _NormBase) and m.track_running_stats
                 and m.running_mean is not None)


class _StatsOnceForward:
    """One checkpointed call's forward: the first run (the forward) as it is, every later
    run (the recompute) leaving the running statistics of ``norms`` as they were (Note: [a
    recompute does not count a batch twice])."""

    def __init__(self, forward: Callable[..., Any], norms: tuple[_NormBase, ...]) -> None:
        self.forward, self.norms, self.ran = forward, norms, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.ran:
            self.ran = True
            return self.forward(*args, **kwargs)
        # No tensor op here: a selective recompute must dispatch exactly the forward's ops.
        kept = [(norm.momentum, norm.num_batches_tracked) for norm in self.norms]
        for norm in self.norms:
            norm.momentum = 0.0
            norm.num_batches_tracked = None
        try:
            return self.forward(*args, **kwargs)
        finally:
            for norm, (momentum, count) in zip(self.norms, kept, strict=True):
                norm.momentum = momentum
                norm.num_batches_tracked = count


def _checkpointed_forward(forward: Any, context_fn: Callable[[], Any] | None,
                          norms: tuple[_NormBase, ...], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    if norms and not torch.compiler.is_compiling():
        forward = _StatsOnceForward(forward, norms)
    # Non-reentrant: supports kwargs, inputs that do not require grad (the first block's
    # input often does not) and context_fn; it is the variant PyTorch recommends.
    # A full block passes no context_fn at all: Dynamo (torch.compile over a checkpointed
    # block) refuses an explicit noop_context_fn, while the default is the same thing.
    extra: dict[str, Any] = {} if context_fn is None else {"context_fn": context_fn}
    return torch.utils.checkpoint.checkpoint(
        forward, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs
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
        """A fully checkpointed block keeps only its inputs; a selective one its inputs and
        the new outputs of the graph's nodes of its saved kinds (capped by what the block
        saves unrewritten). While a block is recomputed in backward its own activations
        are live again, one block at a time (the largest counts)."""
        by_fqn = {b.fqn: b for b in graph.blocks}
        saved, recompute = dict(terms.saved), terms.recompute
        for fqn, policy in section.policies.items():
            block = by_fqn.get(fqn)
            if block is None:
                continue
            kept = block.input_bytes + _RNG_STATE_BYTES
            if policy.policy == "selective":
                kept += _saved_node_bytes(graph, fqn, policy.save)
            saved[fqn] = min(kept, saved.get(fqn, kept))
            recompute = max(recompute, block.activation_bytes)
        return terms.replace(saved=saved, recompute=recompute)


def _saved_node_bytes(graph: ModelGraph, fqn: str, save: tuple[str, ...]) -> int:
    """New bytes of ``fqn``'s graph nodes that call an op of a kind in ``save``; a leaf
    module with FLOPs (a Linear in a symbolic_trace graph) counts as a matmul."""
    names = frozenset().union(*(_NODE_NAMES[kind] for kind in save))
    matmul = bool({"mm", "addmm"} & set(save))
    total = 0
    for meta in graph.nodes.values():
        if meta.block != fqn:
            continue
        if meta.op == "call_module":
            hit = matmul and meta.flops > 0
        else:
            parts = meta.target.split(".")
            hit = (parts[1] if parts[0] == "aten" and len(parts) > 1 else parts[-1]) in names
        total += meta.bytes if hit else 0
    return total
