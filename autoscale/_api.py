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
from typing import Any, NamedTuple

import optuna
import torch
from torch import nn

from autoscale._units import format_bytes, parse_bytes
from autoscale.capture._capture import capture
from autoscale.cost._checkpoint_solver import CheckpointBudgets
from autoscale.cost._cost import Calibration, calibrate, static_bytes
from autoscale.errors import InfeasibleError, PlanError, PlanMismatchError, TunerError
from autoscale.measure import Measurement
from autoscale.plan import (
    CompressPlan,
    Environment,
    Fingerprint,
    Measured,
    OptimizerPlan,
    Plan,
    ShardPlan,
)
from autoscale.runtime._batch import Batch, LossFn, batch_size, check_batch
from autoscale.runtime._optimizers import optimizer_plan
from autoscale.runtime._result import Result, build_result
from autoscale.search._guesses import (
    ChildStream,
    pick_guesses,
    price_candidates,
    priced_step_times,
)
from autoscale.search._study import (
    OBJECTIVES,
    SAMPLERS,
    LinkCheck,
    PlanEstimates,
    SearchSpace,
    TrialRecord,
    closest_miss,
    open_study,
    run_search,
    step_time_error,
    top_feasible,
)
from autoscale.search._trial import measure_baseline
from autoscale.search._workers import (
    InProcessRunner,
    RankNetwork,
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
    world_size: int = 1
    """Ranks every trial ran as; above 1 the baseline is plain DDP at the same global batch."""
    notes: tuple[str, ...] = ()
    """Decisions the tuner took outside the trials, one line each: the link check that
    decided whether compression was searched, a lossy finalist set aside for its exact twin."""
    objective: str = "throughput"
    """What the search optimized (Note: [the pareto objective])."""

    @property
    def front(self) -> tuple[TrialRecord, ...]:
        """This run's measured trials that fit the budget and that no other such trial
        beats on both throughput (higher) and peak memory (lower), lowest peak first: the
        trade-off a user picks from. Each was measured once, during the search."""
        return pareto_records(self.trials)

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


class _FrontPoint(NamedTuple):
    """A measured trial as autoscale.search._report.pareto_front reads it."""

    samples_per_s: float
    peak: int
    record: TrialRecord


def pareto_records(trials: Sequence[TrialRecord]) -> tuple[TrialRecord, ...]:
    """The measured trials that fit the budget (repeats left out) and that no other such
    trial beats on both throughput (higher) and peak memory (lower), lowest peak first."""
    from autoscale.search._report import pareto_front

    points = [_FrontPoint(r.samples_per_s, r.peak_memory_bytes, r) for r in trials
              if r.state == "measured" and r.feasible and not r.is_repeat
              and r.samples_per_s and r.peak_memory_bytes]
    return tuple(p.record for p in pareto_front(points))


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
    world_size: int = 1,
    compressors: Sequence[str] | None = None,
    heartbeat_s: float = 10.0,
    sampler: str = "tpe",
    compile_modes: Sequence[str] | None = None,
    objective: str = "throughput",
) -> Result:
    """Search for the fastest plan whose measured peak memory fits ``memory_budget``.

    Captures the model, measures the untouched baseline, then runs Optuna trials over
    micro-batching, precision and per-block checkpointing (and, if ``allowed_optimizers``
    names several, the optimizer) until the study holds ``trials`` of them. A trial whose
    peak exceeds the budget is infeasible; the fastest feasible plan wins. ``precisions``
    defaults to fp32 and bf16 (plus fp16 on CUDA, where loss-scaled fp16 pays off).
    ``trials=0`` takes the default plan without measuring. With ``storage`` (a SQLite path
    or database URL) the study is saved under ``study_name``; the same call again resumes
    it, running only the trials still missing and never a plan already measured. Several
    processes may run one stored study at once (PostgreSQL for many; see Note: [many
    workers, one study]): each trial sends a heartbeat every ``heartbeat_s`` seconds, and
    a trial whose worker died is failed after three missed beats and run again once.

    With ``isolate`` (the default) every measurement runs in a worker process, with the
    model, inputs and loss function serialized to it: a crash, a hang past
    ``trial_timeout`` seconds (default: 10x the baseline's measurement, at least 60 s) or
    an out-of-memory fails that trial only. ``isolate=False`` measures in this process.

    With ``world_size=N > 1`` the plan is for an N-rank data-parallel job: every trial runs
    as N real processes (gloo on CPU, NCCL on CUDA), each on 1/N of ``example_inputs``
    (the global batch), and the search also picks the sharding strategy (DDP, ZeRO-1/2/3)
    and the gradient compression. The budget is per rank (the largest rank's peak); the
    baseline is plain DDP at the same global batch. ``compressors`` limits the gradient
    compression tried (default: none, bf16, int8, topk, powersgd). This process holds no
    process group, so the returned Result carries the plan and the report but cannot step:
    save ``result.plan`` and run it with :func:`apply` in each rank under torchrun.

    Invariants: the caller's model (parameters, buffers, mode) and the global RNG state
    are not changed unless ``inplace=True``, in which case the returned Result trains
    ``model`` itself. The returned plan's measured peak is <= the budget, or
    InfeasibleError is raised; nothing is returned that was not measured to fit.

    ``sampler`` is Optuna's TPE ("tpe", the default, which reads the memory constraint)
    or its random sampler ("random", the baseline the search-quality benchmark uses).

    ``objective`` "throughput" (the default) searches for the fastest plan that fits;
    "pareto" searches throughput and peak memory together (Optuna's multi-objective TPE,
    the budget still a constraint: Note: [the pareto objective]). Either way the fastest
    feasible plan is returned and ``result.report.front`` holds the measured Pareto front.

    ``compile_modes`` lets the search put the model under torch.compile (see
    autoscale/plan/_compile.py): "off", "inductor" (with the solver's checkpoint policies),
    "inductor-eager-rng" (the same with dropout's random numbers drawn by eager's kernels:
    faster on CPU, the eager model's masks) and "inductor-budget" (inductor's own
    activation_memory_budget, set from the same activation-budget knob, with no checkpoint
    section). Default: "off" and "inductor" on CUDA, "off" only on CPU, where compiling
    costs tens of seconds per trial for about 1.0x (measured on examples/gpt.py; with
    eager RNG 0.93x on its dropout); name them to search them anywhere. One-process plans
    only. A trial's compile time is reported apart from its step time (the
    ``compile_time_s`` user attribute of its Optuna trial, and TrialRecord.compile_time_s),
    and a compile failure fails that trial alone.
    """
    return _optimize(model, example_inputs, source=None, loss_fn=loss_fn,
                     memory_budget=memory_budget, optimizer=optimizer,
                     optimizer_kwargs=optimizer_kwargs, trials=trials, storage=storage,
                     study_name=study_name, seed=seed, precisions=precisions,
                     allowed_optimizers=allowed_optimizers, warmup=warmup, iters=iters,
                     inplace=inplace, on_trial=on_trial, isolate=isolate,
                     heartbeat_s=heartbeat_s,
                     trial_timeout=trial_timeout, world_size=world_size,
                     compressors=compressors, sampler=sampler,
                     compile_modes=compile_modes, objective=objective)


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
    world_size: int = 1

    @property
    def reference(self) -> Plan:
        """The plan the baseline stands for: the default, or plain DDP across ranks (the
        cost model's calibration is fit to it)."""
        if self.world_size == 1:
            return self.base
        return self.base.replace(shard=ShardPlan(strategy="ddp", world_size=self.world_size))


