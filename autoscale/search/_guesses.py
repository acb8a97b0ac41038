"""The cost model's best guesses: which plans a tune measures first.

Note: [the cost model orders the candidates]
A measured trial costs seconds to minutes; an estimate costs one fake forward and backward.
So before the search, the tuner estimates a coarse grid of the space (every micro-batch
size, precision, optimizer and, across ranks, sharding strategy and compressor; the
checkpoint knob at its two ends and its middle) for peak memory (the simulated step, the
same estimate that prunes trials: Note: [pruning on the estimate]) and step time (the
priced simulated step, autoscale/cost/_time.py, at this machine's rates refined on the
measured baseline), drops the plans the memory estimate puts over the budget, and queues
the fastest few for measurement right after the known-good plans (the untouched model's
and the frugal one). The sampler then starts from measured plans that can win instead of
random ones; with the few trials a user grants (a fifth of a small grid or less), that
is where most of the search's quality comes from.

The grid is coarse on purpose: its size is the product of the knobs' choices, so the
checkpoint knob's 21 budgets would multiply it tenfold, while its ends and middle already
say whether checkpointing pays and TPE refines the budget around the measured winners.
Ranking stops at a time limit (the tuner gives it what measuring the baseline took) and
says how many it priced. Candidates are visited largest micro-batch and least
checkpointing first, the plans that run fastest when they fit, so a cut drops the small
micro-batches with heavy recomputation, which rarely win, rather than a random share.
A model the estimator cannot simulate, or a device without calibrated rates, gets no
guesses, with the reason: the search then runs as before.

The estimates run the user's model (on fake tensors), over many plans at once, so the
pricing runs in a forked child of the tuner (``ChildStream``), which sends each priced
plan back as it goes: a model that crashes or hangs under some plan costs the tune the
plans not priced yet, never the tuner (its trials then fail alone in their workers, as
every measured trial does). With one rank the child prices while the tuner measures the
baseline, so the ranking mostly hides behind that measurement.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pickle
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autoscale.plan import Plan

__all__ = ["ChildStream", "Guess", "best_guesses", "candidate_params", "pick_guesses",
           "price_candidates"]


@dataclass(frozen=True)
class Guess:
    """One candidate as the cost model sees it."""

    params: dict[str, Any]
    plan: Plan
    estimated_bytes: int
    estimated_step_s: float


def candidate_params(space: Any) -> list[dict[str, Any]]:
    """The coarse grid over ``space``'s knobs (a SearchSpace): every combination of
    micro-batch size, precision, optimizer, compile mode and, across ranks, strategy and
    compressor, with the checkpoint knob at its ends and middle. Each entry is a
    parameter dict that ``space.plan_from`` and ``study.enqueue_trial`` take."""
    if space.solves_checkpoints:
        ckpt = [{"activation_budget": f} for f in (1.0, 0.5, 0.0)]
    elif space.block_names:
        n = len(space.block_names)
        ckpt = [{"checkpointed_blocks": b} for b in sorted({0, n // 2, n})]
    else:
        ckpt = [{"checkpointed_blocks": 0}]
    axes: list[list[dict[str, Any]]] = [
        [{"micro_batch_size": m} for m in space.micro_batch_sizes],
        [{"precision": p} for p in space.precisions],
        ckpt,
    ]
    if len(space.optimizers) > 1:
        axes.append([{"optimizer": i} for i in range(len(space.optimizers))])
    if len(space.compile_modes) > 1 and not space.distributed:
        axes.append([{"compile": c} for c in space.compile_modes])
    if space.distributed:
        from autoscale.search._study import _compress_param

        axes.append([{"shard": s, _compress_param(s): c} for s in space.strategies
                     for c in space.compressors_for(s)])
    out = []
    for combo in itertools.product(*axes):
        params: dict[str, Any] = {}
        for part in combo:
            params.update(part)
        out.append(params)
    return out


def _promise(params: dict[str, Any]) -> tuple[float, float]:
    """Sort key: larger micro-batches first, then less checkpointing (sorted() is stable,
    so the other knobs keep the grid's order)."""
    ckpt = params.get("activation_budget", -params.get("checkpointed_blocks", 0))
    return -params["micro_batch_size"], -ckpt


def price_candidates(space: Any, base: Plan, *, memory: Callable[[Plan], int],
                     step_time: Callable[[Plan], float], budget: int | None,
                     emit: Callable[[tuple[Any, ...]], None],
                     time_limit_s: float = 60.0) -> None:
    """Price ``space``'s coarse grid (candidate_params), most promising first, and
    ``emit`` one event per candidate as it goes: ``("guess", Guess)`` for a plan the cost
    model expects to fit ``budget`` (``memory(plan) <= budget``), ``("over",)`` for one it
    does not, ``("failed",)`` for one the plan rules or the estimators refuse, and
    ``("grid", n)`` first. ``memory`` and ``step_time`` are the estimators (per-rank peak
    bytes; seconds a step of the same global batch, so steps compare as throughput).
    Never measures anything; stops past ``time_limit_s``. Events go out one by one so that
    a reader may stop listening at any time and keep what came (see ``ChildStream``)."""
    grid = sorted(candidate_params(space), key=_promise)
    emit(("grid", len(grid)))
    start = time.monotonic()
    seen: set[str] = set()
    for params in grid:
        if time.monotonic() - start > time_limit_s:
            break
        try:
            plan = space.plan_from(params, base)
        except Exception:  # a combination the plan rules refuse
            emit(("failed",))
            continue
        key = plan_key(plan)
        if key in seen:
            continue
        seen.add(key)
        try:
            peak = memory(plan)
            if budget is not None and peak > budget:
                emit(("over",))
                continue
            seconds = step_time(plan)
        except Exception:  # the estimator cannot price it: not a guess
            emit(("failed",))
            continue
        emit(("guess", Guess(params, plan, peak, seconds)))


def pick_guesses(events: list[tuple[Any, ...]], k: int, *, took_s: float,
                 stopped: str | None = None, scale: float = 1.0,
                 ) -> tuple[list[Guess], str]:  # fmt: skip
    """The ``k`` fastest guesses among ``events`` (price_candidates'), their step times
    times ``scale``, and the one-line note the tune prints; ``stopped`` says why pricing
    ended early, if it did."""
    grid = next((e[1] for e in events if e[0] == "grid"), 0)
    priced = sorted((dataclasses.replace(e[1], estimated_step_s=e[1].estimated_step_s * scale)
                     for e in events if e[0] == "guess"), key=lambda g: g.estimated_step_s)
    over = sum(1 for e in events if e[0] == "over")
    failed = sum(1 for e in events if e[0] == "failed")
    done = len(priced) + over + failed
    cut = f" (stopped: {stopped})" if stopped else ""
    note = (f"cost model: {done} plans of a {grid}-point grid estimated in {took_s:.1f} s"
            f"{cut}; {over} over the budget, {failed} not estimable; the "
            f"{min(k, len(priced))} fastest estimated queued first")
    return priced[:k], note


def priced_step_times(events: list[tuple[Any, ...]], scale: float = 1.0) -> dict[str, float]:
    """Every priced plan's estimated step seconds (times ``scale``), keyed by its JSON
    (``plan_key``): what the search refines and records against each measured trial."""
    return {plan_key(e[1].plan): e[1].estimated_step_s * scale
            for e in events if e[0] == "guess"}


def plan_key(plan: Plan) -> str:
    """A plan's identity for look-ups: its JSON with sorted keys."""
    return json.dumps(plan.to_dict(), sort_keys=True)


def best_guesses(space: Any, base: Plan, *, memory: Callable[[Plan], int],
                 step_time: Callable[[Plan], float], budget: int | None, k: int,
                 time_limit_s: float = 60.0,
                 ) -> tuple[list[Guess], str]:  # fmt: skip
    """Up to ``k`` distinct plans of ``space``'s coarse grid that the cost model expects to
    fit ``budget``, fastest estimated step first, with the note; in this process (the
    tuner prices in a child: ``ChildStream``). See Note: [the cost model orders the
    candidates] and ``price_candidates``."""
    events: list[tuple[Any, ...]] = []
    start = time.monotonic()
    price_candidates(space, base, memory=memory, step_time=step_time, budget=budget,
                     emit=events.append, time_limit_s=time_limit_s)
    took = time.monotonic() - start
    stopped = f"{time_limit_s:.0f} s" if took > time_limit_s else None
    return pick_guesses(events, k, took_s=took, stopped=stopped)


def _idle_priority() -> None:
    """Run this process only on cycles nothing else wants.

    The pricing child runs beside the baseline's measurement. At normal priority, and even
    at nice 19, the measured step's OpenMP threads lost their cores to it whenever they
    slept between parallel regions and woke to find it running: steps of the mlp example
    measured 50-1170 ms beside it against 13-16 ms alone. Under SCHED_IDLE (Linux) a
    waking thread of any other process preempts it at once; elsewhere nice 19 is the best
    there is."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        os.nice(19)


class ChildStream:
    """``produce(emit)`` run in a forked child, each emitted event sent back at once, so
    the parent keeps what came whatever happens after: the child raising, crashing,
    hanging, or being stopped at the parent's deadline.

    The child runs torch on one thread (a fork's copy of the parent's thread pool must not
    be entered) and leaves with ``os._exit``, so nothing of the parent's (open files,
    database connections) is closed or flushed twice. Where there is no fork (not POSIX)
    ``produce`` runs in ``collect``, in this process."""

    def __init__(self, produce: Callable[[Callable[[Any], None]], None]) -> None:
        self._produce = produce
        self._start = time.monotonic()
        self.pid = 0
        if not hasattr(os, "fork"):
            return
        import torch

        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read)
            out = os.fdopen(write, "wb")

            def emit(event: Any) -> None:
                data = pickle.dumps(event)
                out.write(len(data).to_bytes(8, "little") + data)
                out.flush()

            try:
                torch.set_num_threads(1)
                _idle_priority()
                produce(emit)
            except BaseException as err:  # everything goes back as a reason
                line = (str(err).splitlines() or [""])[0][:200]
                emit(("error", f"{type(err).__name__}: {line}"))
            out.close()
            os._exit(0)
        os.close(write)
        self.pid, self._read = pid, os.fdopen(read, "rb", buffering=0)

    def close(self) -> None:
        """Kill the child if it was never collected (the tune stopped before it asked)."""
        if self.pid > 0:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = -1
            self._read.close()

    def collect(self, deadline: float) -> tuple[list[Any], str | None, float]:
        """Every event the child sent until it finished or ``deadline`` (time.monotonic),
        when it is killed; why it stopped early (None: it finished), and the seconds since
        it started."""
        if self.pid < 0:
            raise RuntimeError("ChildStream.collect: already collected or closed")
        if not self.pid:
            events: list[Any] = []
            self._produce(events.append)
            return events, None, time.monotonic() - self._start
        events, buffer, why = [], b"", None
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._read], [], [], left)[0]:
                    why = "time limit"
                    break
                chunk = self._read.read(1 << 16)
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= 8:  # whole length-prefixed events only
                    end = 8 + int.from_bytes(buffer[:8], "little")
                    if len(buffer) < end:
                        break
                    events.append(pickle.loads(buffer[8:end]))
                    buffer = buffer[end:]
        finally:  # Ctrl-C included: the child goes with the tuner
            if why is not None or sys.exc_info()[0] is not None:
                os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            self.pid = -1
            self._read.close()
        took = time.monotonic() - self._start
        errors = [e[1] for e in events if e[0] == "error"]
        if why is None and os.WIFSIGNALED(status):
            why = f"crashed: {signal.Signals(os.WTERMSIG(status)).name}"
        return [e for e in events if e[0] != "error"], why or (errors[0] if errors else None), took
