"""The cost model's best guesses (Note: [the cost model orders the candidates]): the coarse
grid covers every knob, the guesses fit the budget by the estimate and come fastest first,
and a tune measures them right after the untouched model's plan."""

from __future__ import annotations

import itertools
import json

import pytest

from autoscale import OptimizerPlan, Plan
from autoscale.search._guesses import best_guesses, candidate_params
from autoscale.search._study import SearchSpace


def _space(**kw) -> SearchSpace:
    return SearchSpace(batch_size=8, block_names=("b.0", "b.1", "b.2", "b.3"),
                       precisions=("fp32", "bf16"), **kw)


def test_the_grid_is_every_knob_with_the_checkpoint_ends_and_middle() -> None:
    grid = candidate_params(_space())
    # micro 1, 2, 4, 8 x fp32/bf16 x first-n blocks 0, 2, 4 (no solver here)
    assert len(grid) == 4 * 2 * 3
    assert {p["checkpointed_blocks"] for p in grid} == {0, 2, 4}
    assert len({json.dumps(p, sort_keys=True) for p in grid}) == len(grid)
    ranked = candidate_params(_space(world_size=2, compressors=("none", "int8")))
    # ... x 4 strategies x 2 compressors, each under its family's parameter name
    assert len(ranked) == 4 * 2 * 3 * 8
    assert {(p["shard"], p.get("compress_ddp", p.get("compress_fsdp"))) for p in ranked} == \
        set(itertools.product(("ddp", "zero1", "zero2", "zero3"), ("none", "int8")))
    two = candidate_params(_space(optimizers=(OptimizerPlan(kind="adamw"),
                                              OptimizerPlan(kind="sgd"))))
    assert {p["optimizer"] for p in two} == {0, 1} and len(two) == 2 * len(grid)


def test_guesses_fit_by_the_estimate_and_come_fastest_first() -> None:
    space = _space()
    base = Plan()

    def memory(plan: Plan) -> int:  # fewer rows a micro-batch, less memory
        return (plan.batch.micro_batch_size or 8) * 100 + len(plan.checkpoint.blocks)

    def step_time(plan: Plan) -> float:
        if plan.precision.mode == "bf16" and plan.batch.micro_batch_size == 2:
            raise RuntimeError("not estimable")
        return 1.0 / (plan.batch.micro_batch_size or 8) + 0.01 * len(plan.checkpoint.blocks)

    guesses, note = best_guesses(space, base, memory=memory, step_time=step_time,
                                 budget=450, k=3)
    # micro 8 (800 B) is over the budget; micro 4 is the fastest that fits.
    assert [g.plan.batch.micro_batch_size for g in guesses] == [4, 4, 4]
    assert [len(g.plan.checkpoint.blocks) for g in guesses] == [0, 0, 2]
    times = [g.estimated_step_s for g in guesses]
    assert times == sorted(times)
    assert all(g.estimated_bytes <= 450 for g in guesses)
    assert "24 plans of a 24-point grid" in note
    assert "6 over the budget, 3 not estimable" in note
    # Params reproduce the plan the guess was priced as.
    assert all(space.plan_from(g.params, base) == g.plan for g in guesses)


def test_pricing_stops_at_its_time_limit() -> None:
    guesses, note = best_guesses(_space(), Plan(), memory=lambda p: 0,
                                 step_time=lambda p: 1.0, budget=None, k=2, time_limit_s=0.0)
    assert guesses == [] and "(stopped: 0 s)" in note


def test_the_step_time_estimate_learns_the_median_ratio_of_the_trials_before() -> None:
    import optuna

    from autoscale.search._study import step_time_error, step_time_scale

    study = optuna.create_study(direction="maximize")
    assert step_time_scale(study) == 1.0 and step_time_error(study) is None
    for priced, measured, extra in [(1.0, 2.0, {}), (1.0, 3.0, {}), (2.0, 2.0, {}),
                                    (1.0, 50.0, {"repeat_of": 0})]:  # a repeat: not again
        attrs = {"priced_step_s": priced, "step_time_s": measured,
                 "estimated_step_s": priced * step_time_scale(study), **extra}
        study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs=attrs))
    # Ratios 2, 3, 1: the median, not the mean, so one slow trial does not move it much.
    assert step_time_scale(study) == 2.0
    # The estimates made before each trial: 1.0 (no ratio yet), 2.0 (x2), 5.0 (x2.5):
    # errors 0.5, 1/3, 1.5 -> median 0.5.
    assert step_time_error(study) == (3, 0.5)


def test_the_child_sends_each_event_and_the_parent_keeps_them_whatever_happens() -> None:
    import ctypes
    import time

    from autoscale.search._guesses import ChildStream

    def produce(then):
        def run(emit):
            emit(("guess", Plan()))
            emit(("over",))
            then()
        return run

    def events_of(then, limit_s=30.0):
        stream = ChildStream(produce(then))
        return stream.collect(time.monotonic() + limit_s)

    events, why, _ = events_of(lambda: None)
    assert events == [("guess", Plan()), ("over",)] and why is None
    events, why, _ = events_of(lambda: 1 / 0)
    assert len(events) == 2 and why == "ZeroDivisionError: division by zero"
    events, why, _ = events_of(lambda: ctypes.string_at(0))
    assert len(events) == 2 and why == "crashed: SIGSEGV"
    start = time.monotonic()
    events, why, _ = events_of(lambda: time.sleep(60), limit_s=1.0)
    assert len(events) == 2 and why == "time limit" and time.monotonic() - start < 10
    never = ChildStream(produce(lambda: time.sleep(60)))
    never.close()  # killed and reaped without being collected
    with pytest.raises(RuntimeError, match="already collected"):
        never.collect(time.monotonic() + 1)


@pytest.mark.distributed
@pytest.mark.slow  # ~14 s; the child's crash and hang handling runs by default just above
def test_a_model_that_crashes_under_some_plan_costs_the_guesses_not_the_tune() -> None:
    from pathlib import Path

    from autoscale._api import optimize_script

    faulty = Path(__file__).resolve().parents[1] / "workloads" / "faulty.py"
    # Its micro-batches of 2 segfault and of 4 hang: the pricing, run in a child, meets
    # one of them.
    result = optimize_script(faulty, trials=1, precisions=("fp32",), optimizer="adam",
                             trial_timeout=10)
    notes = [n for n in result.report.notes if n.startswith("cost model")]
    # Priced largest micro-batch first: 8 (fine), then 4 hangs (the time limit) or, had it
    # come first, 2 segfaults; either way the plans priced before it are kept.
    assert len(notes) == 1 and ("stopped: time limit" in notes[0]
                                or "stopped: crashed: SIGSEGV" in notes[0]), notes


def test_where_compression_is_searched_the_untouched_plan_is_queued_with_int8_too() -> None:
    # Note: [the compressed known-good plan]
    import optuna

    from autoscale.search._study import _enqueue_known_good

    def space(*compressors: str) -> SearchSpace:
        return SearchSpace(batch_size=8, block_names=("h.0",), precisions=("fp32",),
                           world_size=2, compressors=compressors)

    searched = space("none", "powersgd", "topk", "int8", "bf16")
    params = searched.compressed_params()
    assert params == {**searched.default_params(), "compress_ddp": "int8"}
    plan = searched.plan_from(params, Plan())
    assert (plan.shard.strategy, plan.compress.method) == ("ddp", "int8")
    assert space("none", "powersgd", "bf16").compressed_params()["compress_ddp"] == "bf16"
    # nothing safe to queue, compression not searched, or one process: nothing
    assert space("none", "powersgd", "topk").compressed_params() is None
    assert space("none").compressed_params() is None
    assert SearchSpace(batch_size=8, block_names=(), precisions=("fp32",)
                       ).compressed_params() is None
    study = optuna.create_study(direction="maximize")
    _enqueue_known_good(study, searched)
    queued = [t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False)]
    assert queued == [searched.default_params(), params, searched.frugal_params()]