def _optimize(model: nn.Module, example_inputs: Batch, *, source: WorkloadSource | None,
              trials: int = 20, storage: str | None = None, study_name: str | None = None,
              seed: int = 0, warmup: int = 1, iters: int = 3, inplace: bool = False,
              isolate: bool = True, trial_timeout: float | None = None,
              loss_fn: LossFn | None = None,
              on_trial: Callable[[TrialRecord], None] | None = None,
              network: RankNetwork | None = None, heartbeat_s: float = 10.0,
              sampler: str = "tpe", cost_guesses: bool = True,
              objective: str = "throughput", **knobs: Any) -> Result:  # fmt: skip
    """optimize()'s body; ``knobs`` are _setup()'s arguments, ``source`` the workers'
    workload (None: serialize the model when isolating), ``network`` where the trial ranks
    run (default loopback; bench/bench_compress.py --tune runs them across a shaped link),
    ``cost_guesses`` whether the cost model's best guesses are measured first (Note: [the
    cost model orders the candidates]; off only to measure what they bring)."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise TunerError(f"trials must be an integer >= 0, got {trials!r}.")
    if trial_timeout is not None and not trial_timeout > 0:
        raise TunerError(f"trial_timeout must be > 0 seconds or None, got {trial_timeout!r}.")
    if sampler not in SAMPLERS:
        raise TunerError(f"sampler={sampler!r} is not one of {list(SAMPLERS)}; use 'tpe' "
                         "(the default) or 'random'.")
    if objective not in OBJECTIVES:
        raise TunerError(f"objective={objective!r} is not one of {list(OBJECTIVES)}: "
                         "'throughput' (the fastest plan that fits) or 'pareto' (throughput "
                         "and peak memory together).")
    setup = _setup(model, example_inputs, **knobs)
    if setup.world_size > 1 and not isolate:
        raise TunerError(f"world_size={setup.world_size} measures every trial as "
                         f"{setup.world_size} worker processes; it cannot run with "
                         "isolate=False. Drop isolate=False (or --no-isolate).")
    if trials == 0:
        result = _result(setup.reference, model, setup, loss_fn=loss_fn, inplace=inplace)
        result.report = Report(None, None, (), setup.budget, setup.graph.strategy, None,
                               setup.world_size)
        return result
    name = study_name or (f"autoscale-{setup.base.fingerprint_digest()}-"
                          f"{setup.budget or 'nobudget'}")
    study = open_study(storage=storage, study_name=name, seed=seed, heartbeat_s=heartbeat_s,
                       sampler=sampler, objective=objective)
    study.set_user_attr("memory_budget_bytes", setup.budget)  # autoscale report draws it
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=_rng_devices(setup.device)))
        runner = stack.enter_context(_runner(model, setup, source=source, loss_fn=loss_fn,
                                             isolate=isolate, warmup=warmup, iters=iters,
                                             folder=stack, network=network))
        space, solver_note = _with_checkpoint_solver(setup.space, model, setup, loss_fn)
        # One rank: the cost model prices its candidates while the baseline is measured.
        pricing = (_price_in_child(space, model, setup, loss_fn=loss_fn)
                   if cost_guesses and setup.world_size == 1 else None)
        if isinstance(pricing, ChildStream):
            stack.callback(pricing.close)  # Ctrl-C or a failed baseline: the child goes too
        baseline, took = _timed(lambda: _baseline(runner, setup.optimizer))
        timeout = trial_timeout or max(_MIN_TRIAL_TIMEOUT_S, _TIMEOUT_FACTOR * took)
        space, notes = _space_for_the_link(space, runner, baseline, study,
                                           timeout_s=timeout)
        calibration = calibrate(model, setup.graph, setup.reference,
                                peak_bytes=baseline.peak_memory_bytes,
                                step_time_s=baseline.step_time_s)
        estimates = PlanEstimates(model, setup.batch, setup.graph, loss_fn=loss_fn,
                                  calibration=calibration)
        if cost_guesses and setup.world_size > 1:  # the step times need the link's rate
            pricing = _price_in_child(space, model, setup, loss_fn=loss_fn,
                                      baseline=baseline, study=study)
            if isinstance(pricing, ChildStream):
                stack.callback(pricing.close)
        guesses, guess_note, priced = _collect_guesses(
            pricing, baseline, k=_guess_count(trials),
            spend_s=max(_MIN_GUESS_S, min(0.75 * timeout, took)))
        notes = (*notes, *filter(None, [solver_note, guess_note]))
        records = run_search(study, space, setup.base, estimates=estimates,
                             budget=setup.budget, trials=trials,
                             measure=lambda plan: runner.measure(plan, timeout_s=timeout),
                             on_trial=on_trial, guesses=guesses, step_estimates=priced,
                             objective=objective)
        if (step_err := step_time_error(study)) is not None:
            notes = (*notes, f"cost model: step time estimated within a median "
                             f"{step_err[1]:.0%} of {step_err[0]} measured trials (refined "
                             "on each trial before it)")
        finalists = top_feasible(study, setup.budget, _FINALISTS)
        if not finalists:
            raise _nothing_fits(setup.budget, baseline, study,
                                    sum(1 for r in records if not r.is_repeat))
        plans = [Plan.from_dict(t.user_attrs["plan"]) for t in finalists]
        peaks: list[int | None] = [t.user_attrs["peak_memory_bytes"] for t in finalists]
        twins = _exact_twins(plans, peaks)
        baseline, confirmed = _confirm(runner, plans, setup.optimizer, timeout_s=timeout,
                                       rounds=_CONFIRM_ROUNDS)
        plan, why = _guarded_winner(setup, runner, plans, peaks, confirmed, baseline, twins,
                                    study, timeout_s=timeout)
    result = _result(plan, model, setup, loss_fn=loss_fn, inplace=inplace)
    result.report = Report(baseline, plan.measured, tuple(records), setup.budget,
                           setup.graph.strategy, name, setup.world_size,
                           notes=(*notes, *why, *filter(None, [estimates.note])),
                           objective=objective)
    return result


def _with_checkpoint_solver(space: SearchSpace, model: nn.Module, setup: _Setup,
                            loss_fn: LossFn | None) -> tuple[SearchSpace, str | None]:
    """``space`` with the exact checkpoint solver behind its checkpoint knob (Note: [the
    checkpoint knob]), or unchanged, with the reason, where the solver cannot simulate
    the model (the knob stays "the first n blocks", fully checkpointed)."""
    if not space.block_names:
        return space, None
    budgets = CheckpointBudgets(model, setup.batch, setup.graph, loss_fn=loss_fn)
    try:
        budgets.bounds(setup.reference)
    except Exception as err:  # any failure of the simulation: say so and go on
        return space, (f"checkpoint knob: the first n blocks, fully checkpointed (the "
                       f"solver could not simulate the model: {type(err).__name__}: {err})")
    return dataclasses.replace(space, checkpoint=budgets), None


#: The cost model's pricing: the least time the tune waits for it after the baseline,
#: however fast that was, and the most the child spends in all.
_MIN_GUESS_S, _MAX_GUESS_S = 1.5, 45.0


def _guess_count(trials: int) -> int:
    """How many of the cost model's best guesses a tune of ``trials`` trials queues: a
    third of them, at most 4, so the sampler keeps most of a long search."""
    return max(1, min(4, trials // 3))


def _price_in_child(space: SearchSpace, model: nn.Module, setup: _Setup, *,
                    loss_fn: LossFn | None, baseline: Measurement | None = None,
                    study: Any = None) -> ChildStream | str:
    """Start pricing ``space``'s candidates in a forked child (Note: [the cost model orders
    the candidates]): its ChildStream, or why there are no guesses. Without ``baseline``
    (one rank, priced while the baseline is measured) the step times are at this machine's
    calibrated rates, and the child first sends ("reference", seconds) of the untouched
    plan for the parent to scale them by; with it (several ranks, after the link check)
    they are refined on it and priced with the link's rate."""
    from autoscale.cost import estimate_step_time, machine_rates, refine

    if setup.device.type != "cpu":
        return (f"cost model: no best guesses on {setup.device.type} (its step-time rates "
                "are calibrated on the CPU only); the sampler starts alone")
    link_rate = None
    if setup.world_size > 1:
        link = study.user_attrs.get("link_check") if study is not None else None
        if not link:
            return "cost model: no best guesses (the link between the ranks was not timed)"
        link_rate = link["gradient_bytes"] / link["all_reduce_s"]
    rates = machine_rates()  # measured once per machine, here, not in each child
    estimates = PlanEstimates(model, setup.batch, setup.graph, loss_fn=loss_fn,
                              calibration=Calibration())

    def seconds(plan: Plan, at: Any) -> float:
        return estimate_step_time(model, setup.batch, plan, loss_fn=loss_fn, graph=setup.graph,
                                  rates=at, link_bytes_per_s=link_rate).total_s

    def produce(emit: Callable[[Any], None]) -> None:
        at = rates
        try:
            if baseline is None:
                emit(("reference", seconds(setup.reference, rates)))
            else:
                reference = estimate_step_time(
                    model, setup.batch, setup.reference, loss_fn=loss_fn, graph=setup.graph,
                    rates=rates, link_bytes_per_s=link_rate)
                at = refine(rates, reference, _quietest_step(baseline))
        except PlanError as err:
            emit(("error", f"step time not estimable: {err}"))
            return
        price_candidates(space, setup.base, memory=estimates.bytes,
                         step_time=lambda plan: seconds(plan, at), budget=setup.budget,
                         emit=emit, time_limit_s=_MAX_GUESS_S)

    return ChildStream(produce)


