"""PowerSGD inside FSDP2's reduce-scatter: rank-r factors of every gradient matrix of a unit.

Note: [PowerSGD under FSDP2]
FSDP2 hands a unit's reduce-scatter one flat (ws, C) buffer (``foreach_reduce``'s
chunk-cat): row j holds, for each parameter of the unit's group in order, this rank's
gradient of rank j's chunk of that parameter, dim 0 padded to a multiple of ws. Column
range [offset, offset + rows * cols) of every row is one parameter's chunk, so the
(ws, rows, cols) view of that range is the parameter's whole padded gradient, a
(ws * rows, cols) matrix, with no copy. PowerSGD (Vogels et al. 2019; torch's
``powerSGD_hook`` is the reference this follows) then runs on those matrices:

  M_i = g_i + e_i                       (this rank's gradient plus its residual, fp32)
  P   = sum_i M_i Q;  orthogonalize P   (one all-reduce for every matrix of the unit)
  Q   = sum_i M_i^T P                   (a second all-reduce)
  out = my rows of P Q^T                (the sum; FSDP2 divides after: force-sum)
  e_i = M_i - P (M_i^T P)^T             (what this rank put into the sum, taken out)

Parameters whose rank-r factors would not be 2x smaller (vectors, small matrices: torch's
``_should_compress`` with its default ``min_compression_rate=2``) travel whole in the
first all-reduce, next to the Ps, and keep no residual.

The residual differs from torch's hook, which keeps ``M_i - P Q_avg^T``: both have the
same sum over ranks (M - P Q^T), and P, Q and the output depend on the ranks' M_i only
through their sum, so in exact arithmetic the two run the same. torch's also holds
P P^T (M_i - mean M), this rank's deviation from the mean in P's span, and for the
whole-sent parameters M_i - mean M, which adds up over steps as a random walk; here each
rank keeps only (I - P P^T) M_i, what the projection missed of what it had, and nothing
for the whole-sent parameters.

Q is warm-started (kept from the previous call, orthogonalized again as torch does); the
first Q of each matrix is drawn from a generator with a fixed seed, so it is the same on
every rank without a broadcast. After a call whose matrix was zero (a zero-initialized
layer's neighbour on the first step) the kept Q is zero, and warm start would keep it so;
such a Q is replaced by a fresh draw from that generator (drawn on every call, so that the
choice needs no host sync and every rank draws the same). P and Q are orthogonalized by
QR, which returns orthonormal columns for rank-deficient input too, where Gram-Schmidt
(torch's choice for rank <= 2) divides by a zero norm. Compression starts at the first
reduce-scatter: torch's DDP hook waits 2 steps for DDP to rebuild its buckets, and a
unit's layout is fixed.
After orthogonalization the rows of P that are FSDP2's dim-0 padding are zeroed, so the
padding never enters the output or the residual even when P is rank-deficient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from autoscale.errors import PassError

__all__ = ["Slot", "UnitPowerSGD", "slots_of"]

# torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook's default: compress a matrix
# only if its factors are at least this many times smaller.
_MIN_COMPRESSION_RATE = 2
_SEED = 0


@dataclass(frozen=True, slots=True)
class Slot:
    """One parameter's place in each row of a unit's (ws, C) reduce-scatter input."""

    offset: int
    """First column of the parameter's chunk in every row (and in the output shard)."""
    rows: int
    """Dim 0 of the parameter's padded chunk: its matrix is (ws * rows, cols)."""
    cols: int
    """The chunk's other dims, flattened."""
    valid_rows: int
    """Rows of the (ws * rows, cols) matrix that are the parameter's, not padding."""
    rank: int
    """The approximation rank; 0: the parameter travels whole."""

    @property
    def numel(self) -> int:
        return self.rows * self.cols


def slots_of(fsdp_params: Sequence[Any], world: int, rank: int) -> list[Slot]:
    """Where each of ``fsdp_params`` (FSDP2's FSDPParams, in the group's order) lies in the
    reduce-scatter input, and its approximation rank (0: sent whole) at ``rank``."""
    slots, offset = [], 0
    for fp in fsdp_params:
        size = tuple(fp.padded_sharded_param_size)
        rows = size[0] if size else 1
        cols = max(1, math.prod(size) // max(rows, 1))
        n = world * rows
        # Only dim-0 sharding pads; FSDP2 requires other shard dims to divide evenly.
        valid = int(fp.sharded_param.shape[0]) if fp.fsdp_placement.dim == 0 and size else n
        r = min(n, cols, rank)
        compress = (n + cols) * r * _MIN_COMPRESSION_RATE < n * cols
        slots.append(Slot(offset, rows, cols, valid, r if compress else 0))
        offset += rows * cols
    return slots


class UnitPowerSGD:
    """PowerSGD state and maths of one FSDP2 unit's reduce-scatter (Note: [PowerSGD under
    FSDP2]): the layout, the warm-started Qs and the (ws, C) fp32 residual.

    Invariant: ``reduce_scatter`` writes this rank's shard of P Q^T, the rank-r
    approximation of the ranks' summed gradient-plus-residual matrices (exact for the
    whole-sent parameters and for sums of rank <= r); summed over ranks, the residuals
    equal the summed gradients of all calls minus the summed outputs.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.slots: list[Slot] = []
        self.key: tuple[int, ...] = ()
        self.qs: list[torch.Tensor] = []
        self.residual: torch.Tensor | None = None
        self.gen: torch.Generator | None = None

    def held_bytes(self) -> tuple[int, int]:
        """(residual bytes, Q bytes) held between calls."""
        res = self.residual.nbytes if self.residual is not None else 0
        return res, sum(q.nbytes for q in self.qs)

    def reset_if_changed(self, fsdp_params: Sequence[Any], world: int, width: int,
                         device: torch.device) -> None:
        """Lay the state out for ``fsdp_params`` (the parameters in this call's input);
        a new layout starts from a zero residual and fresh Qs."""
        key = tuple(id(fp) for fp in fsdp_params)
        if key == self.key and self.residual is not None:
            return
        slots = slots_of(fsdp_params, world, self.rank)
        if sum(s.numel for s in slots) != width:
            raise PassError(
                f"PowerSGD's reduce-scatter got rows of {width} elements but the unit's "
                f"{len(slots)} parameters with requires_grad lay out "
                f"{sum(s.numel for s in slots)}; the compress pass sets "
                "set_reduce_scatter_unused_params(True) so every such parameter is in each "
                "reduce-scatter: leave it set (or use compress.method 'int8'/'topk').")
        self.gen = torch.Generator(device).manual_seed(_SEED)  # the same Qs on every rank
        self.qs = [torch.randn(s.cols, s.rank, generator=self.gen, device=device)
                   for s in slots if s.rank]
        self.residual = torch.zeros(world, width, dtype=torch.float32, device=device)
        self.slots, self.key = slots, key

    def reduce_scatter(self, output: torch.Tensor, rows: torch.Tensor,
                       group: dist.ProcessGroup) -> int:
        """Write the sum over ranks of their ``rows`` (ws, C) row ``group.rank()``, as
        PowerSGD approximates it, into ``output`` (C,); returns the bytes handed to the
        two all-reduces. ``reset_if_changed`` must have laid the state out."""
        assert self.residual is not None
        world = rows.shape[0]
        m = self.residual.add_(rows)  # M_i, in place: the residual is rebuilt below
        low = [s for s in self.slots if s.rank]
        whole = [s for s in self.slots if not s.rank]
        p_numel = sum(world * s.rows * s.rank for s in low)
        first = torch.empty(p_numel + world * sum(s.numel for s in whole),
                            dtype=torch.float32, device=m.device)
        ps = self._ps(m, low, first[:p_numel])
        at = p_numel
        for s in whole:
            first[at:at + world * s.numel].view(world, s.numel).copy_(_cols(m, s))
            at += world * s.numel
        dist.all_reduce(first, group=group)
        second = torch.empty(sum(s.cols * s.rank for s in low), dtype=torch.float32,
                             device=m.device)
        qs = self._local_qs(m, low, ps, second)
        for s in whole:
            _cols(m, s).zero_()  # sent exactly: nothing held back
        dist.all_reduce(second, group=group)
        me = group.rank()
        for s, p, q, kept in zip(low, ps, qs, self.qs, strict=True):
            out = output[s.offset:s.offset + s.numel].view(s.rows, s.cols)
            out.copy_(p[me] @ q.T)
            kept.copy_(q)  # warm start
        at = p_numel
        for s in whole:
            output[s.offset:s.offset + s.numel].copy_(first[at + me * s.numel:
                                                            at + (me + 1) * s.numel])
            at += world * s.numel
        return first.nbytes + second.nbytes

    def _ps(self, m: torch.Tensor, low: list[Slot], buf: torch.Tensor) -> list[torch.Tensor]:
        """P_i = M_i Q for each matrix, each a (ws, rows, r) view into ``buf``."""
        world, ps, at = m.shape[0], [], 0
        for s, q in zip(low, self.qs, strict=True):
            fresh = torch.randn(q.shape, generator=self.gen, device=q.device)
            q.copy_(torch.where(q.abs().amax() > 0, q, fresh))  # see the module's note
            q.copy_(torch.linalg.qr(q).Q)  # torch's hook orthogonalizes the warm Q too
            p = buf[at:at + world * s.rows * s.rank].view(world, s.rows, s.rank)
            torch.matmul(_matrix(m, s), q, out=p)
            ps.append(p)
            at += p.numel()
        return ps

    def _local_qs(self, m: torch.Tensor, low: list[Slot], ps: list[torch.Tensor],
                  buf: torch.Tensor) -> list[torch.Tensor]:
        """Orthogonalize each summed P, write this rank's M_i^T P into ``buf`` (one
        (cols, r) view each), and leave M_i - P (M_i^T P)^T in the residual."""
        world, qs, at = m.shape[0], [], 0
        for s, p in zip(low, ps, strict=True):
            flat = p.view(world * s.rows, s.rank)
            flat.copy_(torch.linalg.qr(flat).Q)
            flat[s.valid_rows:].zero_()  # FSDP2's padding rows: see the module's note
            mat = _matrix(m, s)
            q = buf[at:at + s.cols * s.rank].view(s.cols, s.rank)
            q.copy_(torch.einsum("wrc,wrk->ck", mat, p))
            mat.sub_(p @ q.T)
            qs.append(q)
            at += q.numel()
        return qs


def _cols(m: torch.Tensor, s: Slot) -> torch.Tensor:
    return m[:, s.offset:s.offset + s.numel]


def _matrix(m: torch.Tensor, s: Slot) -> torch.Tensor:
    """The parameter's (ws, rows, cols) view of the (ws, C) buffer: its padded matrix."""
    return _cols(m, s).view(m.shape[0], s.rows, s.cols)
