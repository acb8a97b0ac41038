"""Peak CPU memory of a region of code, from the c10 CPU allocator's own reports.

With ``profile_memory=True`` torch's profiler records one event per allocation and per free
that goes through c10's CPU allocator, with the block's address and size. That is every
tensor storage on CPU, whoever asked for it: aten kernels (their internal temporaries
too), autograd, optimizer ``_foreach_*`` ops, code compiled by Inductor (its buffers come
from ``empty_strided``), and ``UntypedStorage.resize_`` (FSDP2 allocates and frees its
unsharded parameters, the all-gather outputs, that way). The tracker replays those events
in time order: the peak is the baseline plus the highest running sum of the deltas.

Note: [what the allocator trace cannot know]
1. What was live before the region. The allocator keeps no running total unless it was
   tracing when the block was allocated, so the baseline is counted from ``roots``
   (parameters, grads, optimizer state, the batch), each storage once, as
   :func:`~autoscale.measure._memory.live_bytes` does.
2. Frees of blocks allocated before the region. The allocator reports a free only for a
   block it saw allocated while a trace was on (any earlier trace in the process: its
   table outlives the trace, and a block allocated by one trace and freed untraced stays
   in it). So frees are matched by address to allocations made inside the region, and
   every other free is dropped; a root storage freed inside the region (the previous
   step's grads, freed by a ``zero_grad`` at the start of the step) is seen instead by a
   weak reference on its storage, whose callback drops a named marker into the same trace
   (``record_function``), so it lands on the trace's own clock, in order.
   Measured: without the address match, a root freed by a step whose grads an earlier
   trace allocated counted twice (the allocator's free and the marker), 5.3 MB low on a
   21 MB step.
What neither sees: memory allocated before the region that no root reaches (counted
nowhere, as in the ledger); a root storage that is resized inside the region (its old
block's free is missed, so the peak is high by its size); blocks allocated and freed by
threads the profiler does not follow (autograd on CPU runs on the calling thread; for
frees on gloo's threads see Note: [frees on untraced threads]); allocator
rounding (c10 reports the requested bytes; its 64-byte alignment is not counted).

Note: [frees on untraced threads]
The profiler follows a thread only while it runs traced work: gloo's worker threads are
traced while they run a collective (their temporaries show up), but the Work object, and
the copy of the input that gloo's reduce-scatter makes on the calling thread, is often
released by the worker after the collective finished, untraced (which thread drops the
Work last is a race). Such a block either is allocated inside a ``c10d::`` op (the
ProcessGroup collectives take their outputs from the caller, so what they allocate is
their own temporary), or has its address allocated again with no free between. Its free
is placed at the end of the outermost op that allocated it (``FSDP::post_backward_reduce``
inside its autograd node), or at the reuse if that is earlier. Measured on FSDP2 zero3,
3 blocks of 1 MiB, 2 gloo ranks: 0 to 2 of the 3 reduce-scatter copies per step were
freed untraced; counted as live until their address came back (or to the end) they put
one or two whole units' gradients (1-2 MiB, +10-20%) on the peak, at random.
The same race frees FSDP2's all-gather outputs: FSDP allocates one unit's flat output
inside ``FSDP::all_gather (unit)`` (not inside the ``c10d::`` op, which is handed it), and
gloo's Work holds it too. FSDP drops it at that unit's ``FSDP::all_gather_copy_out``
(in backward), or, in forward, keeps it until the next unit's copy-out starts or the
root's ``FSDP::post_forward`` ends (to overlap copy-in with the next all-gather:
``AllGatherState`` in torch's ``_fsdp_param_group.py``). An output never freed in the
trace is freed there. Measured on HF GPT-2 zero3 with 2 micro-batches, 2 gloo ranks: the
last unit's output (793088 bytes) was freed untraced in 5 of 10 steps, and counted to
the end it put the peak at 18.53 MiB against 17.78 in the other 5. Any other block never
freed in the trace stays live to the end (``end_bytes`` counts it).

Note: [profiler logging]
Kineto prints a ``USDT: ... profiler_start`` line on stderr each time a trace starts and
stops, and reads its log level once, at the first trace. :func:`_quiet_kineto` sets
``KINETO_LOG_LEVEL=6`` (above its highest level) before that first trace unless the user
set it. c10 also logs once per process "Memory block of unknown size was allocated before
the profiling started" when a pre-region block is freed inside a trace; that is the case
of Note 2 above and harmless.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch

# Adapter: the private torch APIs of this module, all used in _AllocatorTrace and
# _trace_events, and checked by tests/measure/test_allocator.py::test_private_torch_api.
from torch._C._profiler import _EventType
from torch.autograd.profiler import profile, record_function

from autoscale.measure._memory import _iter_root_tensors, _on_device, _storages

__all__ = ["AllocatorPeakTracker", "profiler_is_free"]

_ROOT_FREE = "autoscale::root_free::"
"""Name prefix of the markers a root storage's free leaves in the trace (bytes follow)."""