def _quietest_step(measured: Measurement) -> float:
    """The fastest of a measurement's timed steps: what the step-time estimate is scaled
    onto. Other work on the machine only slows a step down (the cost model's own pricing
    runs beside the baseline's measurement: its first steps measured up to 15x the last)."""
    return min(measured.step_times_s) if measured.step_times_s else measured.step_time_s


def _collect_guesses(pricing: ChildStream | str | None, baseline: Measurement, *, k: int,
                     spend_s: float) -> tuple[list[Any], str | None, dict[str, float]]:
    """The guesses the child priced, waiting at most ``spend_s`` more for it: a child that
    crashed, hung or ran out of time keeps what it sent (Note: [the cost model orders the
    candidates]); with the note the tune prints, and every priced plan's step seconds
    (``priced_step_times``)."""
    if pricing is None:
        return [], None, {}
    if isinstance(pricing, str):
        return [], pricing, {}
    events, why, took = pricing.collect(time.monotonic() + spend_s)
    reference = next((e[1] for e in events if e[0] == "reference"), None)
    scale = _quietest_step(baseline) / reference if reference else 1.0
    if not any(e[0] == "guess" for e in events):
        return [], (f"cost model: no best guesses (pricing the plans, which runs the model "
                    f"on fake tensors: {why or 'none fits the budget'}); the sampler "
                    "starts alone"), {}
    guesses, note = pick_guesses(events, k, took_s=took, stopped=why, scale=scale)
    return guesses, note, priced_step_times(events, scale)


