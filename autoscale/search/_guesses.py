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
ranking runs in a forked child of the tuner (``in_child``) with a time limit: a model
that crashes or hangs under some plan costs the tune its guesses, never the tuner (its
trials then fail alone in their workers, as every measured trial does).
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autoscale.plan import Plan

__all__ = ["Guess", "best_guesses", "candidate_params", "in_child"]


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


def best_guesses(space: Any, base: Plan, *, memory: Callable[[Plan], int],
                 step_time: Callable[[Plan], float], budget: int | None, k: int,
                 time_limit_s: float = 60.0,
                 ) -> tuple[list[Guess], str]:  # fmt: skip
    """Up to ``k`` distinct plans of ``space``'s coarse grid (candidate_params) that the
    cost model expects to fit ``budget`` (``memory(plan) <= budget``), fastest estimated
    step first; with a one-line note of what was priced. See Note: [the cost model orders
    the candidates].

    ``memory`` and ``step_time`` are the estimators (per-rank peak bytes, seconds a step
    of the same global batch, so steps compare as throughput); either may raise, which
    drops that candidate. Never measures anything; stops pricing past ``time_limit_s``.
    """
    grid = sorted(candidate_params(space), key=_promise)
    start = time.monotonic()
    seen: set[str] = set()
    priced: list[Guess] = []
    over = failed = 0
    for params in grid:
        if time.monotonic() - start > time_limit_s:
            break
        try:
            plan = space.plan_from(params, base)
        except Exception:  # a combination the plan rules refuse
            failed += 1
            continue
        key = json.dumps(plan.to_dict(), sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        try:
            peak = memory(plan)
            if budget is not None and peak > budget:
                over += 1
                continue
            seconds = step_time(plan)
        except Exception:  # the estimator cannot price it: not a guess
            failed += 1
            continue
        priced.append(Guess(params, plan, peak, seconds))
    priced.sort(key=lambda g: g.estimated_step_s)
    took = time.monotonic() - start
    cut = "" if len(seen) + failed >= len(grid) else f" (cut at {time_limit_s:.0f} s)"
    note = (f"cost model: {len(seen)} distinct plans of a {len(grid)}-point grid estimated "
            f"in {took:.1f} s{cut}; {over} over the budget, {failed} not estimable; "
            f"the {min(k, len(priced))} fastest estimated queued first")
    return priced[:k], note


def in_child(fn: Callable[[], Any], *, timeout_s: float) -> tuple[Any, str | None]:
    """``fn()`` run in a forked child process: ``(result, None)``, or ``(None, why)`` when
    it raised, crashed or ran past ``timeout_s`` (the child is then killed). The result
    comes back pickled. The child runs torch on one thread (a fork's copy of the parent's
    thread pool must not be entered) and leaves with ``os._exit``, so nothing of the
    parent's (open files, database connections) is closed or flushed twice. Where there
    is no fork (not POSIX), ``fn`` runs here."""
    if not hasattr(os, "fork"):
        return fn(), None
    import torch

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            torch.set_num_threads(1)
            payload = pickle.dumps(("ok", fn()))
        except BaseException as err:  # everything goes back as a reason
            line = (str(err).splitlines() or [""])[0][:200]
            payload = pickle.dumps(("error", f"{type(err).__name__}: {line}"))
        with os.fdopen(write, "wb") as out:
            out.write(payload)
        os._exit(0)
    os.close(write)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        with os.fdopen(read, "rb", buffering=0) as src:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([src], [], [], left)[0]:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    return None, f"timed out after {timeout_s:.0f} s"
                chunk = src.read(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    except BaseException:  # Ctrl-C: the child goes with the tuner
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return None, f"crashed: {signal.Signals(os.WTERMSIG(status)).name}"
    if not chunks:
        return None, f"exited with status {os.waitstatus_to_exitcode(status)} and no result"
    kind, value = pickle.loads(b"".join(chunks))
    return (value, None) if kind == "ok" else (None, value)
