"""Dropout split into a saved mask and a recomputed product, for compile mode
'inductor-eager-rng' (Note: [a dropout's mask is what a checkpoint keeps]).

Note: [a dropout's mask is what a checkpoint keeps]
Under 'inductor-eager-rng' a dropout is one ``native_dropout`` op run by eager's kernel,
so a selective policy has two choices, both poor: save its outputs (the float product and
the bool mask, 5 bytes an element, and the product is what the next matmul's backward
reads anyway), or recompute it, which replays eager's RNG in the backward at eager's cost
(on the GPT example: +26 ms for full checkpointing against +8 ms with inductor's RNG).
The backward only needs the mask: ``native_dropout``'s gradient is ``grad * mask * scale``
and the product is ``x * mask * scale``, one pointwise op inductor fuses into its
neighbours. So under this mode ``native_dropout`` is decomposed into
``autoscale::dropout_mask`` (a random op of its own, 1 byte an element, drawn by eager's
``bernoulli_`` on a bool tensor, which consumes the generator exactly as
``native_dropout``'s CPU kernel does: same masks, tests/passes/test_compile.py) and that
product. Selective checkpointing tags every node a dispatched op creates with the op's
policy (``_CachingTorchDispatchMode`` in torch.utils.checkpoint), so a block whose policy
saves kind 'dropout' would save the product too; :class:`_RecomputeDropoutProduct`, a
joint-graph pass that runs before inductor's partitioner, retags that product as
recomputable, leaving the mask as the one thing saved. Measured on the GPT example, four
blocks saving matmuls, attention and dropout: 28.64 MiB of activations at 0.93x eager's
step, against 36.64 MiB at 0.95x with ``native_dropout`` saved whole.

Why a custom op and not ``aten.bernoulli``: the partitioner recognises random aten ops
by a fixed list and never recomputes a random op outside a checkpoint; a custom op
tagged ``nondeterministic_seeded`` is treated the same way there (banned from
recomputation, and replayed with the generator state saved inside a checkpoint), and it
keeps the mask a node of its own that the retagging pass can find.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy

_aten = torch.ops.aten


@torch.library.custom_op("autoscale::dropout_mask", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The keep-mask ``native_dropout(x, p, True)`` draws (bool, shape of ``x``), from
    torch's generator in the same order; ``0 < p < 1``."""
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)


@dropout_mask.register_fake
def _dropout_mask_fake(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.bool)


def split_native_dropout(x: torch.Tensor, p: float, train: bool | None) -> Any:
    """Decomposition of ``aten.native_dropout`` into :func:`dropout_mask` and the product;
    ``NotImplemented`` (keep the op) outside training or for ``p`` of 0 or 1."""
    if not train or p <= 0.0 or p >= 1.0 or not x.dtype.is_floating_point:
        return NotImplemented
    mask = torch.ops.autoscale.dropout_mask(x, p)
    return x * mask * (1.0 / (1.0 - p)), mask


DECOMPOSITIONS = {_aten.native_dropout.default: split_native_dropout}
"""Added to inductor's decomposition table under mode 'inductor-eager-rng'."""


class _RecomputeDropoutProduct(CustomGraphPass):
    """Joint-graph pass: the product of a split dropout whose op was tagged MUST_SAVE is
    retagged PREFER_RECOMPUTE, so a checkpoint saves the mask alone (module Note)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.find_nodes(op="call_function",
                                     target=torch.ops.autoscale.dropout_mask.default):
            if node.meta.get("recompute") != CheckpointPolicy.MUST_SAVE:
                continue
            # The product is two muls (x * mask, then * scale): the mask's mul user and
            # that mul's own mul user; the next op of the model is tagged by its own policy.
            for first in node.users:
                if _is_saved_mul(first):
                    first.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                    for second in first.users:
                        if _is_saved_mul(second):
                            second.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE

    def uuid(self) -> Any:
        # Inductor's FX graph cache keys on this: bump it when the pass changes.
        return "autoscale-recompute-dropout-product-1"


def _is_saved_mul(node: torch.fx.Node) -> bool:
    return (node.target is _aten.mul.Tensor
            and node.meta.get("recompute") == CheckpointPolicy.MUST_SAVE)


RECOMPUTE_DROPOUT_PRODUCT = _RecomputeDropoutProduct()
"""Installed as inductor's ``joint_custom_pre_pass`` under mode 'inductor-eager-rng'."""
