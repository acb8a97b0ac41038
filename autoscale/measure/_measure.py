"""Measure a training step for real: throughput after warm-up, and peak memory.

Note: [timing is honest]
The CPU memory tracker records every op and allocation in torch's profiler, which slows a
step, so no timed step runs under it. :func:`measure` runs ``warmup`` steps (optimizer
state gets created, allocator caches and lazy inits settle), then ONE extra step under
the peak tracker (:func:`_peak_tracker`), then ``iters`` timed steps with nothing else
running. The tracked step comes before the timed ones so that any one-off cost it leaves
(e.g. freeing its trace) is not charged to them. Hence the parameters are updated exactly
``warmup + 1 + iters`` times by one call.

Note: [which CPU tracker]
On CPU the tracked step runs under :class:`~autoscale.measure._allocator.AllocatorPeakTracker`
(the c10 allocator's own reports), not the dispatch ledger
(:class:`~autoscale.measure._memory.PeakMemoryTracker`), whenever torch's profiler is free.
Measured on this 2-core VM (torch 2.13, bench in the commit message): on a plain MLP step
and an AdamW step both agree to the byte but for the 8-16 bytes of wrapped Python scalars
the ledger cannot see; with ``torch.utils.checkpoint`` the allocator also counts the
5 KB CPU RNG state the recompute saves; on an FSDP2 zero3 step (2 gloo ranks) the ledger
misses every ``UntypedStorage.resize_`` and was 3.1 MB (31%) high at the peak and 3.1 MB
high at the end, the allocator matching the hand count; on a ``torch.compile``d model the
ledger's ``TorchDispatchMode`` makes Dynamo run the model eagerly, then and on every later
call (so the timed steps after it timed eager code too): 14.46 MB reported for a
compiled step whose allocator peak is 12.16 MB. The ledger remains for other non-CUDA
devices and when a profiler is already running (torch allows one).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from autoscale.measure._allocator import AllocatorPeakTracker, profiler_is_free
from autoscale.measure._memory import PeakMemoryTracker

__all__ = ["Measurement", "measure"]


@dataclass(frozen=True, slots=True)
class Measurement:
    """What :func:`measure` observed. All times are wall-clock seconds.

    Invariants: ``step_time_s == median(step_times_s)``,
    ``samples_per_s == batch_size / step_time_s``,
    ``baseline_bytes <= peak_memory_bytes``.
    """

    samples_per_s: float
    """Training throughput: ``batch_size / step_time_s``."""
    step_time_s: float
    """Median of ``step_times_s``; the median shrugs off one slow step (GC, a page fault)."""
    step_times_s: tuple[float, ...]
    """Each timed step, in order (``iters`` of them)."""
    peak_memory_bytes: int
    """Peak bytes of live tensor storage during one step: on CPU the c10 allocator's
    (autoscale/measure/_allocator.py), on CUDA the caching allocator's."""
    baseline_bytes: int
    """Live bytes before that step: params, grads, optimizer state, batch (on CUDA:
    everything the allocator held)."""
    device: str
    """Where the step ran, e.g. ``"cpu"`` or ``"cuda:0"``."""
    batch_size: int
    """Samples per step, the numerator of ``samples_per_s``."""
    comm_bytes_per_step: int | None = None
    """Bytes this rank sent in collectives per optimizer step (filled from the compression
    pass's counters, not by :func:`measure`); None where nothing counted them (one
    process, an uncounted hook)."""
    first_step_s: float | None = None
    """Wall time of the first (warm-up) step, None with ``warmup=0``: one-off costs land
    there (torch.compile's compilation above all), kept apart from ``step_time_s``."""

    @property
    def first_step_overhead_s(self) -> float | None:
        """What the first step cost beyond a steady one (a compiled plan's compile time)."""
        if self.first_step_s is None:
            return None
        return max(0.0, self.first_step_s - self.step_time_s)

    def __post_init__(self) -> None:
        if not self.step_times_s or any(t <= 0 for t in self.step_times_s):
            raise ValueError(
                f"Measurement.step_times_s must be non-empty and positive, got {self.step_times_s}."
            )
        if self.batch_size < 1:
            raise ValueError(f"Measurement.batch_size must be >= 1, got {self.batch_size}.")