#: The convergence guardrail: steps of each A/B run, the tail averaged, and the largest
#: relative gap of that tail between a lossy plan and its exact twin. See Note:
#: [the convergence guardrail].
GUARD_STEPS, GUARD_TAIL, GUARD_TOLERANCE = 24, 6, 0.02


def lossy_knobs(plan: Plan) -> list[str]:
    """The knobs of ``plan`` that change the training maths (not only its memory or speed):
    gradient compression and 8-bit optimizer state."""
    knobs = []
    if plan.compress.method != "none":
        knobs.append(f"compress={plan.compress.method}")
    if plan.optimizer.kind == "adamw8bit" or plan.optimizer.state_precision == "int8":
        knobs.append("8-bit optimizer state")
    return knobs


def exact_twin(plan: Plan) -> Plan:
    """``plan`` with every lossy knob off: no compression, fp32 AdamW state for 8-bit."""
    twin = plan.replace(compress=CompressPlan())
    opt = plan.optimizer
    if opt.kind == "adamw8bit" or opt.state_precision == "int8":
        kwargs = {k: v for k, v in opt.kwargs.items() if k not in _EIGHT_BIT_ONLY}
        twin = twin.replace(optimizer=optimizer_plan("adamw", kwargs))
    return twin


_EIGHT_BIT_ONLY = ("block_size", "min_8bit_size")


