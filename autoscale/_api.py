"""The public entry points: optimize (search, then build) and apply (build from a plan)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoscale._units import format_bytes, parse_bytes
from autoscale.capture._capture import capture
from autoscale.cost._cost import calibrate, static_bytes
from autoscale.errors import InfeasibleError, TunerError
from autoscale.measure import Measurement
from autoscale.plan._plan import Environment, Fingerprint, Measured, OptimizerPlan, Plan
from autoscale.runtime._batch import Batch, LossFn, check_batch
from autoscale.runtime._optimizers import optimizer_plan
from autoscale.runtime._result import Result, build_result
from autoscale.search._study import (
    SearchSpace,
    TrialRecord,
    closest_miss,
    open_study,
    run_search,
    top_feasible,
)
from autoscale.search._trial import measure_baseline
from autoscale.search._workers import (
    InProcessRunner,
    TrialFailed,
    TrialRunner,
    WorkerRunner,
    WorkloadSource,
    pickle_workload,
    script_workload,
)

__all__ = ["Report", "apply", "measure_baseline", "optimize", "optimize_script"]


@dataclass(frozen=True)
class Report:
    """What optimize() found: the baseline, the winner and every trial of this run."""

    baseline: Measurement | None
    best: Measured | None
    trials: tuple[TrialRecord, ...]
    memory_budget: int | None
    capture_strategy: str
    study_name: str | None

    @property
    def speedup(self) -> float | None:
        """Best plan's throughput over the untouched baseline's (same run)."""
        if self.baseline is None or self.best is None or not self.baseline.samples_per_s:
            return None
        return self.best.samples_per_s / self.baseline.samples_per_s

    @property
    def memory_ratio(self) -> float | None:
        """Best plan's peak memory over the baseline's (same run)."""
        if self.baseline is None or self.best is None or not self.baseline.peak_memory_bytes:
            return None
        return self.best.peak_memory_bytes / self.baseline.peak_memory_bytes


def optimize(
    model: nn.Module,
    example_inputs: Batch,
    *,
    loss_fn: LossFn | None = None,
    memory_budget: int | str | None = None,
    optimizer: str = "adamw",
    optimizer_kwargs: dict[str, Any] | None = None,
    trials: int = 20,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int = 0,
    precisions: Sequence[str] | None = None,
    allowed_optimizers: Sequence[str] | None = None,
    warmup: int = 1,
    iters: int = 3,
    inplace: bool = False,
    on_trial: Callable[[TrialRecord], None] | None = None,
    isolate: bool = True,
    trial_timeout: float | None = None,
) -> Result:
    """Search for the fastest plan whose measured peak memory fits ``memory_budget``.

    Captures the model, measures the untouched baseline, then runs Optuna trials over
    micro-batching, precision and per-block checkpointing (and, if ``allowed_optimizers``
    names several, the optimizer) until the study holds ``trials`` of them. A trial whose
    peak exceeds the budget is infeasible; the fastest feasible plan wins. ``precisions``
    defaults to fp32 and bf16 (plus fp16 on CUDA, where loss-scaled fp16 pays off).
    ``trials=0`` takes the default plan without measuring. With ``storage`` (a SQLite path
    or database URL) the study is saved under ``study_name``; the same call again resumes
    it, running only the trials still missing and never a plan already measured.

    With ``isolate`` (the default) every measurement runs in a worker process, with the
    model, inputs and loss function serialized to it: a crash, a hang past
    ``trial_timeout`` seconds (default: 10x the baseline's measurement, at least 60 s) or
    an out-of-memory fails that trial only. ``isolate=False`` measures in this process.

    Invariants: the caller's model (parameters, buffers, mode) and the global RNG state
    are not changed unless ``inplace=True``, in which case the returned Result trains
    ``model`` itself. The returned plan's measured peak is <= the budget, or
    InfeasibleError is raised; nothing is returned that was not measured to fit.
    """
    return _optimize(model, example_inputs, source=None, loss_fn=loss_fn,
                     memory_budget=memory_budget, optimizer=optimizer,
                     optimizer_kwargs=optimizer_kwargs, trials=trials, storage=storage,
                     study_name=study_name, seed=seed, precisions=precisions,
                     allowed_optimizers=allowed_optimizers, warmup=warmup, iters=iters,
                     inplace=inplace, on_trial=on_trial, isolate=isolate,
                     trial_timeout=trial_timeout)


def optimize_script(path: str | os.PathLike[str], **options: Any) -> Result:
    """:func:`optimize` on the workload a script's ``build()`` returns; workers re-import
    the script instead of receiving a serialized model (``autoscale tune SCRIPT``)."""
    from autoscale.search._workload import load_workload

    work = load_workload(path)
    options.setdefault("loss_fn", work.loss_fn)
    source = script_workload(path) if options.get("isolate", True) else None
    return _optimize(work.model, work.example_inputs, source=source, **options)


@dataclass(frozen=True)
class _Setup:
    """What optimize() derives from its arguments before measuring anything."""

    batch: Batch
    budget: int | None
    optimizer: OptimizerPlan
    space: SearchSpace
    base: Plan
    graph: Any
    device: torch.device


def _optimize(model: nn.Module, example_inputs: Batch, *, source: WorkloadSource | None,
              trials: int = 20, storage: str | None = None, study_name: str | None = None,
              seed: int = 0, warmup: int = 1, iters: int = 3, inplace: bool = False,
              isolate: bool = True, trial_timeout: float | None = None,
              loss_fn: LossFn | None = None,
              on_trial: Callable[[TrialRecord], None] | None = None,
              **knobs: Any) -> Result:  # fmt: skip
    """optimize()'s body; ``knobs`` are _setup()'s arguments, ``source`` the workers'
    workload (None: serialize the model when isolating)."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise TunerError(f"trials must be an integer >= 0, got {trials!r}.")
    if trial_timeout is not None and not trial_timeout > 0:
        raise TunerError(f"trial_timeout must be > 0 seconds or None, got {trial_timeout!r}.")
    setup = _setup(model, example_inputs, **knobs)
    if trials == 0:
        result = build_result(setup.base, model, loss_fn=loss_fn, inplace=inplace,
                              graph=setup.graph)
        result.report = Report(None, None, (), setup.budget, setup.graph.strategy, None)
        return result
    name = study_name or (f"autoscale-{setup.base.fingerprint_digest()}-"
                          f"{setup.budget or 'nobudget'}")
    study = open_study(storage=storage, study_name=name, seed=seed)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=_rng_devices(setup.device)))
        runner = stack.enter_context(_runner(model, setup, source=source, loss_fn=loss_fn,
                                             isolate=isolate, warmup=warmup, iters=iters,
                                             folder=stack))
        baseline, took = _timed(lambda: _baseline(runner, setup.optimizer))
        timeout = trial_timeout or max(_MIN_TRIAL_TIMEOUT_S, _TIMEOUT_FACTOR * took)
        calibration = calibrate(model, setup.graph, setup.base,
                                peak_bytes=baseline.peak_memory_bytes,
                                step_time_s=baseline.step_time_s)
        records = run_search(study, setup.space, setup.base, model=model, graph=setup.graph,
                             budget=setup.budget, calibration=calibration, trials=trials,
                             measure=lambda plan: runner.measure(plan, timeout_s=timeout),
                             on_trial=on_trial)
        finalists = top_feasible(study, setup.budget, _FINALISTS)
        if not finalists:
            raise _nothing_fits(setup.budget, baseline, study,
                                    sum(1 for r in records if not r.is_repeat))
        plans = [Plan.from_dict(t.user_attrs["plan"]) for t in finalists]
        baseline, confirmed = _confirm(runner, plans, setup.optimizer, timeout_s=timeout,
                                       rounds=_CONFIRM_ROUNDS)
    plan = _winner(setup, plans, [t.user_attrs["peak_memory_bytes"] for t in finalists],
                   confirmed, baseline)
    result = build_result(plan, model, loss_fn=loss_fn, inplace=inplace, graph=setup.graph)
    result.report = Report(baseline, plan.measured, tuple(records), setup.budget,
                           setup.graph.strategy, name)
    return result