def measure(
    step: Callable[[Any], Any] | Any,
    batch: Any,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    batch_size: int | None = None,
    warmup: int = 2,
    iters: int = 5,
    device: torch.device | str | None = None,
) -> Measurement:
    """Run real training steps and report throughput and peak memory.

    Runs ``warmup`` untimed steps, one step under the peak-memory tracker, then
    ``iters`` timed steps (see Note: [timing is honest]): the model is trained by
    ``warmup + 1 + iters`` steps, as it would be in a real run.

    Args:
        step: either ``step(batch) -> loss`` doing forward, backward and optimizer step,
            or an object with ``.step(batch)``, ``.model`` and ``.optimizer`` (such as
            autoscale's ``Result``), whose model and optimizer are used when the
            arguments are not given.
        batch: what ``step`` takes: a tensor, a tuple/list of tensors or a dict of them.
        model, optimizer: what is live across steps; with ``batch`` they are the roots
            of the CPU memory baseline. Leaving them out on CPU under-counts the baseline
            (the storages then count from the first op that touches them).
        batch_size: samples per step; default: dim 0 of the first tensor in ``batch``.
        warmup: untimed steps before measuring (>= 0).
        iters: timed steps (>= 1).
        device: where memory is tracked; default: the first tensor in ``batch``, else
            the model's parameters, else CPU. On CUDA, steps are synchronized.

    Returns:
        A :class:`Measurement`.

    Raises:
        TypeError: ``step`` is neither callable nor has ``.step``.
        ValueError: bad ``warmup``, ``iters`` or ``batch_size``, or no tensor in ``batch``
            to infer the batch size from.
    """
    step_fn, model, optimizer = _unpack_step(step, model, optimizer)
    if warmup < 0:
        raise ValueError(f"measure(warmup={warmup}): warmup must be >= 0.")
    if iters < 1:
        raise ValueError(f"measure(iters={iters}): iters must be >= 1 to time anything.")
    if batch_size is None:
        batch_size = _infer_batch_size(batch)
    elif batch_size < 1:
        raise ValueError(f"measure(batch_size={batch_size}): batch_size must be >= 1.")
    dev = _resolve_device(batch, model, device)
    sync = _synchronizer(dev)

    first: float | None = None
    for i in range(warmup):
        start = time.perf_counter()
        step_fn(batch)  # the loss is dropped at once so it is not live in the next step
        if i == 0:
            sync()
            first = time.perf_counter() - start
    sync()
    # Garbage in reference cycles from earlier steps would otherwise sit in the CUDA
    # baseline, or be freed at a random point inside the tracked step.
    gc.collect()

    # Held between steps beyond the model and optimizer (a Result's compression residuals):
    # live at the step's start like them, so part of the baseline. No name here keeps
    # that list: a residual the step replaces is freed inside it (Note: [the tracker does
    # not keep its roots alive] in autoscale/measure/_memory.py).
    roots = (model, optimizer, batch, getattr(step, "held_state", ()))
    tracker = _peak_tracker(roots, dev)
    del roots
    with tracker:
        step_fn(batch)

    times: list[float] = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        step_fn(batch)
        sync()
        times.append(time.perf_counter() - start)

    median = statistics.median(times)
    return Measurement(
        samples_per_s=batch_size / median,
        step_time_s=median,
        step_times_s=tuple(times),
        peak_memory_bytes=tracker.peak_bytes,
        baseline_bytes=tracker.baseline_bytes,
        device=str(dev),
        batch_size=batch_size,
        first_step_s=first,
    )


def _peak_tracker(
    roots: Any, dev: torch.device
) -> AllocatorPeakTracker | PeakMemoryTracker:
    """The tracker for the tracked step; see Note: [which CPU tracker]."""
    if dev.type == "cpu" and profiler_is_free():
        return AllocatorPeakTracker(roots=roots, device=dev)
    return PeakMemoryTracker(roots=roots, device=dev)


def _unpack_step(
    step: Any, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None
) -> tuple[Callable[[Any], Any], torch.nn.Module | None, torch.optim.Optimizer | None]:
    # A Result-like object is checked first: it may also be callable.
    if callable(getattr(step, "step", None)):
        model = model if model is not None else getattr(step, "model", None)
        optimizer = optimizer if optimizer is not None else getattr(step, "optimizer", None)
        return step.step, model, optimizer
    if callable(step):
        return step, model, optimizer
    raise TypeError(
        f"measure(step=...) got a {type(step).__name__}, which is neither callable nor has "
        "a .step(batch) method; pass a function step(batch) -> loss or an autoscale Result."
    )


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(values, (list, tuple)) or isinstance(obj, Mapping):
        for v in values:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _infer_batch_size(batch: Any) -> int:
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError(
            f"measure() cannot infer the batch size from a {type(batch).__name__} "
            "with no tensor of dim >= 1 in it; pass batch_size=."
        )
    if t.shape[0] < 1:
        raise ValueError(f"measure(): the first tensor in batch has dim 0 of size {t.shape[0]}.")
    return int(t.shape[0])


def _resolve_device(
    batch: Any, model: torch.nn.Module | None, device: torch.device | str | None
) -> torch.device:
    if device is not None:
        dev = torch.device(device)
    elif (t := _first_tensor(batch)) is not None:
        dev = t.device
    elif model is not None and (p := next(model.parameters(), None)) is not None:
        dev = p.device
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        # "cuda" and "cuda:0" must name the same device in the Measurement and the stats.
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _synchronizer(dev: torch.device) -> Callable[[], None]:
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None