def _guarded_winner(setup: _Setup, runner: TrialRunner, plans: list[Plan],
                    peaks: list[int | None], confirmed: list[Measurement | None],
                    baseline: Measurement, twins: dict[int, int], study: optuna.Study, *,
                    timeout_s: float) -> tuple[Plan, tuple[str, ...]]:
    """The winner (``_winner``), put through the convergence guardrail.

    Note: [the convergence guardrail]
    A plan with a lossy knob (lossy_knobs) wins only if a short A/B run keeps its loss
    curve with its exact twin's: both train GUARD_STEPS steps on the example batch from
    the same weights and seed, and the mean loss of the last GUARD_TAIL steps may differ
    by at most GUARD_TOLERANCE, relative. Otherwise that plan is set aside and the next
    best finalist is judged the same way, until an exact one or a lossy one that keeps
    the curve wins (none left: TunerError). The figures go on the study
    (user attr "convergence_check") and into the report's notes.
    """
    exclude: set[int] = set()
    notes: list[str] = []
    while True:
        plan, why = _winner(setup, plans, peaks, confirmed, baseline, twins, exclude=exclude)
        knobs = lossy_knobs(plan)
        if not knobs:
            return plan, (*why, *notes)
        check = _convergence_check(runner, plan, timeout_s=timeout_s)
        study.set_user_attr("convergence_check", check)
        verdict = "kept" if check["passed"] else "set aside"
        notes.append(f"convergence check of {', '.join(knobs)}: loss {check['lossy']:.4f} vs "
                     f"{check['exact']:.4f} exact over the last {GUARD_TAIL} of "
                     f"{GUARD_STEPS} steps ({check['gap']:+.2%}, tolerance "
                     f"{GUARD_TOLERANCE:.0%}): {verdict}")
        if check["passed"]:
            assert plan.measured is not None
            measured = dataclasses.replace(
                plan.measured, convergence_loss=check["lossy"],
                convergence_exact_loss=check["exact"], convergence_tolerance=GUARD_TOLERANCE,
                convergence_steps=GUARD_STEPS)
            return plan.replace(measured=measured), (*why, *notes)
        # Only this plan is set aside: another lossy finalist (int8 where PowerSGD drifted)
        # may keep the curve, and gets its own check before an exact plan wins.
        exclude.add(next(i for i, p in enumerate(plans) if i not in exclude and p.replace(
            fingerprint=plan.fingerprint, environment=plan.environment,
            measured=plan.measured) == plan))
        if all(i in exclude or m is None for i, m in enumerate(confirmed)):
            raise TunerError("every finalist that fits uses a lossy knob whose loss curve "
                             f"left the exact plan's ({notes[-1]}); raise the budget, or "
                             "tune with more trials so an exact plan is found.")