def _winner(setup: _Setup, plans: Sequence[Plan], peaks: Sequence[int],
            confirmed: Sequence[Measurement | None], baseline: Measurement) -> Plan:
    """The finalist with the best confirmed throughput, carrying its figures."""
    kept = {i: m for i, m in enumerate(confirmed) if m is not None}
    if not kept:
        raise TunerError("every finalist failed when measured again after the search; the "
                         "machine may be short of memory. Re-run, or run with isolate=False "
                         "to see the error.")
    pick = max(kept, key=lambda i: kept[i].samples_per_s)
    measured = Measured(
        samples_per_s=kept[pick].samples_per_s, step_time_s=kept[pick].step_time_s,
        peak_memory_bytes=peaks[pick], memory_budget_bytes=setup.budget,
        baseline_samples_per_s=baseline.samples_per_s,
        baseline_peak_memory_bytes=baseline.peak_memory_bytes,
        batch_size=setup.graph.batch_size)
    return plans[pick].replace(fingerprint=setup.base.fingerprint,
                               environment=setup.base.environment, measured=measured)


def _setup(model: nn.Module, example_inputs: Batch, *, memory_budget: int | str | None = None,
           optimizer: str = "adamw", optimizer_kwargs: dict[str, Any] | None = None,
           precisions: Sequence[str] | None = None,
           allowed_optimizers: Sequence[str] | None = None) -> _Setup:  # fmt: skip
    batch = check_batch(example_inputs)
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    opt_plan = optimizer_plan(optimizer, optimizer_kwargs)
    candidates = _optimizer_candidates(opt_plan, allowed_optimizers, optimizer_kwargs)
    graph = capture(model, batch)
    device = next(model.parameters()).device
    base = Plan(sections={"optimizer": opt_plan},
                fingerprint=Fingerprint.of(model, graph.structure_hash()),
                environment=Environment.current(device))
    # Judged with the allowed optimizer that keeps the least state.
    leanest = min((base.replace(optimizer=o) for o in candidates),
                  key=lambda p: static_bytes(model, p)[2])
    _check_static_fit(model, leanest, budget)
    space = SearchSpace(batch_size=graph.batch_size,
                        block_names=tuple(b.fqn for b in graph.blocks),
                        precisions=_check_precisions(precisions, device),
                        optimizers=candidates)
    return _Setup(batch, budget, opt_plan, space, base, graph, device)


