"""The repeated blocks of a model and what each does in one fake forward.

``find_blocks`` names the blocks from the module tree alone. ``record_blocks`` hooks them
for one fake run of the whole model (a RunRecorder counting every aten op) and keeps, per
block, its first inputs and the bytes and FLOPs of the ops run inside it, whatever module
the ops belong to: a block that torch.fx keeps as one leaf node is measured the same way as
one whose ops are all nodes. ``block_infos`` turns those records into BlockInfo.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from autoscale.capture._fake import RunRecorder, tensor_bytes

__all__ = ["BlockInfo", "BlockRun", "block_infos", "find_blocks", "record_blocks",
           "unique_bytes"]


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """One repeated block: a child of a ModuleList/Sequential with siblings of its structure.

    Invariant: ``model.get_submodule(fqn)`` is the block; blocks never nest.
    """

    fqn: str
    """Fully qualified module name, e.g. "transformer.h.0"."""
    class_name: str
    param_bytes: int
    """Bytes of the block's own parameters (tied ones counted once)."""
    activation_bytes: int
    """Bytes newly produced in the block's forward: an upper bound of what backward saves."""
    input_bytes: int
    """Bytes of the block's input activations: what a checkpointed block keeps."""
    flops: int
    """Forward FLOPs of the block on the example batch."""


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of ``model`` as (fqn, module), in module order.

    A block is a child of an nn.ModuleList or nn.Sequential that has children of its own
    and at least one sibling of the same class; siblings of a class must agree on the shape
    of every parameter name they share. One may hold extra parameters: T5's first block
    alone holds the relative position bias and is still a block. Blocks inside blocks are
    dropped: the outermost win. torch.nn's own layers (nn.TransformerEncoderLayer) are
    blocks like any other class: the module tree, not the traced graph, decides.
    """
    found: list[tuple[str, nn.Module]] = []
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.ModuleList | nn.Sequential):
            continue
        by_class: dict[type, list[tuple[str, nn.Module]]] = {}
        for key, child in container.named_children():
            if any(child.children()):  # a lone Linear or ReLU is a layer, not a block
                fqn = f"{prefix}.{key}" if prefix else key
                by_class.setdefault(type(child), []).append((fqn, child))
        for group in by_class.values():
            if len(group) >= 2 and _shapes_agree([m for _, m in group]):
                found.extend(group)
    names = [fqn for fqn, _ in found]
    return [(fqn, m) for fqn, m in found
            if not any(fqn.startswith(other + ".") for other in names)]


def _shapes_agree(modules: list[nn.Module]) -> bool:
    shapes: dict[str, tuple[int, ...]] = {}
    for module in modules:
        for name, p in module.named_parameters():
            if shapes.setdefault(name, tuple(p.shape)) != tuple(p.shape):
                return False
    return True


@dataclass
class BlockRun:
    """One block in a fake run: its first inputs, and what all its calls did.

    Invariant: ``bytes`` and ``flops`` are the RunRecorder's counts between entering and
    leaving the block, summed over its calls; ``input_bytes`` is its first call's tensors.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    input_bytes: int
    bytes: int = 0
    flops: int = 0


@contextmanager
def record_blocks(blocks: list[tuple[str, nn.Module]],
                  recorder: RunRecorder) -> Iterator[dict[str, BlockRun]]:
    """Yield the dict that fills with a BlockRun per block called while ``recorder`` runs.

    The hooks are removed on exit, error or not: the user's modules keep no hook.
    """
    records: dict[str, BlockRun] = {}
    handles = []
    try:
        for fqn, block in blocks:
            handles.append(block.register_forward_pre_hook(
                _pre_hook(fqn, recorder, records), with_kwargs=True))
            handles.append(block.register_forward_hook(_post_hook(fqn, recorder, records)))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _pre_hook(fqn: str, recorder: RunRecorder, records: dict[str, BlockRun]) -> Any:
    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        if fqn not in records:  # a block called twice keeps its first inputs
            leaves = [t for t in pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)]
            records[fqn] = BlockRun(args, dict(kwargs), sum(map(tensor_bytes, leaves)))
        rec = records[fqn]
        rec.bytes -= recorder.bytes
        rec.flops -= recorder.flops

    return hook


def _post_hook(fqn: str, recorder: RunRecorder, records: dict[str, BlockRun]) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        records[fqn].bytes += recorder.bytes
        records[fqn].flops += recorder.flops

    return hook


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each tensor object counted once (tied parameters)."""
    return sum(tensor_bytes(t) for t in {id(t): t for t in tensors}.values())


def block_infos(records: dict[str, BlockRun],
                blocks: list[tuple[str, nn.Module]]) -> tuple[BlockInfo, ...]:
    """BlockInfo of each block in ``records``, in ``blocks`` order.

    A block the forward never called has nothing to measure and is left out.
    """
    return tuple(
        BlockInfo(fqn=fqn, class_name=type(block).__name__,
                  param_bytes=unique_bytes(block.parameters()),
                  activation_bytes=rec.bytes, input_bytes=rec.input_bytes, flops=rec.flops)
        for fqn, block in blocks if (rec := records.get(fqn)) is not None)