def _convergence_check(runner: TrialRunner, plan: Plan, *, timeout_s: float
                       ) -> dict[str, Any]:  # fmt: skip
    try:
        lossy = runner.curve(plan, GUARD_STEPS, timeout_s=timeout_s)
        exact = runner.curve(exact_twin(plan), GUARD_STEPS, timeout_s=timeout_s)
    except TrialFailed as err:
        return {"passed": False, "lossy": float("nan"), "exact": float("nan"),
                "gap": float("nan"), "reason": err.reason}
    tail_lossy = sum(lossy[-GUARD_TAIL:]) / GUARD_TAIL
    tail_exact = sum(exact[-GUARD_TAIL:]) / GUARD_TAIL
    gap = (tail_lossy - tail_exact) / abs(tail_exact) if tail_exact else float("inf")
    return {"passed": abs(gap) <= GUARD_TOLERANCE, "lossy": tail_lossy, "exact": tail_exact,
            "gap": gap, "steps": GUARD_STEPS, "tail": GUARD_TAIL,
            "tolerance": GUARD_TOLERANCE, "lossy_curve": lossy, "exact_curve": exact}


def _twin_note(plan: Plan, lossy: Measurement, exact: Measurement, *, chosen: bool) -> str:
    gain = lossy.samples_per_s / exact.samples_per_s
    if chosen:
        verdict = "chosen"
    elif gain <= 1 + LOSSY_MARGIN:
        verdict = f"set aside: it needs over {1 + LOSSY_MARGIN:.2f}x"
    else:
        verdict = "beat by another finalist"
    return (f"finalist with compress={plan.compress.method}: {gain:.2f}x its uncompressed "
            f"twin ({verdict})")


def _space_for_the_link(space: SearchSpace, runner: TrialRunner, baseline: Measurement,
                        study: optuna.Study, *, timeout_s: float
                        ) -> tuple[SearchSpace, tuple[str, ...]]:  # fmt: skip
    """The search space with compression dropped where the link says it cannot pay (Note:
    [when compression can pay]); the check is stored on the study and reported."""
    # Timed even where no compressor is allowed: the cost model's step times need the
    # link's rate (Note: [the cost model orders the candidates]).
    if not isinstance(runner, WorkerRunner) or runner.world_size == 1:
        return space, ()
    grads = baseline.comm_bytes_per_step or 0
    try:
        seconds = runner.all_reduce_seconds(grads, timeout_s=timeout_s)
    except TrialFailed as err:
        raise TunerError(f"the link between the trial ranks could not be timed: "
                         f"{err.reason}. Re-run; compressors=['none'] skips this check.") from err
    link = LinkCheck(grads, seconds, baseline.step_time_s)
    study.set_user_attr("link_check", link.to_dict())
    if not link.worth_searching:
        space = dataclasses.replace(space, compressors=("none",))
    return space, (link.describe(),)


def _exact_twins(plans: list[Plan], peaks: list[int | None]) -> dict[int, int]:
    """Add to ``plans`` the uncompressed twin of every compressed finalist that is not a
    finalist itself (its peak unknown until confirmed: None in ``peaks``); returns each
    compressed finalist's index -> its twin's. See Note: [lossy plans earn their place]."""
    twins: dict[int, int] = {}
    for i in range(len(plans)):
        if plans[i].compress.method == "none":
            continue
        twin = plans[i].replace(compress=CompressPlan())
        if twin not in plans:
            plans.append(twin)
            peaks.append(None)
        twins[i] = plans.index(twin)
    return twins


def _result(plan: Plan, model: nn.Module, setup: _Setup, *, loss_fn: LossFn | None,
            inplace: bool) -> Result:
    """The Result of ``plan``; for a multi-rank plan, one that carries it but cannot step."""
    if setup.world_size == 1:
        return build_result(plan, model, loss_fn=loss_fn, inplace=inplace, graph=setup.graph)
    local = plan.replace(shard=ShardPlan(), compress=CompressPlan())
    result = build_result(local, model, loss_fn=loss_fn, inplace=inplace, graph=setup.graph)
    result.plan = plan
    result.needs_ranks = setup.world_size
    return result


