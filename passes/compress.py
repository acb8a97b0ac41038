"""Compressed gradient communication: DDP comm hooks and FSDP2 custom reduce-scatters.

Note: [no postponed annotations here]
This module does not use ``from __future__ import annotations``: DDP's
``register_comm_hook`` compares the hook's ``bucket`` and return annotations with
``dist.GradBucket`` and ``Future[Tensor]`` as objects, and refuses the strings that
postponed annotations would give it.

Note: [what travels]
Under DDP a comm hook replaces each bucket's fp32 all-reduce. bf16/fp16 cast the bucket
(divided by the world size first, so an fp16 sum of ws terms stays in range) and ride the
sum all-reduce. int8 and top-k codes cannot be summed by a collective: each rank packs its
bucket (int8: fp32 scales then int8 codes; top-k: fp32 values then int32 indices) into one
byte tensor, all-gathers it, and decodes and sums the ws payloads locally, in fp32.
Under FSDP2 each unit's reduce-scatter input is one flat (ws, C) buffer whose row j is
destined for rank j; the custom reduce-scatter packs every row as above, exchanges them
with one ``all_to_all_single`` (row j to rank j), and decodes and sums what it received.
gloo's own reduce-scatter is an all-reduce, so the exchange also sends fewer bytes than
uncompressed on the wire, not only in payload. PowerSGD's factors, unlike codes, can be
summed: under DDP torch's hook all-reduces each bucket's P and Q; under FSDP2 each unit's
reduce-scatter views every parameter's padded gradient as a matrix in its (ws, C) input and
all-reduces the unit's Ps (with the parameters sent whole) and then its Qs, each rank
keeping its rows of P Q^T (Note: [PowerSGD under FSDP2] in passes/_powersgd_fsdp.py).

Note: [byte convention]
``CommStats.bytes_sent`` is the payload this rank hands to collectives: the bytes of the
tensors passed as their inputs (packed codes, values and indices, P and Q, 16-bit casts).
``bytes_uncompressed`` is what the replaced collective would have been handed: the bucket
for DDP's all-reduce, the (ws, C) input for FSDP2's reduce-scatter. Wire bytes differ by
the algorithm's factor (a ring all-reduce sends ~2x its input, an all-gather (ws - 1)x,
an all-to-all (ws - 1) / ws); at two ranks the all-gather and the all-reduce send the same
multiple of their input, so the ratio is the wire ratio there. The all-gather of int8/topk
under DDP grows with the world size; past ~8 ranks a two-phase exchange would be needed.
"""

import math
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from autoscale.capture import ModelGraph
from autoscale.errors import PassError
from autoscale.kernels.quant import dequantize_blockwise, quantize_with_feedback
from autoscale.passes._powersgd_fsdp import UnitPowerSGD
from autoscale.passes.base import MemoryTerms, PassContext
from autoscale.plan import CompressPlan

# Note: [FSDP2's comm interface] The ReduceScatter base class lives in a private module;
# this is the one place it is imported (tests/passes/test_compress.py fails if it moves).
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter  # isort: skip

__all__ = ["CommStats", "CompressPass", "comm_stats", "compress_model", "warmup_steps"]

_STATS_ATTR = "_autoscale_comm_stats"
# torch's minimum with error feedback and warm start: DDP rebuilds its buckets after the
# first step, and PowerSGD's per-bucket state must not see the old layout. DDP only: an
# FSDP2 unit's layout is fixed, so its PowerSGD compresses from the first step.
_POWERSGD_START = 2