class AllocatorEvent(NamedTuple):
    """One CPU allocator report: ``nbytes > 0`` an allocation at ``ptr``, ``< 0`` a free.

    ``scope_end_ns`` is when the outermost traced op around it ended (on its thread);
    ``in_collective``: it was allocated inside a ``c10d::`` op, a ProcessGroup collective
    whose outputs the caller passed in, so whatever it allocates is the collective's own.
    """

    time_ns: int
    ptr: int
    nbytes: int
    scope_end_ns: int
    in_collective: bool = False
    gathered_for: str | None = None
    """Allocated inside ``FSDP::all_gather<unit>`` (outside any ``c10d::`` op): the unit
    suffix, e.g. ``" (transformer.h.3)"``, or ``""`` for the root's unit."""


class _Marker(NamedTuple):
    time_ns: int
    name: str


class FsdpSpan(NamedTuple):
    """One FSDP2 ``all_gather_copy_out`` or ``post_forward`` op, as the trace timed it."""

    start_ns: int
    end_ns: int
    name: str
    in_forward: bool  # under an ``FSDP::pre_forward`` op


_GATHER = "FSDP::all_gather"
_COPY_OUT = "FSDP::all_gather_copy_out"
_ROOT_POST_FORWARD = "FSDP::post_forward"  # the root unit's: FSDP labels it without an fqn


@functools.cache
def _quiet_kineto() -> None:
    """See Note: [profiler logging]."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def profiler_is_free() -> bool:
    """True when no torch profiler runs in this process, so a tracker can start one."""
    return not torch._C._autograd._profiler_enabled()


class _AllocatorTrace:
    """The one place that drives torch's profiler: start, mark, stop, read events."""

    def __init__(self) -> None:
        _quiet_kineto()
        # use_kineto with CPU only: ops and allocator reports, no device activity; the
        # Python-side event parsing is lazy and never triggered (kineto_results is read).
        self._prof = profile(use_cpu=True, use_device=None, profile_memory=True,
                             use_kineto=True)

    def start(self) -> None:
        self._prof.__enter__()

    def stop(self) -> tuple[list[AllocatorEvent], list[_Marker], list[FsdpSpan]]:
        """End the trace; the CPU allocator's events, the markers and FSDP2's copy-out and
        post-forward ops, in no set order."""
        self._prof.__exit__(None, None, None)
        result = self._prof.kineto_results
        if result is None:
            raise RuntimeError(
                f"torch {torch.__version__}'s profiler returned no results, so autoscale's "
                "CPU peak tracker has nothing to read; update autoscale/measure/_allocator.py "
                "(_AllocatorTrace) for this torch."
            )
        return _trace_events(result.experimental_event_tree())

    @staticmethod
    def mark(name: str) -> None:
        """Leave an instant named event in the running trace (no-op when none runs)."""
        with record_function(name):
            pass