def _winner(setup: _Setup, plans: Sequence[Plan], peaks: Sequence[int | None],
            confirmed: Sequence[Measurement | None], baseline: Measurement,
            twins: dict[int, int] | None = None, *, exclude: set[int] | frozenset[int] = (
                frozenset())) -> tuple[Plan, tuple[str, ...]]:
    """The finalist with the best confirmed throughput, carrying its figures, and the notes
    on how it was chosen.

    Note: [lossy plans earn their place]
    A compressed plan changes the gradients every step, so it wins only by a clear margin:
    its median confirmed throughput must beat its exact twin's (the same plan uncompressed,
    confirmed in the same rounds) by more than LOSSY_MARGIN, the confirm rounds' noise on
    this shared machine; otherwise the twin takes its place, if the twin fits. A twin that
    was no finalist gets its peak from its confirm rounds.
    """
    budget = setup.budget
    kept = {i: m for i, m in enumerate(confirmed) if m is not None and i not in exclude
            and (peaks[i] is not None or budget is None or m.peak_memory_bytes <= budget)}
    if not kept:
        raise TunerError("every finalist failed when measured again after the search; the "
                         "machine may be short of memory. Re-run, or run with isolate=False "
                         "to see the error.")
    pick = max(kept, key=lambda i: kept[i].samples_per_s)
    twin = (twins or {}).get(pick)
    if twin is not None and twin in kept and (
            kept[pick].samples_per_s <= (1 + LOSSY_MARGIN) * kept[twin].samples_per_s):
        pick = twin
    notes = tuple(_twin_note(plans[i], kept[i], kept[t], chosen=i == pick)
                  for i, t in sorted((twins or {}).items()) if i in kept and t in kept)
    peak = peaks[pick]
    if peak is None:
        peak = kept[pick].peak_memory_bytes
    measured = Measured(
        samples_per_s=kept[pick].samples_per_s, step_time_s=kept[pick].step_time_s,
        peak_memory_bytes=peak, memory_budget_bytes=setup.budget,
        baseline_samples_per_s=baseline.samples_per_s,
        baseline_peak_memory_bytes=baseline.peak_memory_bytes,
        batch_size=setup.graph.batch_size, comm_bytes_per_step=kept[pick].comm_bytes_per_step,
        baseline_comm_bytes_per_step=baseline.comm_bytes_per_step)
    return plans[pick].replace(fingerprint=setup.base.fingerprint,
                               environment=setup.base.environment, measured=measured), notes


def _setup(model: nn.Module, example_inputs: Batch, *, memory_budget: int | str | None = None,
           optimizer: str = "adamw", optimizer_kwargs: dict[str, Any] | None = None,
           precisions: Sequence[str] | None = None,
           allowed_optimizers: Sequence[str] | None = None, world_size: int = 1,
           compressors: Sequence[str] | None = None,
           compile_modes: Sequence[str] | None = None) -> _Setup:  # fmt: skip
    batch = check_batch(example_inputs)
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    device = next(model.parameters()).device
    _check_world_size(world_size, batch, device)
    opt_plan = optimizer_plan(optimizer, optimizer_kwargs)
    candidates = _optimizer_candidates(opt_plan, allowed_optimizers, optimizer_kwargs)
    graph = capture(model, batch)
    base = Plan(sections={"optimizer": opt_plan},
                fingerprint=Fingerprint.of(model, graph.structure_hash()),
                environment=Environment.current(device))
    # Judged with the allowed optimizer that keeps the least state.
    leanest = min((base.replace(optimizer=o) for o in candidates),
                  key=lambda p: static_bytes(model, p)[2])
    _check_static_fit(model, leanest, budget, world_size)
    space = SearchSpace(batch_size=graph.batch_size // world_size,
                        block_names=tuple(b.fqn for b in graph.blocks),
                        precisions=_check_precisions(precisions, device),
                        optimizers=candidates, world_size=world_size,
                        compressors=_check_compressors(compressors, world_size),
                        compile_modes=_check_compile_modes(compile_modes, device, world_size))
    return _Setup(batch, budget, opt_plan, space, base, graph, device, world_size)


def _runner(model: nn.Module, setup: _Setup, *, source: WorkloadSource | None,
            loss_fn: LossFn | None, isolate: bool, warmup: int, iters: int,
            folder: contextlib.ExitStack, network: RankNetwork | None = None
            ) -> TrialRunner:  # fmt: skip
    """The worker runner (script or serialized model), or in-process for isolate=False."""
    if not isolate:
        return InProcessRunner(model, setup.batch, loss_fn=loss_fn, graph=setup.graph,
                               warmup=warmup, iters=iters)
    if source is None:
        tmp = folder.enter_context(tempfile.TemporaryDirectory(prefix="autoscale-"))
        source = pickle_workload(model, setup.batch, loss_fn, tmp)
    return WorkerRunner(source, device=setup.device,
                        fingerprint=setup.base.fingerprint_digest(), warmup=warmup,
                        iters=iters, world_size=setup.world_size, network=network)


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
    plan = _at_world_size(plan)
    device = next(model.parameters()).device
    here = Environment.current(device)
    env = plan.environment
    if env is not None and (env.device, env.torch) != (here.device, here.torch):
        warnings.warn(f"the plan was measured on {env.device} with torch {env.torch}; this is "
                      f"{here.device} with torch {here.torch}: its figures may not hold here.",
                      stacklevel=2)
    return build_result(plan, model, loss_fn=loss_fn, inplace=inplace, graph=graph)


