"""DTensor params (FSDP2's sharded params) on the optimizer kernels.

The kernels are elementwise per rank: AdamW, SGD and 8-bit AdamW step each rank's local
shard with its local state, which is exactly the update of the whole tensor. LAMB and
LARS also need each tensor's whole norm: the kernels compute squared norms of the local
shards, and :func:`norm_sq_reducer` sums them over the mesh dimensions the tensor is
sharded on (one all-reduce per (mesh, sharded dims) group of tensors), before the trust
ratios. Every rank must step the same params in the same order, as torch.optim requires
of FSDP2 anyway.

DTensor comes from torch.distributed; a build without it has no DTensor params, so
everything here is then a no-op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["NormSqReducer", "any_dtensor", "is_dtensor", "local", "norm_sq_reducer", "whole_norms"]

#: ``reduce(sq, idx)``: ``sq`` is a (len(idx), 2) float tensor of squared local norms of the
#: tensors ``idx`` (indices into the list the reducer was made for); summed in place over
#: the ranks that hold the other shards.
NormSqReducer = Callable[[torch.Tensor, Sequence[int]], None]


def is_dtensor(t: Any) -> bool:
    """True for a DTensor (a sharded or replicated param, its grad or its state)."""
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(ts: Sequence[Any]) -> bool:
    """True if any of ``ts`` is a DTensor; a C-level loop over their types (runs every
    optimizer step)."""
    return DTensor is not None and any(issubclass(t, DTensor) for t in set(map(type, ts)))


def local(t: Any) -> Any:
    """The rank-local tensor behind a DTensor (same storage: in-place ops reach the
    DTensor), anything else unchanged."""
    return t._local_tensor if is_dtensor(t) else t


def whole_norms(norms: torch.Tensor, idx: Sequence[int],
                reduce: NormSqReducer | None) -> torch.Tensor:
    """Norms of whole tensors from the (len(idx), 2) norms of their local shards.

    Unchanged (the same tensor) without a reducer, so unsharded params get exactly the
    numbers they got before DTensor support.
    """
    if reduce is None:
        return norms
    sq = norms.square()
    reduce(sq, idx)
    return sq.sqrt()


def norm_sq_reducer(params: Sequence[torch.Tensor]) -> NormSqReducer | None:
    """A reducer for the squared norms of ``params``' local shards, or None when no
    param is sharded (plain tensors, or DTensors replicated on every mesh dimension):
    then local norms are whole norms.

    Partial placements are not expected on params (FSDP2 and DDP-style meshes shard or
    replicate them) and are refused, since their local values do not add up elementwise.
    """
    groups: dict[tuple[int, tuple[int, ...]], tuple[Any, list[int]]] = {}
    member: dict[int, tuple[int, tuple[int, ...]]] = {}
    for i, param in enumerate(params):
        if not is_dtensor(param):
            continue
        p: Any = param  # a DTensor: placements, device_mesh
        if any(pl.is_partial() for pl in p.placements):
            raise ValueError(
                f"param {i} is a DTensor with a Partial placement {p.placements}; LAMB/LARS "
                "need params that are sharded or replicated. Redistribute it first."
            )
        dims = tuple(d for d, pl in enumerate(p.placements) if pl.is_shard())
        if not dims:
            continue
        key = (id(p.device_mesh), dims)
        groups.setdefault(key, (p.device_mesh, []))[1].append(i)
        member[i] = key
    if not groups:
        return None

    def reduce(sq: torch.Tensor, idx: Sequence[int]) -> None:
        # Rows by group, groups in first-use order: the same on every rank, so the
        # collectives match up.
        rows: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for row, i in enumerate(idx):
            if i in member:
                rows.setdefault(member[i], []).append(row)
        for key, r in rows.items():
            mesh = groups[key][0]
            part = sq[r]  # a copy (list index), summed in place
            for d in key[1]:
                torch.distributed.all_reduce(part, group=mesh.get_group(d))
            sq[r] = part

    return reduce