@dataclass
class CommStats:
    """What one model's compressed collectives sent, counted as they run.

    ``bytes_sent`` and ``bytes_uncompressed`` follow Note: [byte convention]; read their
    change over one optimizer step for per-step figures (``reset()`` zeroes the counters).
    ``residual_bytes`` is the error-feedback state held now, where ``residual_where`` says;
    ``state_bytes`` PowerSGD's P and Q factors (kept between steps: warm start).
    """

    method: str
    bytes_sent: int = 0
    """Payload bytes this rank handed to collectives."""
    bytes_uncompressed: int = 0
    """Bytes the uncompressed all-reduce / reduce-scatter would have been handed."""
    calls: int = 0
    """Compressed collectives run (DDP buckets, FSDP2 unit reduce-scatters)."""
    residual_bytes: int = 0
    """Error-feedback residual held on this rank now (a level, not a counter)."""
    state_bytes: int = 0
    """PowerSGD's P and Q matrices held on this rank now."""
    residual_where: str = ""
    """Where the residual lives and what its size is."""
    holders: list[Any] = field(default_factory=list, repr=False, compare=False)
    """The hooks and reduce-scatters that hold the residuals and factors (``held()``)."""

    def held_tensors(self) -> list[torch.Tensor]:
        """The residual and factor tensors this model's compression keeps between steps
        (and, under DDP PowerSGD, DDP's buckets: Note: [DDP's buckets as roots]): live
        memory that neither the model nor the optimizer reaches, which the peak
        measurement counts among its roots (autoscale.measure)."""
        return [t for holder in self.holders for t in holder.held()]

    def record(self, sent: int, uncompressed: int) -> None:
        self.bytes_sent += sent
        self.bytes_uncompressed += uncompressed
        self.calls += 1

    def reset(self) -> None:
        """Zero the counters (bytes and calls); the residual and state sizes stay."""
        self.bytes_sent = self.bytes_uncompressed = self.calls = 0

    @property
    def ratio(self) -> float:
        """bytes_uncompressed / bytes_sent (0 before anything was sent)."""
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else 0.0


def warmup_steps(plan: CompressPlan, *, strategy: str) -> int:
    """Training steps before ``plan``'s compression runs as it will from then on: a
    measurement must warm up at least this many steps for its measured step to be one.

    torch's PowerSGD hook under DDP (ddp, zero1) all-reduces the whole bucket while its
    iteration is below ``start_powerSGD_iter`` and creates its residuals and factors in
    the first step that compresses, so the first steady step is ``start_powerSGD_iter +
    1``. Every other compressor (and PowerSGD under FSDP2) compresses from the first step.
    """
    if plan.method == "powersgd" and strategy in ("ddp", "zero1"):
        return _POWERSGD_START + 1
    return 0


def comm_stats(model: nn.Module) -> CommStats | None:
    """The CommStats of a model the compress pass rewrote (the DDP wrapper, the FSDP2
    root or the module DDP wraps), or None for a model without compression."""
    for m in (model, getattr(model, "module", None)):
        stats = getattr(m, _STATS_ATTR, None)
        if isinstance(stats, CommStats):
            return stats
    return None


# -- codecs: one flat gradient <-> one packed byte tensor ----------------------------------