def _runner(model: nn.Module, setup: _Setup, *, source: WorkloadSource | None,
            loss_fn: LossFn | None, isolate: bool, warmup: int, iters: int,
            folder: contextlib.ExitStack) -> TrialRunner:  # fmt: skip
    """The worker runner (script or serialized model), or in-process for isolate=False."""
    if not isolate:
        return InProcessRunner(model, setup.batch, loss_fn=loss_fn, graph=setup.graph,
                               warmup=warmup, iters=iters)
    if source is None:
        tmp = folder.enter_context(tempfile.TemporaryDirectory(prefix="autoscale-"))
        source = pickle_workload(model, setup.batch, loss_fn, tmp)
    return WorkerRunner(source, device=setup.device,
                        fingerprint=setup.base.fingerprint_digest(), warmup=warmup,
                        iters=iters)


def _baseline(runner: TrialRunner, optimizer: OptimizerPlan, *,
              timeout_s: float | None = None) -> Measurement:
    try:
        return runner.baseline(optimizer, timeout_s=timeout_s)
    except TrialFailed as err:
        raise TunerError(f"the untouched model could not be measured: {err.reason}. Fix the "
                         "model or its example inputs: every plan is compared with it.") from err


def _timed(run: Callable[[], Measurement]) -> tuple[Measurement, float]:
    start = time.monotonic()
    out = run()
    return out, time.monotonic() - start


def apply(plan: Plan, model: nn.Module, example_inputs: Batch, *,
          loss_fn: LossFn | None = None, inplace: bool = False) -> Result:
    """Build the Result that ``plan`` describes for ``model``, with no search.

    Raises PlanMismatchError, naming what differs, if the plan was made for another model
    (parameter names, shapes, dtypes or forward graph). Warns if the plan was measured
    on another device or torch version (its figures may not hold here). The caller's
    model is not changed unless ``inplace=True``.
    """
    if not isinstance(plan, Plan):
        raise TunerError(f"apply() needs an autoscale.Plan, got {type(plan).__name__}; "
                         "load one with autoscale.Plan.load(path).")
    batch = check_batch(example_inputs)
    graph = capture(model, batch)
    plan.check_fingerprint(Fingerprint.of(model, graph.structure_hash()))
    device = next(model.parameters()).device
    here = Environment.current(device)
    env = plan.environment
    if env is not None and (env.device, env.torch) != (here.device, here.torch):
        warnings.warn(f"the plan was measured on {env.device} with torch {env.torch}; this is "
                      f"{here.device} with torch {here.torch}: its figures may not hold here.",
                      stacklevel=2)
    return build_result(plan, model, loss_fn=loss_fn, inplace=inplace, graph=graph)


#: Fastest feasible trials re-measured after the search, and interleaved rounds of
#: (baseline, each finalist): see Note: [confirming the winner].
_FINALISTS = 3
_CONFIRM_ROUNDS = 3
#: A trial's time limit when the caller sets none: generous against the baseline, whose
#: task includes the worker's first steps (kernel choice, allocator warm-up).
_TIMEOUT_FACTOR = 10.0
_MIN_TRIAL_TIMEOUT_S = 60.0