def _trace_events(roots: list[Any]) -> tuple[list[AllocatorEvent], list[_Marker],
                                              list[FsdpSpan]]:
    allocs: list[AllocatorEvent] = []
    markers: list[_Marker] = []
    spans: list[FsdpSpan] = []
    # Allocations are children of the op that made them, at any depth; each carries the
    # end of its outermost op (see Note: [frees on untraced threads]).
    stack: list[tuple[Any, int, bool, str | None, bool]] = [
        (ev, ev.end_time_ns, False, None, False) for ev in roots]
    while stack:
        ev, scope_end, in_c10d, gather, forward = stack.pop()
        name = ev.name
        in_c10d = in_c10d or name.startswith("c10d::")
        forward = forward or name.startswith("FSDP::pre_forward")
        if name.startswith(_COPY_OUT) or name == _ROOT_POST_FORWARD:
            spans.append(FsdpSpan(ev.start_time_ns, ev.end_time_ns, name, forward))
        elif name.startswith(_GATHER):
            gather = name[len(_GATHER):]
        stack.extend((child, scope_end, in_c10d, gather, forward) for child in ev.children)
        if ev.tag == _EventType.Allocation:
            fields = ev.extra_fields
            if fields.device.type == "cpu":
                allocs.append(AllocatorEvent(ev.start_time_ns, fields.ptr, fields.alloc_size,
                                             max(scope_end, ev.start_time_ns), in_c10d,
                                             None if in_c10d else gather))
        elif name.startswith(_ROOT_FREE):
            markers.append(_Marker(ev.start_time_ns, name))
    return allocs, markers, spans


def _gather_output_freed_ns(block: AllocatorEvent, spans: Sequence[FsdpSpan]) -> int | None:
    """When FSDP2 let go of an all-gather output (Note: [frees on untraced threads]):
    the end of its unit's next copy-out in backward; in forward the next copy-out's start
    or the root's post-forward end after it. None: no copy-out of its unit followed."""
    copy_out = f"{_COPY_OUT}{block.gathered_for}"
    mine = min((s for s in spans if s.name == copy_out and s.start_ns >= block.time_ns),
               key=lambda s: s.start_ns, default=None)
    if mine is None:
        return None
    if not mine.in_forward:
        return mine.end_ns
    after = [s.start_ns if s.name != _ROOT_POST_FORWARD else s.end_ns
             for s in spans if s.start_ns > mine.end_ns]
    return min(after, default=mine.end_ns)


def replay(baseline: int, allocs: list[AllocatorEvent], root_frees: list[tuple[int, int]],
           spans: Sequence[FsdpSpan] = ()) -> tuple[int, int]:
    """Peak and final live bytes: ``baseline`` plus the running sum of the deltas in order.

    ``root_frees`` are ``(time_ns, nbytes)`` of storages live at the start and freed inside.
    A free counts only if its address was allocated earlier in ``allocs`` (see Note:
    [what the allocator trace cannot know]); a block whose address is allocated again
    with no free between, a collective's temporary never freed, or an FSDP2 all-gather
    output never freed (placed by ``spans``), was freed by an untraced thread (Note:
    [frees on untraced threads]).
    """
    deltas: list[tuple[int, int]] = [(t, -n) for t, n in root_frees]
    live: dict[int, AllocatorEvent] = {}
    for ev in sorted(allocs, key=lambda e: e.time_ns):
        if ev.nbytes > 0:
            lost = live.pop(ev.ptr, None)
            if lost is not None:
                deltas.append((min(lost.scope_end_ns, ev.time_ns), -lost.nbytes))
            live[ev.ptr] = ev
            deltas.append((ev.time_ns, ev.nbytes))
        elif (block := live.pop(ev.ptr, None)) is not None:
            deltas.append((ev.time_ns, -block.nbytes))
    # A collective's temporary never freed in the trace was freed with its Work, untraced.
    deltas += [(b.scope_end_ns, -b.nbytes) for b in live.values() if b.in_collective]
    for b in live.values():
        if b.gathered_for is not None:
            freed = _gather_output_freed_ns(b, spans)
            if freed is not None:
                deltas.append((freed, -b.nbytes))
    deltas.sort(key=lambda d: d[0])  # stable: ties keep allocation-before-free order
    total = peak = baseline
    for _, nbytes in deltas:
        total += nbytes
        peak = max(peak, total)
    return peak, total


class AllocatorPeakTracker:
    """Context manager: peak bytes of CPU tensor memory in a region, from the allocator.

    ``with AllocatorPeakTracker(roots=(model, optimizer, batch)) as t: step(batch)``, then
    read ``t.baseline_bytes``, ``t.peak_bytes`` and ``t.end_bytes``; the same interface as
    :class:`~autoscale.measure._memory.PeakMemoryTracker`, for CPU only.

    Invariants: ``baseline_bytes <= peak_bytes`` and ``end_bytes <= peak_bytes``; the
    baseline is the distinct CPU storages under ``roots``; every allocation and free made
    through c10's CPU allocator on a traced thread inside the region moves the running
    total, so views, in-place ops and tied weights cost nothing and Inductor's buffers and
    ``UntypedStorage.resize_`` count. See Note: [what the allocator trace cannot know].

    A tracker is single-use and not reentrant; it cannot run inside another torch
    profiler (torch allows one at a time).
    """

    def __init__(self, roots: Any = (), *, device: torch.device | str | None = None) -> None:
        """
        Args:
            roots: what is live at the start (modules, optimizers, tensors, nested
                containers); their CPU storages form the baseline. Held only until the
                region starts: Note: [the tracker does not keep its roots alive].
            device: must be CPU (or None); other devices have their own trackers.
        """
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type != "cpu":
            raise ValueError(
                f"AllocatorPeakTracker(device={str(self.device)!r}) reads the CPU allocator "
                "only; use autoscale.measure._memory.PeakMemoryTracker for other devices."
            )
        self._roots = roots
        self.baseline_bytes = self.peak_bytes = self.end_bytes = 0
        self._trace: _AllocatorTrace | None = None
        # id(storage) -> weakref with a free callback; the refs must stay referenced.
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        self._used = False

    def __enter__(self) -> AllocatorPeakTracker:
        if self._used:
            raise RuntimeError(
                "AllocatorPeakTracker is single-use; create a new tracker for each region."
            )
        self._used = True
        for st in self._root_storages():
            if id(st) not in self._refs:  # tied weights and views: one storage, once
                callback = functools.partial(_mark_root_free, st.nbytes())
                self._refs[id(st)] = weakref.ref(st, callback)
                self.baseline_bytes += st.nbytes()
        self._roots = ()  # Note: [the tracker does not keep its roots alive]
        self._trace = _AllocatorTrace()
        self._trace.start()
        return self

    def _root_storages(self) -> Iterator[torch.UntypedStorage]:
        for t in _iter_root_tensors(self._roots):
            for st in _storages(t):
                if _on_device(st, self.device):
                    yield st

    def __exit__(self, *exc: object) -> None:
        assert self._trace is not None
        # Disarm the callbacks first: a root freed after this is not in the region.
        self._refs.clear()
        allocs, markers, spans = self._trace.stop()
        self._trace = None
        root_frees = [(m.time_ns, int(m.name[len(_ROOT_FREE):])) for m in markers]
        self.peak_bytes, self.end_bytes = replay(self.baseline_bytes, allocs, root_frees,
                                                 spans)


def _mark_root_free(nbytes: int, _ref: object) -> None:
    _AllocatorTrace.mark(f"{_ROOT_FREE}{nbytes}")