class _Codec:
    """Packs a flat float tensor of n elements into ``length(n)`` bytes, and decodes and
    sums R such packings; ``encode`` updates ``residual`` (fp32, n) in place if given."""

    def length(self, n: int) -> int:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def decode_sum(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError


class _Cast(_Codec):
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def length(self, n: int) -> int:
        return 2 * n

    def encode(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return x.to(self.dtype).view(torch.uint8)

    def decode_sum(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        return packed.view(self.dtype).float().sum(0)


def _ceil4(n: int) -> int:
    return -(-n // 4) * 4


class _Int8(_Codec):
    """[fp32 scales (4 nb bytes) | int8 codes (n, padded to 4)]; kernels/quant.py's maths."""

    def __init__(self, block: int) -> None:
        self.block = block

    def _blocks(self, n: int) -> int:
        return -(-n // self.block)

    def length(self, n: int) -> int:
        return 4 * self._blocks(n) + _ceil4(n)

    def encode(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        n, nb = x.numel(), self._blocks(x.numel())
        q, scales = quantize_with_feedback(x, residual, self.block)
        out = torch.zeros(self.length(n), dtype=torch.uint8, device=x.device)
        out[: 4 * nb] = scales.view(torch.uint8)
        out[4 * nb : 4 * nb + n] = q.view(torch.uint8)
        return out

    def decode_sum(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        nb = self._blocks(n)
        total = torch.zeros(n, dtype=torch.float32, device=packed.device)
        for row in packed:  # rows start at multiples of 4 bytes: the scales view as fp32
            scales = row[: 4 * nb].view(torch.float32)
            total += dequantize_blockwise(row[4 * nb : 4 * nb + n].view(torch.int8), scales,
                                          self.block)
        return total


class _TopK(_Codec):
    """[fp32 values (4 k bytes) | int32 indices (4 k bytes)] of the k largest |x + r|."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def _k(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.ratio * n)))

    def length(self, n: int) -> int:
        return 8 * self._k(n)

    def encode(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        k = self._k(x.numel())
        x = x.float() if residual is None else x.float() + residual
        idx = x.abs().topk(k, sorted=False).indices
        values = x[idx]
        if not bool(torch.isfinite(x).all()):
            # An overflowed (loss-scaled) step: the NaN must reach the scaler, which skips
            # the step, and must not enter the residual (every later step would carry it).
            values.fill_(math.nan)
        elif residual is not None:
            residual.copy_(x)
            residual[idx] = 0.0
        return torch.cat([values.view(torch.uint8), idx.to(torch.int32).view(torch.uint8)])

    def decode_sum(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        k = self._k(n)
        values = packed[:, : 4 * k].contiguous().view(torch.float32).reshape(-1)
        idx = packed[:, 4 * k :].contiguous().view(torch.int32).reshape(-1)
        out = torch.zeros(n, dtype=torch.float32, device=packed.device)
        return out.index_add_(0, idx.long(), values)


def _codec(plan: CompressPlan) -> _Codec:
    if plan.method in ("bf16", "fp16"):
        return _Cast(torch.bfloat16 if plan.method == "bf16" else torch.float16)
    if plan.method == "int8":
        return _Int8(plan.int8_block)
    if plan.method == "topk":
        return _TopK(plan.topk_ratio)
    raise AssertionError(f"no codec for method {plan.method!r}")


def _zeros_like_f32(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float32, device=device)


# -- DDP: comm hooks ------------------------------------------------------------------------


class _DDPCompressor:
    """A DDP comm hook's state: the codec, the per-bucket residuals, the counters."""

    def __init__(self, plan: CompressPlan, group: Any, stats: CommStats) -> None:
        self.codec = _codec(plan)
        self.feedback = plan.keeps_residual
        self.group = group
        self.world = dist.get_world_size(group)
        self.stats = stats
        # bucket index -> (ids of its parameters, residual): DDP rebuilds its buckets after
        # the first step, and a residual laid out for another bucket must not be added.
        self.residuals: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}
        stats.holders.append(self)

    def held(self) -> list[torch.Tensor]:
        return [t for _, t in self.residuals.values()]

    def residual(self, bucket: dist.GradBucket) -> torch.Tensor:
        key = tuple(id(p) for p in bucket.parameters())
        held = self.residuals.get(bucket.index())
        if held is not None and held[0] == key:
            return held[1]
        buf = bucket.buffer()
        fresh = _zeros_like_f32((buf.numel(),), buf.device)
        self.stats.residual_bytes += fresh.nbytes - (held[1].nbytes if held else 0)
        self.residuals[bucket.index()] = (key, fresh)
        return fresh

    def cast(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        assert isinstance(self.codec, _Cast)
        low = buf.div(self.world).to(self.codec.dtype)  # Note: [what travels]
        self.stats.record(low.nbytes, buf.nbytes)
        fut = dist.all_reduce(low, group=self.group, async_op=True).get_future()
        return fut.then(lambda f: buf.copy_(f.value()[0]))

    def gather(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        residual = self.residual(bucket) if self.feedback else None
        packed = self.codec.encode(buf, residual)
        out = torch.empty(self.world * packed.numel(), dtype=torch.uint8, device=buf.device)
        self.stats.record(packed.nbytes, buf.nbytes)
        work = dist.all_gather_single(out, packed, group=self.group, async_op=True)

        def reduce(_: Any = None) -> torch.Tensor:
            total = self.codec.decode_sum(out.view(self.world, -1), buf.numel())
            return buf.copy_(total.div_(self.world))

        if buf.device.type == "cpu":
            # Note: [decode on the autograd thread]
            work.wait()
            del packed
            done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            done.set_result(reduce())
            return done
        return work.get_future().then(reduce)


# Note: [decode on the autograd thread]
# A future's callback runs on gloo's threads, and the CPU allocator reports to torch's
# profiler per thread: a 100 MB tensor made inside the decode there did not move the
# measured peak, so every compressed DDP plan's measured peak read its decode's working
# memory (about 2.6x the bucket: the sum, a padded fp32 copy of each row's codes, the
# product) short, and a plan could be judged to fit that does not. On CPU the hook waits
# for its all-gather and decodes on the thread that runs backward, where the measurement
# sees it; the overlap it gives up is small there (gloo's threads and the backward share
# the same cores). On CUDA, where the device allocator's own statistics see every
# thread, the decode stays a callback.


def _cast_hook(state: _DDPCompressor,
               bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return state.cast(bucket)


def _gather_hook(state: _DDPCompressor,
                 bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return state.gather(bucket)


class _PowerSGD:
    """torch's PowerSGD hook and its state, with the bytes it hands to its all-reduces."""

    def __init__(self, plan: CompressPlan, group: Any, stats: CommStats) -> None:
        self.stats = stats
        self.state = torch_powersgd.PowerSGDState(
            process_group=group, matrix_approximation_rank=plan.powersgd_rank,
            start_powerSGD_iter=_POWERSGD_START, use_error_feedback=True, warm_start=True)
        # bucket index -> DDP's bucket storage, weakly: Note: [DDP's buckets as roots].
        self.buckets: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        stats.holders.append(self)

    def held(self) -> list[torch.Tensor]:
        s = self.state
        buckets = [st for ref in self.buckets.values() if (st := ref()) is not None]
        return [*(t for d in (s.error_dict, s.p_memory_dict, s.q_memory_dict)
                  for t in d.values()),
                *(torch.empty(0, dtype=torch.uint8, device=st.device).set_(st)
                  for st in buckets)]

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        s, buf = self.state, bucket.buffer()
        self.buckets[bucket.index()] = weakref.ref(buf.untyped_storage())
        vanilla = s.iter < s.start_powerSGD_iter
        before = s.total_numel_after_compression
        hook = _powersgd_on_this_thread if buf.device.type == "cpu" else _torch_powersgd_hook
        fut = hook(s, bucket)
        # The hook counts, per compressed matrix, its P and Q elements ((n + m) * rank) and
        # every other tensor whole: exactly what its three all-reduces are handed.
        sent = buf.numel() if vanilla else s.total_numel_after_compression - before
        self.stats.record(sent * buf.element_size(), buf.nbytes)
        return fut.then(self._held)

    def _held(self, fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        s = self.state
        self.stats.residual_bytes = sum(t.nbytes for t in s.error_dict.values())
        self.stats.state_bytes = sum(t.nbytes for d in (s.p_memory_dict, s.q_memory_dict)
                                     for t in d.values())
        return fut.value()


# Note: [PowerSGD on the autograd thread]
# torch's hook chains its work as future callbacks: the Ps all-reduce and the Qs, the
# orthogonalizations, and the decompress that writes P Q^T into the bucket and makes the
# new error-feedback tensor (a bucket-size copy) run on gloo's threads as each all-reduce
# finishes, where the CPU measurement does not see them (Note: [decode on the autograd
# thread]). On CPU the hook runs with its ``dist`` bound to a module whose ``all_reduce``
# waits and returns finished work: a finished future runs each ``then`` callback at once,
# on the calling thread, so the whole hook runs on the thread that runs backward. The
# hook's own code is used unchanged, under a copy of its globals; torch's module is not
# touched. tests/passes/test_compress.py fails if the hook stops reaching ``all_reduce``
# through its ``dist`` global.


class _WaitedWork:
    """A collective's Work that has already finished: its future holds ``[tensor]``."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._fut: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
        self._fut.set_result([tensor])

    def get_future(self) -> torch.futures.Future[list[torch.Tensor]]:
        return self._fut

    def wait(self, timeout: Any = None) -> bool:
        return True


class _WaitingDist:
    """``torch.distributed`` whose ``all_reduce`` waits for its collective."""

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)

    @staticmethod
    def all_reduce(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None,
                   async_op: bool = False) -> _WaitedWork:
        dist.all_reduce(tensor, op=op, group=group)
        return _WaitedWork(tensor)


_torch_powersgd_hook = torch_powersgd.powerSGD_hook
_powersgd_on_this_thread = types.FunctionType(
    _torch_powersgd_hook.__code__,
    {**_torch_powersgd_hook.__globals__, "dist": _WaitingDist()},
    _torch_powersgd_hook.__name__, _torch_powersgd_hook.__defaults__,
    _torch_powersgd_hook.__closure__)


# Note: [DDP's buckets as roots]
# With gradient_as_bucket_view the gradients are views of DDP's buckets, and the reducer
# keeps the buckets between steps: once zero_grad(set_to_none) dropped the views, nothing
# the peak measurement's roots reach holds them, and a step measured after DDP's rebuild
# (PowerSGD's, measured once it compresses: warmup_steps) would read its whole gradient
# short (the mlp example at 2 ranks: 51.12 MB of a 59.61 MB step).
# The hook sees each bucket, so its ``held()`` names their storages among the roots. It
# refers to them weakly: the first step's buckets, replaced by the rebuild, are freed where
# DDP drops them, not kept to the hook's next call.


def _powersgd_hook(state: _PowerSGD,
                   bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return state(bucket)


def _compress_ddp(model: DistributedDataParallel, plan: CompressPlan, group: Any,
                  stats: CommStats) -> None:
    if plan.method == "powersgd":
        stats.residual_where = ("torch's PowerSGDState.error_dict: one tensor per DDP bucket, "
                                "the bucket's size and dtype (the whole gradient per rank); "
                                "P and Q in state_bytes")
        model.register_comm_hook(_PowerSGD(plan, group, stats), _powersgd_hook)
        return
    state = _DDPCompressor(plan, group, stats)
    if state.feedback:
        stats.residual_where = ("the comm hook's state: one fp32 tensor per DDP bucket, the "
                                "bucket's size (the whole gradient per rank)")
    hook: Callable[..., Any] = _cast_hook if isinstance(state.codec, _Cast) else _gather_hook
    model.register_comm_hook(state, hook)


# -- FSDP2: custom reduce-scatter -----------------------------------------------------------


class _CompressedReduceScatter(ReduceScatter):
    """One FSDP2 unit's reduce-scatter on ``all_to_all_single`` of packed rows.

    Invariant: ``output`` is the sum (or, for op AVG, the mean) over ranks of their input's
    row ``rank``, up to the codec's error; with error feedback the residual is the unit's
    whole (ws, C) input in fp32 (each rank quantizes every row it sends).
    """

    def __init__(self, plan: CompressPlan, stats: CommStats) -> None:
        self.codec = _codec(plan)
        self.feedback = plan.keeps_residual
        self.stats = stats
        self.residual: torch.Tensor | None = None
        stats.holders.append(self)

    def held(self) -> list[torch.Tensor]:
        return [] if self.residual is None else [self.residual]

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _residual(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        if self.residual is None or tuple(self.residual.shape) != shape:
            old = self.residual.nbytes if self.residual is not None else 0
            self.residual = _zeros_like_f32(shape, device)
            self.stats.residual_bytes += self.residual.nbytes - old
        return self.residual

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op: Any, async_op: bool = False) -> None:
        world = group.size()
        rows = input_tensor.view(world, -1)  # row j: this rank's gradient for rank j's shard
        n = rows.shape[1]
        res = self._residual((world, n), rows.device) if self.feedback else None
        packed = torch.stack([self.codec.encode(rows[j], None if res is None else res[j])
                              for j in range(world)])
        received = torch.empty_like(packed)
        self.stats.record(packed.nbytes, input_tensor.nbytes)
        dist.all_to_all_single(received, packed, group=group)
        output_tensor.copy_(self.codec.decode_sum(received, n))
        _finish_op(output_tensor, op, world)
        # Synchronous: FSDP2 (foreach_reduce) calls it without async_op and reads the output.


class _PowerSGDReduceScatter(ReduceScatter):
    """One FSDP2 unit's reduce-scatter as PowerSGD: :class:`UnitPowerSGD`'s two all-reduces
    of rank-r factors (Note: [PowerSGD under FSDP2] in passes/_powersgd_fsdp.py).

    Invariant: ``output`` is this rank's shard of the rank-r approximation of the summed
    gradient-plus-residual matrices (the sum, or for op AVG the mean); parameters PowerSGD
    would not shrink 2x are summed exactly.
    """

    def __init__(self, unit: FSDPModule, plan: CompressPlan, stats: CommStats) -> None:
        self.unit = unit
        self.state = UnitPowerSGD(plan.powersgd_rank)
        self.stats = stats
        stats.holders.append(self)

    def held(self) -> list[torch.Tensor]:
        res = self.state.residual
        return [*([] if res is None else [res]), *self.state.qs]

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op: Any, async_op: bool = False) -> None:
        world = group.size()
        rows = input_tensor.view(world, -1)
        before = self.state.held_bytes()
        self.state.reset_if_changed(_grad_params(self.unit), world, rows.shape[1],
                                    rows.device)
        after = self.state.held_bytes()
        self.stats.residual_bytes += after[0] - before[0]
        self.stats.state_bytes += after[1] - before[1]
        sent = self.state.reduce_scatter(output_tensor, rows, group)
        self.stats.record(sent, input_tensor.nbytes)
        _finish_op(output_tensor, op, world)


def _finish_op(output: torch.Tensor, op: Any, world: int) -> None:
    """Turn the sum in ``output`` into what FSDP2's ``op`` asked for."""
    if op == dist.ReduceOp.AVG:
        output /= world
    elif op != dist.ReduceOp.SUM:
        raise PassError(f"the compressed reduce-scatter sums or averages, FSDP2 asked for "
                        f"{op}; leave set_force_sum_reduction_for_comms(True) as the "
                        "compress pass sets it.")


def _grad_params(unit: FSDPModule) -> list[Any]:
    """The unit's FSDPParams that each of its reduce-scatters holds, in the input's order:
    those that require grad (with set_reduce_scatter_unused_params(True), an unused one
    is there as zeros). Note: [FSDP2's comm interface]: private attributes, tested."""
    group = unit._get_fsdp_state()._fsdp_param_group
    return [] if group is None else [fp for fp in group.fsdp_params
                                     if fp.sharded_param.requires_grad]


def _compress_fsdp(units: list[FSDPModule], plan: CompressPlan, stats: CommStats) -> None:
    if plan.keeps_residual:
        stats.residual_where = ("each FSDP2 unit's custom reduce-scatter: one fp32 tensor the "
                                "size of the unit's unsharded gradient (its (world_size, "
                                "shard) input), i.e. the whole model's gradient per rank")
    if plan.method == "powersgd":
        stats.residual_where += "; the Qs (kept for warm start) in state_bytes"
    for unit in units:
        # Not recursive: every unit gets its own comm (and residual). Sum-only comms: the
        # custom comm then never sees PREMUL_SUM, and FSDP2 divides after it.
        comm: ReduceScatter
        if plan.method == "powersgd":
            comm = _PowerSGDReduceScatter(unit, plan, stats)
            # PowerSGD reads each parameter's place in the input from the unit's layout,
            # which holds only if every parameter is in every reduce-scatter.
            unit.set_reduce_scatter_unused_params(True, recurse=False)
        else:
            comm = _CompressedReduceScatter(plan, stats)
        unit.set_custom_reduce_scatter(comm)
        unit.set_force_sum_reduction_for_comms(True)


def compress_model(model: nn.Module, *, plan: CompressPlan, process_group: Any) -> nn.Module:
    """Compress ``model``'s gradient communication as ``plan.method`` says; returns ``model``.

    ``model`` is the shard pass's output: a DistributedDataParallel (ddp/zero1), which gets
    a comm hook, or a tree of FSDP2 units (zero2/zero3), each of which gets a compressed
    reduce-scatter (Note: [what travels]). The counters are ``comm_stats(model)``.

    Invariant: each step's reduced gradient equals the uncompressed one up to the method's
    error: bf16/fp16 the relative rounding of each rank's gradient (2**-8 / 2**-11, and of
    the sum for DDP's 16-bit all-reduce); int8 at most scale / 2 per element per rank
    (scale = block absmax / 127); topk the entries a rank did not send; powersgd its
    rank-r approximation (under DDP torch's hook, its first 2 steps uncompressed; under
    FSDP2 from the first step, and every unit reduce-scatters all its parameters, zeros
    for one without a gradient). With error feedback (int8, topk, powersgd), on every
    rank the sum over steps of what was sent equals the sum of its gradients minus the
    current residual.
    """
    if process_group is None:
        raise PassError(f"compress.method={plan.method!r} needs torch.distributed ranks: run "
                        "under torchrun with a shard strategy (the compress pass runs after "
                        "the shard pass), or set compress.method='none'.")
    stats = CommStats(method=plan.method)
    if isinstance(model, DistributedDataParallel):
        _compress_ddp(model, plan, process_group, stats)
    else:
        units: list[FSDPModule] = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if not units:
            raise PassError(
                f"compress.method={plan.method!r} found neither a DistributedDataParallel "
                f"wrapper nor FSDP2 units on {type(model).__name__}; the shard pass must run "
                "first (shard.strategy ddp, zero1, zero2 or zero3).")
        _compress_fsdp(units, plan, stats)
    setattr(model, _STATS_ATTR, stats)
    return model


# -- the pipeline entry and its memory report -----------------------------------------------


def _matrix_shapes(graph: ModelGraph) -> list[tuple[int, ...]]:
    """Shapes of the captured model's unique parameters (the blocks' graphs included when
    capture fell back to per-block graphs; the root's own parameters are then missing)."""
    seen: dict[int, tuple[int, ...]] = {}
    for gm in (graph.gm, *graph.block_graphs.values()):
        for p in gm.parameters():
            seen.setdefault(id(p), tuple(p.shape))
    return list(seen.values())


def powersgd_factor_bytes(graph: ModelGraph, rank: int) -> int:
    """fp32 bytes of PowerSGD's P and Q for ``graph``'s parameters at ``rank``: (n + m) * r
    per matrix it compresses (torch's rule: a 2-D view (n, m) is compressed when
    (n + m) * r * 2 < n * m, with r = min(n, m, rank))."""
    total = 0
    for shape in _matrix_shapes(graph):
        if len(shape) < 2:
            continue
        n = shape[0]
        m = math.prod(shape) // n
        r = min(n, m, rank)
        if (n + m) * r * 2 < n * m:
            total += (n + m) * r * 4
    return total


class CompressPass:
    """The pipeline entry for :func:`compress_model` (plan section ``compress``)."""

    section = "compress"
    invariant = ("the reduced gradient is the uncompressed one up to the method's error "
                 "(bf16/fp16 rounding, int8 scale/2 per element per rank, the unsent top-k "
                 "entries, PowerSGD's rank-r approximation); with error feedback the sum of "
                 "what a rank sent is the sum of its gradients minus its residual; the GPT "
                 "trains to the uncompressed loss within the test's tolerance")

    def enabled(self, section: CompressPlan) -> bool:
        return section.active

    def apply(self, model: nn.Module, section: CompressPlan, ctx: PassContext) -> nn.Module:
        return compress_model(model, plan=section, process_group=ctx.process_group)

    def memory(self, section: CompressPlan, graph: ModelGraph,
               terms: MemoryTerms) -> MemoryTerms:
        """Per-rank bytes. See Note: [memory of compression]."""
        if not section.active:
            return terms
        gradients = terms.gradients
        if section.keeps_residual:
            gradients += graph.param_bytes
        if section.method == "powersgd":
            gradients += powersgd_factor_bytes(graph, section.powersgd_rank)
        largest = max((b.param_bytes for b in graph.blocks), default=graph.param_bytes)
        return terms.replace(gradients=gradients, temporaries=terms.temporaries + largest)


# Note: [memory of compression]
# Error feedback (int8/topk with error_feedback, and PowerSGD) keeps, on every rank and
# between steps, a residual of everything that rank sends: under DDP one per bucket, the
# whole gradient; under FSDP2 one per unit of the reduce-scatter's input, the unit's
# *unsharded* gradient (each rank compresses every chunk it sends, not only its own), so
# the residuals add up to the whole model's gradient there too. It is fp32 (parameters
# are fp32 in every precision mode), so it adds param_bytes to the gradients term: under
# zero2/zero3 that is ws times the sharded gradients, more than ZeRO-2 saved on them.
# PowerSGD adds its P and Q (warm start keeps them): (n + m) * rank fp32 per matrix. Under
# FSDP2 its residual is the unit's padded (ws, C) input (dim 0 padded to a multiple of
# ws: a few rows more than param_bytes, not counted), and only Q is kept between steps; P
# lives during the unit's reduce-scatter, so counting it here over-estimates by n * rank
# fp32 per matrix (the pass sees only its own section, not the strategy).
# While one unit (or bucket) is compressed, a working copy of its gradient in fp32 (the
# decoded sum, the top-k input plus residual; PowerSGD's whole-sent parameters and one
# matrix's P Q^T) is live: the largest block's parameter bytes, among the temporaries
# (a DDP bucket larger than any block is not accounted).