def _confirm(runner: TrialRunner, plans: Sequence[Plan], optimizer: OptimizerPlan, *,
             timeout_s: float, rounds: int) -> tuple[Measurement, list[Measurement | None]]:
    """The baseline and each of ``plans``, measured in turn for ``rounds`` rounds; each
    the round with the median throughput (the baseline's peak: the largest of its rounds).

    Note: [confirming the winner]
    The baseline was measured before the search and each trial once, minutes apart; on a
    shared machine those figures straddle load and memory-state changes (one plan was
    reported at 0.82x-1.11x of the baseline in three runs, 0.96x when the two were
    interleaved), so the fastest trial is not reliably the fastest plan. The fastest few
    feasible trials and the baseline are measured again, in turn, for a few rounds; the
    winner is the finalist with the best median round, and the report and the plan's
    ``measured`` take the median rounds. Peak memory stays the trial's: it decided
    feasibility, and memory does not drift with load. A finalist that fails a round
    (it measured fine once, so this is rare) drops out.
    """
    base_runs: list[Measurement] = []
    plan_runs: list[list[Measurement]] = [[] for _ in plans]
    dropped: set[int] = set()
    for _ in range(rounds):
        base_runs.append(_baseline(runner, optimizer, timeout_s=timeout_s))
        for i, plan in enumerate(plans):
            if i in dropped:
                continue
            try:
                plan_runs[i].append(runner.measure(plan, timeout_s=timeout_s))
            except TrialFailed:
                dropped.add(i)

    def median_run(runs: list[Measurement]) -> Measurement:
        return sorted(runs, key=lambda m: m.samples_per_s)[(len(runs) - 1) // 2]

    base = median_run(base_runs)
    peak = max(r.peak_memory_bytes for r in base_runs)
    return (dataclasses.replace(base, peak_memory_bytes=peak),
            [None if i in dropped else median_run(runs) for i, runs in enumerate(plan_runs)])


def _optimizer_candidates(chosen: OptimizerPlan, allowed: Sequence[str] | None,
                          kwargs: dict[str, Any] | None) -> tuple[OptimizerPlan, ...]:
    if not allowed:
        return (chosen,)
    plans = [chosen] + [optimizer_plan(n, kwargs) for n in allowed if n != chosen.kind]
    return tuple(plans)


def _check_precisions(precisions: Sequence[str] | None, device: torch.device
                      ) -> tuple[str, ...]:  # fmt: skip
    allowed = ("fp32", "bf16", "fp16")
    if precisions is None:
        # fp16 autocast on CPU runs several times slower than bf16 (measured: ~15 vs ~100
        # samples/s on examples/gpt.py) and its loss scaling exists for GPU underflow:
        # on CPU it would only spend trials. Users can still ask for it by name.
        precisions = allowed if device.type == "cuda" else ("fp32", "bf16")
    bad = [p for p in precisions if p not in allowed]
    if bad or not precisions:
        raise TunerError(f"precisions={list(precisions)!r}: each must be one of {list(allowed)}.")
    out = tuple(dict.fromkeys(precisions))
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        out = tuple(p for p in out if p != "bf16") or ("fp32",)
    return out


def _check_static_fit(model: nn.Module, plan: Plan, budget: int | None) -> None:
    if budget is None:
        return
    params, grads, state = static_bytes(model, plan)
    if params > budget:
        raise InfeasibleError(
            f"memory_budget={format_bytes(budget)} is smaller than the parameters alone "
            f"({format_bytes(params)}); no plan of checkpointing, precision or micro-batching "
            "can fit. Raise the budget or use a smaller model."
        )
    if params + grads + state > budget:
        raise InfeasibleError(
            f"memory_budget={format_bytes(budget)} is smaller than parameters "
            f"({format_bytes(params)}) + gradients ({format_bytes(grads)}) + "
            f"{plan.optimizer.kind} state ({format_bytes(state)}); raise the budget or choose "
            "an optimizer with less state (optimizer='adamw8bit' or 'sgd')."
        )


def _nothing_fits(budget: int | None, baseline: Measurement, study: Any, n: int
                  ) -> InfeasibleError:  # fmt: skip
    if budget is None:
        return InfeasibleError(
            f"every one of the {n} trials of this run failed (the report lists each reason); "
            "fix what they name, or run with isolate=False to debug in this process.")
    miss = closest_miss(study)
    closest = f"; the smallest measured peak was {format_bytes(miss)}" if miss else ""
    return InfeasibleError(
        f"no plan among the {n} trials of this run fits memory_budget="
        f"{format_bytes(budget)} (untouched baseline peak: "
        f"{format_bytes(baseline.peak_memory_bytes)}{closest}). Raise the budget, run more "
        "trials, or lower the batch size."
    )


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []
