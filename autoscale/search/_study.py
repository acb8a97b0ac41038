"""The plan search: an Optuna study over the knobs, with memory as a constraint.

Note: [why Optuna]
Optuna gives us, maintained elsewhere: samplers that handle categorical and integer
knobs with constraints (TPE's ``constraints_func`` steers away from infeasible regions
instead of treating them as bad scores), storages (in memory, SQLite, PostgreSQL)
that let a sweep resume or spread over workers, and per-trial records. We add what
is specific to training plans: a cost model that rejects plans before they run, and
isolation of each measured trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import signal
import socket
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from autoscale._units import format_bytes
from autoscale.cost._checkpoint_solver import CheckpointBudgets
from autoscale.cost._cost import Calibration, estimate_graph
from autoscale.errors import PlanError, TunerError
from autoscale.plan import (
    BatchPlan,
    CheckpointPlan,
    CompilePlan,
    CompressPlan,
    OptimizerPlan,
    Plan,
    PrecisionPlan,
    ShardPlan,
)
from autoscale.search._guesses import plan_key

__all__ = ["LinkCheck", "PlanEstimates", "SearchSpace", "TrialRecord", "open_study",
           "run_search"]

_CONSTRAINT = "peak_over_budget_bytes"  # Optuna: <= 0 is feasible
# The graph estimate (the fallback) over-counts saved activations by up to ~15% once
# calibrated; prune only what it is sure will not fit.
_PRUNE_MARGIN = 1.15
#: The simulated estimate's margin: its largest over-estimate measured
#: (bench/bench_estimate.py: 7 models, 9 plans each in one process, 12 each at 2 ranks).
#: One process: +4.3% (the HF Llama, Note: [the estimate is a simulated step]). At 2 ranks
#: every strategy, FSDP2 simulated itself (Note: [simulating FSDP2]), PowerSGD included:
#: at most +3.4% (Llama again). Compression whose codec the simulation cannot run (int8,
#: top-k) is estimated from the compress pass's report and errs higher: FSDP2 int8 up to
#: +6.3%, DDP int8 on the mlp example +13.9% (its probed codec, Note: [a DDP comm
#: hook's peak]).
SIMULATED_MARGIN = 1.05
SHARDED_MARGIN = {"ddp": 1.05, "zero1": 1.05, "zero2": 1.05, "zero3": 1.05}
CODEC_MARGIN = 1.15


class PlanEstimates:
    """Each trial's estimated peak, and the margin over the budget past which a plan is
    pruned unmeasured: see Note: [pruning on the estimate].

    Note: [pruning on the estimate]
    Plans are estimated by the simulated step (autoscale/cost/_simulate.py), cached per
    plan; a model the simulation cannot run falls back to the calibrated graph estimate,
    once, said in ``note``. A plan is pruned when its estimate exceeds the budget by more
    than the estimator's measured error (SIMULATED_MARGIN, SHARDED_MARGIN; _PRUNE_MARGIN
    for the graph),
    and every measured trial refines that margin: it grows to the largest
    estimate/measured ratio seen in this tune, so an estimator that over-counts on this
    model never prunes a plan like one that fitted. Under-estimates prune nothing: the
    measurement decides those.
    """

    def __init__(self, model: nn.Module, batch: Any, graph: Any, *, loss_fn: Any,
                 calibration: Calibration) -> None:
        self._model, self._batch, self._graph = model, batch, graph
        self._loss_fn, self._calibration = loss_fn, calibration
        self._cache: dict[str, tuple[int, str]] = {}
        self._simulate = True
        self._worst = 0.0
        self.note: str | None = None

    def bytes(self, plan: Plan) -> int:
        """The estimated per-rank peak of ``plan``."""
        key = plan_key(plan)
        if key not in self._cache:
            self._cache[key] = self._estimate(plan)
        return self._cache[key][0]

    def _estimate(self, plan: Plan) -> tuple[int, str]:
        from autoscale.cost._cost import simulated_estimate

        if self._simulate:
            try:
                return (simulated_estimate(self._model, self._batch, plan, graph=self._graph,
                                           loss_fn=self._loss_fn).total, "simulated")
            except PlanError as err:
                self._simulate = False
                self.note = (f"estimates: the graph's (calibrated), not the simulated step: "
                             f"{err}")
        return estimate_graph(self._model, self._graph, plan,
                              calibration=self._calibration).total, "graph"

    def margin(self, plan: Plan) -> float:
        """How far over the budget ``plan``'s estimate may be before it is pruned."""
        if not self._simulate:
            base = _PRUNE_MARGIN
        elif plan.compress.method in ("int8", "topk"):
            base = CODEC_MARGIN
        else:
            base = SHARDED_MARGIN.get(plan.shard.strategy, SIMULATED_MARGIN)
        return max(base, self._worst)

    def learn(self, estimated: int, measured: int) -> None:
        """Refine the margin from one measured trial."""
        if measured > 0:
            self._worst = max(self._worst, estimated / measured)


