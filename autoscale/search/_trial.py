"""One measured trial: a plan (or the untouched baseline) built and measured for real.

The same two functions run inside a worker process (autoscale/search/_workers.py) and,
with ``isolate=False``, in the tuner's own process; either way the user's model is only
read: each trial trains a deep copy of it.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import statistics
import time
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autoscale.measure import Measurement, measure
from autoscale.plan import OptimizerPlan, Plan
from autoscale.runtime import build_result
from autoscale.runtime._batch import (
    Batch,
    LossFn,
    call_model,
    compute_loss,
    default_loss,
    to_device,
)
from autoscale.runtime._optimizers import build_optimizer

__all__ = ["freeze_long_lived", "loss_curve", "measure_baseline", "measure_plan", "thaw",
           "time_all_reduce"]


def measure_plan(plan: Plan, model: nn.Module, batch: Batch, *, loss_fn: LossFn | None,
                 graph: object, warmup: int, iters: int,
                 device: torch.device | str | None = None) -> Measurement:
    """Build ``plan`` on a copy of ``model`` (moved to ``device`` if given) and measure it."""
    from autoscale.passes.compress import comm_stats, warmup_steps

    # A compressor that starts late (DDP PowerSGD) is warmed up until it compresses, so
    # the measured step's memory and time are the compressed step's.
    warmup = max(warmup, warmup_steps(plan.compress, strategy=plan.shard.strategy))
    result = build_result(plan, model, loss_fn=loss_fn, graph=graph, device=device)
    try:
        stats = comm_stats(result.model)
        steps = _StatsZeroedAfterWarmup(result, stats, warmup)
        out = measure(steps, to_device(batch, result.device), warmup=warmup, iters=iters)
        if stats is not None and stats.calls:
            # The counters ran over the tracked and timed steps only, which all send the
            # same collectives.
            per_step = stats.bytes_sent // (1 + iters)
            return dataclasses.replace(out, comm_bytes_per_step=per_step)
        if plan.shard.strategy != "none":
            return dataclasses.replace(out, comm_bytes_per_step=_gradient_bytes(model))
        return out
    finally:
        del result
        free_memory()


class _StatsZeroedAfterWarmup:
    """``result`` as :func:`measure` takes it, with its comm counters zeroed before the
    step after the ``warmup`` first: they count the steady steps only."""

    def __init__(self, result: Any, stats: Any, warmup: int) -> None:
        self._result, self._stats, self._left = result, stats, warmup
        self.model, self.optimizer = result.model, result.optimizer

    @property
    def held_state(self) -> list[torch.Tensor]:
        return self._result.held_state

    def step(self, batch: Batch) -> float:
        if self._left == 0 and self._stats is not None:
            self._stats.reset()
        self._left -= 1
        return self._result.step(batch)


def measure_baseline(model: nn.Module, batch: Batch, *, loss_fn: LossFn | None,
                     optimizer: OptimizerPlan, warmup: int = 1, iters: int = 3,
                     device: torch.device | str | None = None) -> Measurement:
    """Measure the untouched model: a plain loop, whole batch, fp32, no rewrites.

    The optimizer is torch.optim's where it has the kind (its defaults), else autoscale's.
    The model is deep-copied (and moved to ``device`` if given); ``model`` is not changed.
    Inside a process group (a multi-rank trial) the baseline is plain DDP as a user writes
    it, ``DistributedDataParallel(model)`` with torch's defaults, on this rank's share.
    """
    model = copy.deepcopy(model)
    if device is not None:
        model.to(device)
    trained: nn.Module = model
    if dist.is_available() and dist.is_initialized():
        trained = DistributedDataParallel(model)
    kernel: Literal["torch", "auto"] = (
        "torch" if optimizer.kind in ("adamw", "adam", "sgd") else "auto")
    opt = build_optimizer(OptimizerPlan(kind=optimizer.kind, kernel=kernel,
                                        state_precision=optimizer.state_precision,
                                        kwargs=optimizer.kwargs), model.parameters())
    device = next(model.parameters()).device
    loss_fn = loss_fn or default_loss
    batch = to_device(batch, device)

    def step(b: Batch) -> float:
        model.train()
        loss = compute_loss(loss_fn, call_model(trained, b), b)
        loss.backward()
        loss = loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    out = measure(step, batch, model=model, optimizer=opt, warmup=warmup, iters=iters)
    free_memory()
    if trained is not model:
        out = dataclasses.replace(out, comm_bytes_per_step=_gradient_bytes(model))
    return out


def loss_curve(plan: Plan, model: nn.Module, batch: Batch, *, loss_fn: LossFn | None,
               graph: object, steps: int, seed: int = 0,
               device: torch.device | str | None = None) -> list[float]:
    """The losses of ``steps`` training steps of ``plan`` on ``batch`` from a fresh copy
    of ``model``, the RNG seeded with ``seed`` first (dropout draws the same masks for two
    plans that consume randomness alike): the convergence guardrail's A/B run."""
    torch.manual_seed(seed)
    result = build_result(plan, model, loss_fn=loss_fn, graph=graph, device=device)
    try:
        batch = to_device(batch, result.device)
        return [float(result.step(batch)) for _ in range(steps)]
    finally:
        del result
        free_memory()


def time_all_reduce(nbytes: int, *, device: torch.device | str = "cpu", reps: int = 5
                    ) -> float:  # fmt: skip
    """Seconds one all-reduce of ``nbytes`` (fp32) takes in this rank's process group: the
    median of ``reps`` after one to open the connections, each started together on every
    rank (a barrier first). Every rank must call it with the same arguments."""
    buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    dist.all_reduce(buf)
    times = []
    for _ in range(reps):
        dist.barrier()
        if buf.is_cuda:
            torch.cuda.synchronize(buf.device)
        start = time.perf_counter()
        dist.all_reduce(buf)
        if buf.is_cuda:
            torch.cuda.synchronize(buf.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gradient_bytes(model: nn.Module) -> int:
    """What an uncompressed step hands to its gradient reduction: every fp32 gradient byte
    (DDP's reducer and FSDP2's reduce-scatter are not instrumented; the compression pass
    counts what it sends itself). FSDP2's parameter all-gathers are not counted."""
    return sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def freeze_long_lived() -> bool:
    """Move every object this process holds now out of the garbage collector's reach
    (``gc.freeze``), so that the collection measure() runs before each tracked step walks
    only what the trials make since (Note: [a collection walks only what trials make]).
    Returns whether it froze anything: False where something (the user's program) had
    frozen objects already, which is left as it is.

    Note: [a collection walks only what trials make]
    A full gc.collect took 0.15-0.2 s in a process that has imported torch, optuna and the
    user's model (~310k tracked objects), and measure() runs one before every tracked step:
    3.4 s of a 17 s four-trial GPT tune. The objects made before the trials (modules,
    the model, its captured graph) live as long as the process measures, so walking them
    finds nothing; after ``gc.freeze`` the collection took under 0.1 ms. Garbage made by
    the trials' steps is younger than the freeze and is collected as before. Call it after
    the process's long-lived state is built; :func:`thaw` undoes it.
    """
    if gc.get_freeze_count():
        return False
    gc.freeze()
    return True


def thaw(froze: bool) -> None:
    """Undo :func:`freeze_long_lived` (given what it returned): the frozen objects are
    the collector's again."""
    if froze:
        gc.unfreeze()


def free_memory(*, collect: bool = False) -> None:
    """Return cached CUDA blocks between trials; with ``collect``, collect reference cycles
    first (after a failed trial, whose traceback holds its tensors).

    A successful trial needs no collection here: measure() collects before the next
    trial's tracked step, and a full gc.collect costs ~0.2 s in a process that has
    imported torch and optuna (4 s of a 21 s GPT tune when it ran after every trial).
    """
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