def _at_world_size(plan: Plan) -> Plan:
    """``plan`` for this job's number of ranks: unchanged when it matches; re-sized when
    the shard section is size-agnostic; otherwise refused with the fix."""
    import torch.distributed as dist

    here = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    shard = plan.shard
    if shard.strategy == "none" or shard.world_size == here:
        return plan
    if not shard.size_agnostic:
        how = (f"run it under torchrun --nproc-per-node {shard.world_size} (with "
               "torch.distributed.init_process_group() called first)" if here == 1 else
               f"run it with {shard.world_size} ranks")
        raise PlanMismatchError(
            f"the plan was made for {shard.world_size} ranks (shard.world_size) but this job "
            f"has {here}; {how}, or tune a plan at {here} (autoscale tune --nproc {here}). "
            "A plan whose shard.size_agnostic is true runs at any size.")
    if here == 1:
        return plan.replace(shard=ShardPlan(), compress=CompressPlan())
    return plan.replace(shard=dataclasses.replace(shard, world_size=here, mesh=(here,)))


#: Fastest feasible trials re-measured after the search, and interleaved rounds of
#: (baseline, each finalist): see Note: [confirming the winner].
_FINALISTS = 3
#: How much faster than its exact twin a compressed plan must be: Note: [lossy plans earn
#: their place]. Confirmed medians of one plan spread by up to ~4% here.
LOSSY_MARGIN = 0.05
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


def _check_compile_modes(modes: Sequence[str] | None, device: torch.device,
                         world_size: int) -> tuple[str, ...]:  # fmt: skip
    from autoscale.plan._compile import COMPILE_MODES

    if modes is None:
        # On CPU inductor measured ~1.0x on the example models for 10-30 s of compile per
        # trial: searching it by default would only spend the user's trials.
        modes = ("off", "inductor") if device.type == "cuda" else ("off",)
    modes = tuple(dict.fromkeys(modes))
    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad or not modes:
        raise TunerError(f"compile_modes={list(modes)!r}: each must be one of "
                         f"{list(COMPILE_MODES)}.")
    if world_size > 1 and modes != ("off",):
        if "off" not in modes:
            raise TunerError(f"compile_modes={list(modes)!r} at world_size={world_size}: "
                             "autoscale compiles one-process plans only; add 'off' or use "
                             "world_size=1.")
        return ("off",)
    return modes


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


def _check_static_fit(model: nn.Module, plan: Plan, budget: int | None,
                      world_size: int = 1) -> None:
    """Refuse a budget below the model's static state (across ranks: its 1/N share under
    ZeRO-3, the most any strategy can divide it)."""
    if budget is None:
        return
    params, grads, state = (b // world_size for b in static_bytes(model, plan))
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


def _check_world_size(world_size: int, batch: Batch, device: torch.device) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise TunerError(f"world_size must be an integer >= 1, got {world_size!r}.")
    if world_size == 1:
        return
    if device.type == "cuda":
        have, what = torch.cuda.device_count(), "GPUs"
    else:
        # A rank per core: more would time-share cores, and the measured step times would
        # be the scheduler's, not the plan's.
        have, what = os.cpu_count() or 1, "CPU cores"
    if world_size > have:
        raise TunerError(f"world_size={world_size} needs one rank per device, but this machine "
                         f"has {have} {what}; lower --nproc / world_size to at most {have}.")
    total = batch_size(batch)
    if total % world_size:
        raise TunerError(f"the example batch has {total} samples, which {world_size} ranks "
                         f"cannot share equally; make it a multiple of {world_size} (it is "
                         "the global batch: each rank trains on 1/world_size of it).")


def _check_compressors(compressors: Sequence[str] | None, world_size: int
                       ) -> tuple[str, ...]:  # fmt: skip
    """The compressors the search may try; None: all of them where there are ranks."""
    allowed = ("none", "bf16", "fp16", "int8", "topk", "powersgd")
    if compressors is None:
        # fp16 sends the bytes bf16 does, with less range: by name only.
        return tuple(c for c in allowed if c != "fp16") if world_size > 1 else ("none",)
    bad = [c for c in compressors if c not in allowed]
    if bad:
        raise TunerError(f"compressors={list(compressors)!r}: each must be one of "
                         f"{list(allowed)}.")
    if world_size == 1 and any(c != "none" for c in compressors):
        raise TunerError("gradient compression needs several ranks (there is no gradient "
                         "communication at world_size=1); pass world_size >= 2 / --nproc 2, "
                         "or drop the compressors.")
    return ("none", *(c for c in dict.fromkeys(compressors) if c != "none"))


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