@dataclass(frozen=True)
class SearchSpace:
    """The knobs the tuner may turn, derived from the model and the user's allowances.

    ``batch_size`` is what one rank trains on per step: the example batch's size, or its
    share of it (batch / world_size) for a multi-rank plan, where the sharding strategy
    (``strategies``) and the gradient compression (``compressors``) are knobs too.
    """

    batch_size: int
    block_names: tuple[str, ...]
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    optimizers: tuple[OptimizerPlan, ...] = ()
    world_size: int = 1
    strategies: tuple[str, ...] = ("ddp", "zero1", "zero2", "zero3")
    compressors: tuple[str, ...] = ("none",)
    compile_modes: tuple[str, ...] = ("off",)
    """torch.compile modes the search may pick (autoscale/plan/_compile.py): a knob only
    when more than one is allowed, and only for one-process plans."""
    checkpoint: CheckpointBudgets | None = dataclasses.field(default=None, compare=False)
    """The solver behind the checkpoint knob (Note: [the checkpoint knob]): the knob is
    then ``activation_budget``, a fraction, and every block gets the policy (none, full or
    selective) the exact solver picks for it. None: the knob is ``checkpointed_blocks``,
    full checkpointing of the first n blocks (a model the simulator cannot run)."""

    @property
    def solves_checkpoints(self) -> bool:
        return self.checkpoint is not None and bool(self.block_names)

    @property
    def micro_batch_sizes(self) -> list[int]:
        return [d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def compressors_for(self, strategy: str) -> list[str]:
        """The compressors that combine with ``strategy``: every one (under DDP as comm
        hooks, under FSDP2 as custom reduce-scatters: passes/compress.py)."""
        return list(self.compressors)

    def plan_from(self, params: dict[str, Any], base: Plan) -> Plan:
        """The plan that a trial's parameters stand for."""
        micro = params.get("micro_batch_size", self.batch_size)
        changes: dict[str, Any] = {
            "batch": BatchPlan(micro_batch_size=None if micro == self.batch_size else micro,
                               grad_accum_steps=self.batch_size // micro),
            "precision": PrecisionPlan(mode=params.get("precision", "fp32")),
        }
        if len(self.optimizers) > 1:
            changes["optimizer"] = self.optimizers[params["optimizer"]]
        if self.distributed:
            strategy = params.get("shard", "ddp")
            changes["shard"] = ShardPlan(strategy=strategy, world_size=self.world_size)
            method = params.get(_compress_param(strategy), "none")
            changes["compress"] = CompressPlan(method=method)
        mode = params.get("compile", self.compile_modes[0] if not self.distributed else "off")
        if mode != "off":
            changes["compile"] = CompilePlan(
                mode=mode, activation_memory_budget=1.0 if mode == "inductor-budget" else None)
        plan = base.replace(**changes)
        if mode == "inductor-budget" and "activation_budget" in params:
            # Note: [compile's own budget]: the same knob, handed to inductor's min-cut
            # partitioner instead of the solver (the alternative the benchmark compares).
            fraction = max(_MIN_COMPILE_BUDGET, round(float(params["activation_budget"]), 4))
            return plan.replace(compile=CompilePlan(mode=mode,
                                                    activation_memory_budget=fraction))
        if self.checkpoint is not None and "activation_budget" in params:
            fraction = round(float(params["activation_budget"]), 4)
            try:
                section = self.checkpoint.section(plan, fraction)
            except Exception:  # the model fails under this plan: its trial reports why
                # The simulation runs in the tuner's own process; a model that crashes
                # under (say) bf16 autocast must fail that trial alone, in its isolated
                # worker, with the model's own error. The nearest old-knob plan goes there.
                section = CheckpointPlan(
                    blocks=self.block_names[:round((1.0 - fraction) * len(self.block_names))])
        else:
            section = CheckpointPlan(
                blocks=self.block_names[:params.get("checkpointed_blocks", 0)])
        return plan.replace(checkpoint=section)

    def _checkpoint_param(self, trial: optuna.Trial) -> dict[str, Any]:
        if self.solves_checkpoints:
            return {"activation_budget": trial.suggest_float(
                "activation_budget", 0.0, 1.0, step=_BUDGET_STEP)}
        return {"checkpointed_blocks": trial.suggest_int("checkpointed_blocks", 0,
                                                         len(self.block_names))}

    def _checkpoint_extreme(self, *, most: bool) -> dict[str, Any]:
        """The knob at its most memory-saving (most) or at no checkpointing."""
        if self.solves_checkpoints:
            return {"activation_budget": 0.0 if most else 1.0}
        return {"checkpointed_blocks": len(self.block_names) if most else 0}

    def suggest(self, trial: optuna.Trial, base: Plan) -> Plan:
        params = {
            "micro_batch_size": trial.suggest_categorical("micro_batch_size",
                                                          self.micro_batch_sizes),
            "precision": trial.suggest_categorical("precision", list(self.precisions)),
            **self._checkpoint_param(trial),
        }
        if len(self.compile_modes) > 1 and not self.distributed:
            params["compile"] = trial.suggest_categorical("compile", list(self.compile_modes))
        if len(self.optimizers) > 1:
            params["optimizer"] = trial.suggest_categorical(
                "optimizer", list(range(len(self.optimizers))))
        if self.distributed:
            strategy = trial.suggest_categorical("shard", list(self.strategies))
            params["shard"] = strategy
            # One parameter name per family: an Optuna categorical keeps its choices fixed.
            name = _compress_param(strategy)
            params[name] = trial.suggest_categorical(name, self.compressors_for(strategy))
        return self.plan_from(params, base)

    def frugal_params(self) -> dict[str, Any]:
        """The plan most likely to fit: every block checkpointed, low precision, 1/8 batch
        (and, across ranks, everything sharded)."""
        sizes = self.micro_batch_sizes
        micro = min((d for d in sizes if d >= self.batch_size / 8), default=sizes[-1])
        low = "bf16" if "bf16" in self.precisions else self.precisions[-1]
        params: dict[str, Any] = {"micro_batch_size": micro, "precision": low,
                                  **self._checkpoint_extreme(most=True)}
        if len(self.optimizers) > 1:
            params["optimizer"] = 0
        if len(self.compile_modes) > 1 and not self.distributed:
            params["compile"] = "off"
        if self.distributed:
            strategy = self.strategies[-1]
            params["shard"] = strategy
            params[_compress_param(strategy)] = "none"
        return params

    def compressed_params(self) -> dict[str, Any] | None:
        """The untouched model's plan with the compressor least likely to change training
        (Note: [the compressed known-good plan]), or None where compression is not searched.
        """
        kept = [c for c in _SAFEST_FIRST if c in self.compressors_for(self.strategies[0])]
        if not self.distributed or not kept:
            return None
        params = self.default_params()
        params[_compress_param(self.strategies[0])] = kept[0]
        return params

    def default_params(self) -> dict[str, Any]:
        """The untouched model's plan (across ranks: plain DDP, nothing compressed)."""
        params: dict[str, Any] = {"micro_batch_size": self.batch_size,
                                  "precision": self.precisions[0],
                                  **self._checkpoint_extreme(most=False)}
        if len(self.optimizers) > 1:
            params["optimizer"] = 0
        if len(self.compile_modes) > 1 and not self.distributed:
            params["compile"] = self.compile_modes[0]
        if self.distributed:
            strategy = self.strategies[0]
            params["shard"] = strategy
            params[_compress_param(strategy)] = "none"
        return params


#: The checkpoint knob's step: 21 budgets from the leanest policies (0) to none (1).
_BUDGET_STEP = 0.05
#: inductor's activation_memory_budget must be > 0: the knob's 0 becomes this.
_MIN_COMPILE_BUDGET = 0.05


# Note: [the compressed known-good plan]
# Where the link check says compression can pay, the untouched plan with the compressor
# least likely to change training is queued beside it: int8 with error feedback sends a
# quarter of the bytes and carries what it rounds off to the next step (the sum of what a
# rank sent differs from the sum of its gradients by one bounded residual); 16-bit casts
# halve them with no feedback. PowerSGD and top-k send far less but change the first
# steps' updates: over 100 Mbit/s on the GPT example the TPE trials found them fastest and
# the convergence guardrail set both aside (+23% and +31% loss after 24 steps), and int8,
# never sampled, was not there to take their place (bench/bench_tune_link.py).
_SAFEST_FIRST = ("int8", "bf16", "fp16")


def _compress_param(strategy: str) -> str:
    return "compress_fsdp" if strategy in ("zero2", "zero3") else "compress_ddp"


#: The uncompressed all-reduce's share of the baseline step below which compression is
#: not searched: see Note: [when compression can pay].
COMPRESS_MIN_SHARE = 0.15


@dataclass(frozen=True)
class LinkCheck:
    """Whether gradient compression can pay between the ranks, judged before any trial.

    Note: [when compression can pay]
    Compression can save at most the time the uncompressed gradient reduction takes: the
    all-reduce of every gradient byte, timed on the trial ranks' own link before the
    search (a bound: DDP overlaps part of it with backward). It costs encode and decode
    work on every step, which bench/bench_compress.py measured at 5-15% of the step on
    loopback, where every compressor lost to plain DDP (the all-reduce there: ~10% of
    the GPT example's step). So compression is searched only when that all-reduce takes
    at least COMPRESS_MIN_SHARE of the baseline step: on loopback it is not tried at
    all; over a 1 Gbit/s or 100 Mbit/s link (half the step or more) it is. What a lossy
    plan must then show is in Note: [lossy plans earn their place] (autoscale/_api.py).
    """

    gradient_bytes: int
    all_reduce_s: float
    step_time_s: float

    @property
    def share(self) -> float:
        """The uncompressed all-reduce over the baseline step time."""
        return self.all_reduce_s / self.step_time_s

    @property
    def worth_searching(self) -> bool:
        return self.share >= COMPRESS_MIN_SHARE

    @property
    def bytes_per_s(self) -> float:
        """Gradient bytes all-reduced per second (the algorithm's, not the wire's)."""
        return self.gradient_bytes / self.all_reduce_s

    def describe(self) -> str:
        verdict = ("compression searched" if self.worth_searching else
                   f"compression not searched (under {COMPRESS_MIN_SHARE:.0%}: it cannot "
                   "win back its own encode/decode time)")
        return (f"link: an all-reduce of the {format_bytes(self.gradient_bytes)} of "
                f"gradients takes {self.all_reduce_s * 1e3:.1f} ms, {self.share:.0%} of the "
                f"baseline's {self.step_time_s * 1e3:.1f} ms step "
                f"({format_bytes(int(self.bytes_per_s))}/s): {verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {"gradient_bytes": self.gradient_bytes, "all_reduce_s": self.all_reduce_s,
                "step_time_s": self.step_time_s, "share": self.share,
                "compression_searched": self.worth_searching}


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the report shows it."""

    number: int
    plan: Plan
    state: str  # "measured", "pruned by cost model", "failed", "repeat of #N"
    samples_per_s: float | None
    peak_memory_bytes: int | None
    estimated_bytes: int
    feasible: bool
    note: str = ""
    counted: int = 0
    """Trials of the study that count towards the requested total once this one ends
    (earlier runs of a resumed study included): the progress bar's position."""
    compile_time_s: float | None = None
    """A compiled plan's compile time (its first step beyond a steady one), reported apart
    from the step time; None for eager plans."""

    @property
    def is_repeat(self) -> bool:
        """A plan the sampler proposed again: figures reused, nothing measured."""
        return self.state.startswith("repeat of")


def storage_url(storage: str | None) -> str | None:
    """None (in memory), a SQLite file path, or any SQLAlchemy URL Optuna accepts."""
    if storage is None:
        return None
    if not isinstance(storage, str) or not storage:
        raise TunerError(f"storage={storage!r} must be a path to a SQLite file (study.db) or a "
                         "database URL (sqlite:///study.db, postgresql://user@host/db).")
    if "://" in storage:
        return storage
    path = Path(storage).expanduser().resolve()
    if not path.parent.is_dir():
        raise TunerError(f"storage={storage!r}: folder {str(path.parent)!r} does not exist; "
                         "create it or pick another path.")
    return f"sqlite:///{path}"


#: The samplers a tune may use: Optuna's TPE (the default: it reads the memory constraint)
#: and its random sampler (the baseline a search-quality benchmark compares TPE with).
SAMPLERS = ("tpe", "random")


def open_study(*, storage: str | None, study_name: str, seed: int,
               heartbeat_s: float | None = 10.0, sampler: str = "tpe",
               objective: str = "throughput") -> optuna.Study:
    """Create the study, or resume the one stored under ``study_name``, sampled by
    ``sampler`` (one of SAMPLERS), seeded with ``seed``, for ``objective`` (one of
    OBJECTIVES: Note: [the pareto objective]). A stored study made for the other objective
    is refused with TunerError.

    Note: [many workers, one study]
    Any number of ``autoscale tune`` processes, on one machine or many, may run one study
    in one database storage (PostgreSQL for many workers; SQLite locks the whole file and
    suits a few on one machine). Each process asks Optuna for one trial at a time
    (``study.optimize(n_trials=1)``), so Optuna's heartbeat runs: a thread stamps the
    running trial every ``heartbeat_s`` seconds, and a worker starting a trial first fails
    every trial whose stamp is older than three beats (its worker died: killed, out of
    memory, the machine lost). RetryHeartbeatStaleTrialCallback then queues the same parameters
    once more, so a dead worker's plan is measured by someone else: no trial stays
    RUNNING for ever and none is lost. A plan another worker is measuring right now is not
    measured twice (run_search: a "repeat of #N (running)", not counted).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bar reports trials
    if sampler not in SAMPLERS:
        raise TunerError(f"sampler={sampler!r} is not one of {list(SAMPLERS)}; use 'tpe' "
                         "(the default) or 'random'.")
    if objective not in OBJECTIVES:
        raise TunerError(f"objective={objective!r} is not one of {list(OBJECTIVES)}.")
    directions = OBJECTIVES[objective]
    # Constraints come from trial.set_constraint (Optuna >= 5), which TPE reads itself.
    chosen: optuna.samplers.BaseSampler = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=4) if sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed))
    url = storage_url(storage)
    try:
        backend: Any = url
        if url is not None and heartbeat_s:
            with warnings.catch_warnings():  # heartbeat_interval is experimental in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                backend = optuna.storages.RDBStorage(
                    url, heartbeat_interval=max(1, round(heartbeat_s)),
                    grace_period=max(3, round(3 * heartbeat_s)),
                    heartbeat_stale_trial_callback=_retry_once())
        study = optuna.create_study(
            storage=backend, study_name=study_name, sampler=chosen, load_if_exists=True,
            directions=[optuna.study.StudyDirection[d.upper()] for d in directions])
    except (ImportError, ValueError, RuntimeError) as err:
        raise TunerError(f"could not open the Optuna storage {storage!r}: {err}. Check the "
                         "URL and that its database driver is installed.") from err
    stored = tuple(d.name.lower() for d in study.directions)
    if stored != directions:
        other = next(k for k, v in OBJECTIVES.items() if v == stored)
        raise TunerError(f"the stored study {study_name!r} was made for objective={other!r}, "
                         f"not {objective!r}: resume it with objective={other!r}, or give "
                         "this run another study name.")
    return study


Measure = Callable[[Plan], Any]

#: What the search optimizes, as Optuna's study directions. Note: [the pareto objective]
#: "throughput": samples per second, under the memory budget (a constraint). "pareto":
#: samples per second and the measured peak memory at once (under the same constraint):
#: TPE's multi-objective mode (MOTPE) then samples towards the whole trade-off, not only
#: the fastest plan that fits, and the tune returns the feasible Pareto front of what it
#: measured (Report.front) beside the fastest plan, which it still applies.
OBJECTIVES: dict[str, tuple[str, ...]] = {"throughput": ("maximize",),
                                          "pareto": ("maximize", "minimize")}


def throughput(trial: optuna.trial.FrozenTrial) -> float:
    """A finished trial's samples per second, whatever the study's objective."""
    values = trial.values
    return float(values[0]) if values else 0.0


def _retry_once() -> Any:
    with warnings.catch_warnings():  # experimental in Optuna 5: its interface may change
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)

_WORKER = f"{socket.gethostname()}:{os.getpid()}"

#: user_attrs keys: the one-line reason a trial failed; set on a trial stopped by Ctrl-C.
_ERROR, _INTERRUPTED = "error", "interrupted"


class _FailedTrial(Exception):
    """Raised out of the objective so that Optuna stores the trial as FAIL."""


def counted_trials(study: optuna.Study) -> int:
    """Trials of ``study`` that count towards the requested total: measured, pruned by
    the cost model or failed with a reason; not repeats, not ones Ctrl-C stopped."""
    return sum(1 for t in study.get_trials(deepcopy=False) if _counts(t))


def _counts(t: optuna.trial.FrozenTrial) -> bool:
    if "repeat_of" in t.user_attrs:
        return False
    if t.state == optuna.trial.TrialState.COMPLETE:
        return True
    return t.state == optuna.trial.TrialState.FAIL and _ERROR in t.user_attrs


_STEP_PRICED = "priced_step_s"


def step_time_scale(study: optuna.Study) -> float:
    """The step-time estimate's correction learnt so far: the median of measured over
    priced step time over the study's measured trials (1.0 before the first).

    Note: [refining the step time on every trial]
    The cost model prices the candidates once, at this machine's rates scaled onto the
    measured baseline (autoscale/cost/_time.py, ``refine``). Every measured trial of a
    priced plan then records both figures, ``priced_step_s`` and ``step_time_s``, and the
    next trial's ``estimated_step_s`` is its price times the median ratio of those before
    it: the estimate learns what this model's steps cost here from every measurement, and
    the study keeps estimate and measurement side by side (``autoscale report`` and the
    tune's closing note show how close they came). It is read from the study, so every
    worker sharing it learns from all of them. A median, not a mean: one trial slowed by
    the shared machine must not move it.
    """
    ratios = sorted(t.user_attrs["step_time_s"] / t.user_attrs[_STEP_PRICED]
                    for t in study.get_trials(deepcopy=False)
                    if t.state == optuna.trial.TrialState.COMPLETE
                    and t.user_attrs.get(_STEP_PRICED) and "step_time_s" in t.user_attrs
                    and "repeat_of" not in t.user_attrs)
    return statistics.median(ratios) if ratios else 1.0


def step_time_error(study: optuna.Study) -> tuple[int, float] | None:
    """(measured trials with an estimate made before them, the median |estimated /
    measured - 1| of those estimates), or None when no trial had both."""
    errs = [abs(t.user_attrs["estimated_step_s"] / t.user_attrs["step_time_s"] - 1)
            for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE
            and "estimated_step_s" in t.user_attrs and "step_time_s" in t.user_attrs
            and "repeat_of" not in t.user_attrs]
    return (len(errs), statistics.median(errs)) if errs else None


def run_search(study: optuna.Study, space: SearchSpace, base: Plan, *,
               estimates: PlanEstimates, budget: int | None, trials: int,
               measure: Measure, on_trial: Callable[[TrialRecord], None] | None = None,
               guesses: Sequence[Any] = (),
               step_estimates: Mapping[str, float] | None = None,
               objective: str = "throughput") -> list[TrialRecord]:
    """Run trials until the study holds ``trials`` counted ones; returns this run's records.

    A resumed study (same storage and name) runs only the missing trials, and a plan
    already measured is never measured again. Each trial's plan is first estimated; one
    the cost model is sure exceeds the budget is recorded as infeasible without running.
    Others are measured by ``measure(plan)``; a TrialFailed there (crash, hang, out of
    memory, exception, in the worker) fails that trial only, stored as FAIL with its
    reason (Note: [pruning on the estimate]). KeyboardInterrupt propagates after the
    running trial is marked interrupted
    (FAIL, not counted, measured again on resume).

    ``guesses`` (autoscale/search/_guesses.py's Guess) are queued right after the
    untouched model's plan and before the frugal one: Note: [the cost model orders the
    candidates]. ``step_estimates`` (plan_key -> seconds: the cost model's priced plans,
    refined on the baseline) make the step-time estimate learn from every measurement: see
    Note: [refining the step time on every trial].
    """
    from autoscale.search._workers import TrialFailed

    records: list[TrialRecord] = []
    fail_orphans(study)
    _enqueue_known_good(study, space, [g.params for g in guesses])
    step_guess = {plan_key(g.plan): g.estimated_step_s for g in guesses}
    step_guess.update(step_estimates or {})

    def scored(samples_per_s: float, peak: float) -> float | tuple[float, float]:
        return (samples_per_s, peak) if objective == "pareto" else samples_per_s

    def evaluate(trial: optuna.Trial) -> float | tuple[float, float]:
        interrupts.check()
        try:
            plan = space.suggest(trial, base)
        except PlanError as err:  # a combination of knobs the plan rules refuse
            trial.set_user_attr(_ERROR, f"refused: {err}")
            trial.set_constraint(_CONSTRAINT, 1.0)
            raise _FailedTrial(str(err)) from err
        trial.set_user_attr("worker", _WORKER)  # which process ran it: many may share a study
        est = estimates.bytes(plan)
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr("estimated_bytes", est)
        guessed = step_guess.get(plan_key(plan))
        if guessed is not None:
            trial.set_user_attr(_STEP_PRICED, guessed)
            trial.set_user_attr("estimated_step_s", guessed * step_time_scale(trial.study))
        prior = _same_params(trial)
        if prior is not None:
            return _repeat(trial, prior, plan, est)
        if (running := _running_twin(trial)) is not None:
            trial.set_user_attr("repeat_of", running)
            raise _FailedTrial(f"another worker is measuring the same plan (trial #{running})")
        margin = estimates.margin(plan)
        trial.set_user_attr("prune_margin", margin)
        if budget is not None and est > budget * margin:
            trial.set_constraint(_CONSTRAINT, float(est - budget))
            _record(records, on_trial, TrialRecord(trial.number, plan, "pruned by cost model",
                                                   None, None, est, False), trial.study)
            return scored(0.0, float(est))
        try:
            with interrupts.safe():
                m = measure(plan)
        except TrialFailed as err:  # isolation: this trial fails, the search goes on
            trial.set_user_attr(_ERROR, err.reason)
            _record(records, on_trial, TrialRecord(trial.number, plan, "failed", None, None,
                                                   est, False, err.reason), trial.study)
            raise _FailedTrial(err.reason) from err
        except BaseException:
            trial.set_user_attr(_INTERRUPTED, True)
            raise
        estimates.learn(est, m.peak_memory_bytes)
        over = 0.0 if budget is None else float(m.peak_memory_bytes - budget)
        trial.set_constraint(_CONSTRAINT, over)
        trial.set_user_attr("peak_memory_bytes", int(m.peak_memory_bytes))
        trial.set_user_attr("step_time_s", float(m.step_time_s))
        compile_s = m.first_step_overhead_s if plan.compile.active else None
        if compile_s is not None:
            trial.set_user_attr("compile_time_s", float(compile_s))
        _record(records, on_trial, TrialRecord(trial.number, plan, "measured", m.samples_per_s,
                                               m.peak_memory_bytes, est, over <= 0,
                                               compile_time_s=compile_s), trial.study)
        return scored(float(m.samples_per_s), float(m.peak_memory_bytes))

    def _repeat(trial: optuna.Trial, prior: optuna.trial.FrozenTrial, plan: Plan,
                est: int) -> float | tuple[float, float]:  # fmt: skip
        # The sampler proposed a plan already tried: reuse its figures instead of spending
        # a measurement (a small discrete space makes TPE propose repeats often).
        peak = prior.user_attrs.get("peak_memory_bytes")
        for key in ("peak_memory_bytes", "step_time_s", _ERROR):
            if key in prior.user_attrs:
                trial.set_user_attr(key, prior.user_attrs[key])
        trial.set_user_attr("repeat_of", prior.number)
        state = f"repeat of #{prior.number}"
        if prior.state == optuna.trial.TrialState.FAIL:
            reason = prior.user_attrs[_ERROR]
            _record(records, on_trial, TrialRecord(trial.number, plan, state, None, None, est,
                                                   False, reason), trial.study)
            raise _FailedTrial(reason)
        if peak is None:  # pruned before: the same again
            trial.set_constraint(_CONSTRAINT, max(1.0, float(est - (budget or 0))))
            value, fits = 0.0, False
        else:
            over = 0.0 if budget is None else float(peak - budget)
            trial.set_constraint(_CONSTRAINT, over)
            value, fits = throughput(prior), over <= 0
        _record(records, on_trial, TrialRecord(trial.number, plan, state, value or None, peak,
                                               est, fits), trial.study)
        return scored(value, float(peak if peak is not None else est))

    # Optuna logs each FAIL trial as a warning with a traceback; the report shows the
    # reason in one line instead.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Repeats are free and do not count. The cap ends the run when the sampler keeps
    # proposing tried plans (a space nearly covered).
    missing = trials - counted_trials(study)
    attempts = 0
    with _DeferredInterrupt() as interrupts:
        while counted_trials(study) < trials and attempts < 3 * max(missing, 0):
            study.optimize(evaluate, n_trials=1, gc_after_trial=False, catch=(_FailedTrial,))
            interrupts.check()
            attempts += 1
        _settle(study, lambda: study.optimize(evaluate, n_trials=1, gc_after_trial=False,
                                              catch=(_FailedTrial,)))
        interrupts.check()
    return records


class _DeferredInterrupt:
    """Ctrl-C during a sweep stops it only where stopping is safe.

    Note: [Ctrl-C between trials]
    Python raises KeyboardInterrupt wherever the main thread is. Between trials that is
    inside Optuna's bookkeeping (``_run_trial`` after the objective returned: it failed
    with Optuna's own "Should not reach" assertion, 1 run in 15 here) or in a callback torch
    makes from C++ (the estimate's fake tensors), and CI saw the tuner hang after its
    "interrupted" line and abort with "terminate called after throwing an instance of
    'python_error'". So, while the sweep runs, a first SIGINT is noted, and raised at the
    next safe point: while a measurement is awaited (the tuner polls its workers), at the
    start of the next trial, or after the trial in hand. A second SIGINT raises at once.
    The handler is installed only from the main thread and only over Python's default one
    (a program that set its own keeps it), and restored afterwards."""

    def __init__(self) -> None:
        self.pending = False
        self._safe = 0
        self._previous: Any = None

    def __enter__(self) -> _DeferredInterrupt:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._safe or self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        """Raise the Ctrl-C noted since the last safe point, if any."""
        if self.pending:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def safe(self) -> Iterator[None]:
        """A region where a Ctrl-C raises at once (a noted one raises on entry)."""
        self.check()
        self._safe += 1
        try:
            yield
        finally:
            self._safe -= 1


#: The longest a leaving worker waits for other workers' running trials (one slow trial).
_SETTLE_S = 600.0


def _settle(study: optuna.Study, run_one: Callable[[], None]) -> None:
    """Before this worker leaves: wait for the trials other workers are running to end,
    fail those whose worker died (heartbeat stale), and measure the retries that queues,
    so a dead worker's trial is neither left RUNNING nor lost (Note: [many workers, one
    study]). A live worker's trial ends by itself; the wait is bounded by _SETTLE_S. Trials
    started after this point are their workers' own to settle."""
    storage = study._storage
    interval = storage.get_heartbeat_interval() if hasattr(
        storage, "get_heartbeat_interval") else None
    if not interval:
        return
    running = (optuna.trial.TrialState.RUNNING,)

    def pending() -> set[int]:
        fail_orphans(study)
        return {t.number for t in study.get_trials(deepcopy=False, states=running)}

    waiting_for, deadline = pending(), time.monotonic() + _SETTLE_S
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while waiting_for & pending() and time.monotonic() < deadline:
            optuna.storages.fail_stale_trials(study)
            time.sleep(min(interval, 1.0))
    waiting = (optuna.trial.TrialState.WAITING,)
    for _ in range(len(study.get_trials(deepcopy=False, states=waiting))):
        run_one()  # the retries of trials whose worker died


def fail_orphans(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials that never got a heartbeat and started longer ago than the
    storage's grace period; return their numbers.

    A worker stopped between Optuna creating its trial and the heartbeat thread's first
    stamp (Ctrl-C lands there when it comes as a trial ends) leaves a RUNNING trial with no
    heartbeat row, and Optuna's stale check skips such trials, so it would stay RUNNING for
    ever and a leaving worker would wait for it. A live worker stamps its trial at once,
    so one without a stamp after the grace period has no worker. It is failed as
    interrupted (not counted, its plan never chosen) and not retried: it never got to
    measure anything. Storages without a heartbeat: nothing to do."""
    storage = study._storage
    rdb = getattr(storage, "_backend", storage)  # Optuna caches an RDBStorage in front
    if not isinstance(rdb, optuna.storages.RDBStorage):
        return []
    interval = rdb.get_heartbeat_interval()
    if not interval:
        return []
    grace = rdb.grace_period or 2 * interval
    # Optuna writes datetime_start with the worker's clock (datetime.now()).
    old = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
           if t.datetime_start is not None
           and (datetime.datetime.now() - t.datetime_start).total_seconds() > grace]
    if not old:
        return []
    # Optuna has no public query for "has a heartbeat"; its RDB model is the record.
    from optuna.storages._rdb import models
    session = rdb.scoped_session()
    try:
        stamped = {h.trial_id for h in session.query(models.TrialHeartbeatModel).filter(
            models.TrialHeartbeatModel.trial_id.in_([t._trial_id for t in old]))}
    finally:
        rdb.scoped_session.remove()
    orphans = [(t._trial_id, t.number) for t in old if t._trial_id not in stamped]
    failed = []
    for trial_id, number in orphans:
        try:
            storage.set_trial_user_attr(trial_id, _INTERRUPTED, True)
            if storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
                failed.append(number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # its worker, or another one, finished it meanwhile
    return failed


def _enqueue_known_good(study: optuna.Study, space: SearchSpace,
                        guesses: Sequence[dict[str, Any]] = ()) -> None:
    """Queue the default plan, the cost model's ``guesses``, the compressed default plan
    (where compression is searched) and the frugal plan, in that order, unless the study
    already tried or queued them (a resumed study whose first trial Ctrl-C stopped queues
    it again)."""
    done = [t.params for t in study.get_trials(deepcopy=False) if _counts(t)]
    waiting = [t.params for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.WAITING,))]
    compressed = space.compressed_params()
    for params in (space.default_params(), *guesses,
                   *([compressed] if compressed else []), space.frugal_params()):
        if params not in done and params not in waiting:
            study.enqueue_trial(params)
            waiting.append(params)


def _same_params(trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """An earlier finished trial of this study with exactly ``trial``'s parameters, or
    with the same plan (two checkpoint budgets the solver answers alike)."""
    finished = trial.study.get_trials(deepcopy=False)
    same = _same_plan(trial)
    return next((t for t in finished if t.number != trial.number and _counts(t)
                 and same(t)), None)


def _same_plan(trial: optuna.Trial) -> Callable[[optuna.trial.FrozenTrial], bool]:
    params, plan = trial.params, trial.user_attrs.get("plan")
    return lambda t: t.params == params or (plan is not None
                                            and t.user_attrs.get("plan") == plan)


def _running_twin(trial: optuna.Trial) -> int | None:
    """The number of a trial with ``trial``'s plan that another worker is running."""
    running = trial.study.get_trials(deepcopy=False,
                                     states=(optuna.trial.TrialState.RUNNING,))
    same = _same_plan(trial)
    return next((t.number for t in running if t.number != trial.number and same(t)), None)


def _record(records: list[TrialRecord], on_trial: Callable[[TrialRecord], None] | None,
            record: TrialRecord, study: optuna.Study) -> None:
    # The running trial is not stored as finished yet: it counts unless it is a repeat.
    done = counted_trials(study) + (0 if record.is_repeat else 1)
    record = dataclasses.replace(record, counted=done)
    records.append(record)
    if on_trial is not None:
        on_trial(record)



def top_feasible(study: optuna.Study, budget: int | None, k: int
                 ) -> list[optuna.trial.FrozenTrial]:  # fmt: skip
    """Up to ``k`` measured trials of distinct plans whose peak fits ``budget``, highest
    throughput first.

    Judged on the stored peak, not the stored constraint, so a study resumed with another
    budget is judged by the budget of this run.
    """
    done = [t for t in study.trials
            if t.state == optuna.trial.TrialState.COMPLETE and throughput(t) > 0
            and "peak_memory_bytes" in t.user_attrs
            and (budget is None or t.user_attrs["peak_memory_bytes"] <= budget)]
    out, seen = [], set()
    for t in sorted(done, key=throughput, reverse=True):
        key = json.dumps(t.user_attrs.get("plan"), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(t)
        if len(out) == k:
            break
    return out


def closest_miss(study: optuna.Study) -> int | None:
    peaks = [t.user_attrs["peak_memory_bytes"] for t in study.trials
             if "peak_memory_bytes" in t.user_attrs]
    return min(peaks) if peaks else None

