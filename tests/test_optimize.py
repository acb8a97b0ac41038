"""optimize() and apply() end to end on real models, with real Optuna storages."""

from __future__ import annotations

import optuna
import pytest
import torch
from tests_helpers import params_of

import autoscale
from autoscale import (
    CaptureError,
    InfeasibleError,
    Plan,
    PlanError,
    PlanMismatchError,
    TunerError,
)

# fp16 autocast on CPU runs far slower than bf16 and tells the tests nothing more; the
# runtime tests cover it.
FAST = ("fp32", "bf16")


@pytest.fixture
def gpt():
    from tests_helpers import tiny_gpt

    return tiny_gpt(batch_size=8)


@pytest.mark.distributed
def test_short_optimize_returns_a_measured_plan_that_fits(gpt) -> None:
    model, batch = gpt
    before = params_of(model)
    rng_before = torch.get_rng_state()
    budget = 24 * 2**20
    result = autoscale.optimize(model, batch, memory_budget="24MiB", trials=4, seed=0,
                                precisions=FAST)
    assert torch.equal(torch.get_rng_state(), rng_before)
    plan = result.plan
    assert plan.measured is not None and plan.measured.peak_memory_bytes <= budget
    assert plan.measured.memory_budget_bytes == budget
    assert plan.measured.baseline_samples_per_s > 0
    assert plan.fingerprint is not None and plan.environment.torch == torch.__version__
    report = result.report
    assert len(report.trials) == 4 and report.baseline.peak_memory_bytes > 0
    assert any(t.feasible for t in report.trials)
    # the winner is one of the fastest feasible measured trials, the fastest when they are
    # re-measured interleaved with the baseline (Note: [confirming the winner]), with the
    # peak its trial measured; throughputs are the re-measured ones
    feasible = sorted((t for t in report.trials if t.feasible and not t.is_repeat),
                      key=lambda t: t.samples_per_s, reverse=True)
    finalists = {}
    for t in feasible:
        finalists.setdefault(t.plan.to_json(), t)
    top = list(finalists.values())[:3]
    chosen = [t for t in top if t.plan.to_dict()["sections"] == plan.to_dict()["sections"]]
    assert len(chosen) == 1
    assert plan.measured.peak_memory_bytes == chosen[0].peak_memory_bytes
    assert plan.measured.samples_per_s == report.best.samples_per_s > 0
    assert plan.measured.baseline_samples_per_s == report.baseline.samples_per_s
    # #0 the untouched plan, #1 the cost model's fastest guess (not the untouched plan);
    # every measured trial of a priced plan recorded its estimate before it ran, refined on
    # the trials before it (Note: [refining the step time on every trial]).
    assert any(n.startswith("cost model: ") and "queued first" in n for n in report.notes)
    first, second = sorted(report.trials, key=lambda r: r.number)[:2]
    assert first.plan.batch.micro_batch_size is None and second.plan != first.plan
    assert any(n.startswith("cost model: step time estimated within") for n in report.notes)
    loss = result.step(batch)
    assert loss == loss and loss > 0
    # the caller's model and RNG are untouched
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name]), name


@pytest.mark.distributed
@pytest.mark.slow  # ~30 s
def test_tight_budget_forces_memory_saving_plan(gpt) -> None:
    model, batch = gpt
    loose = autoscale.optimize(model, batch, trials=2, seed=0, precisions=FAST)
    baseline_peak = loose.report.baseline.peak_memory_bytes
    static = sum(p.numel() * 4 for p in model.parameters()) * 4  # params, grads, 2 states
    budget = static + (baseline_peak - static) // 2  # half the baseline's activations
    result = autoscale.optimize(model, batch, memory_budget=budget, trials=6, seed=1,
                                precisions=FAST)
    plan = result.plan
    assert plan.measured.peak_memory_bytes <= budget < baseline_peak
    saves = (plan.checkpoint.blocks or plan.batch.micro_batch_size
             or plan.precision.mode != "fp32")
    assert saves, plan.to_json()


def test_trials_zero_gives_default_plan_without_measuring(gpt) -> None:
    model, batch = gpt
    result = autoscale.optimize(model, batch, trials=0, precisions=FAST)
    assert result.plan.measured is None and result.report.baseline is None
    assert result.plan.batch.micro_batch_size is None and result.plan.checkpoint.blocks == ()
    assert result.step(batch) > 0


def test_budget_below_parameters_is_refused(gpt) -> None:
    model, batch = gpt
    with pytest.raises(InfeasibleError, match="smaller than the parameters alone"):
        autoscale.optimize(model, batch, memory_budget="10KiB", trials=2, precisions=FAST)


@pytest.mark.distributed
@pytest.mark.slow  # ~15 s; the static refusal below the parameters' bytes runs by default
def test_nothing_fits_is_a_clear_error(gpt) -> None:
    model, batch = gpt
    static = sum(p.numel() * 4 for p in model.parameters()) * 4
    with pytest.raises(InfeasibleError, match=r"no plan among the 3 trials .* fits"):
        autoscale.optimize(model, batch, memory_budget=static + 1024, trials=3, precisions=FAST)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"optimizer": "adamx"}, PlanError, "optimizer='adamx' is not known"),
    ({"memory_budget": "lots"}, TunerError, "memory_budget='lots' is not a size"),
    ({"memory_budget": "8 parsecs"}, TunerError, "unknown unit"),
    ({"trials": -1}, TunerError, "trials must be an integer >= 0"),
    ({"precisions": ("fp8",)}, TunerError, "precisions="),
    ({"storage": "/no/such/folder/study.db"}, TunerError, "does not exist"),
])
def test_bad_arguments(gpt, kwargs, error, match) -> None:
    model, batch = gpt
    with pytest.raises(error, match=match):
        autoscale.optimize(model, batch, **{"trials": 1, "precisions": FAST, **kwargs})


def test_inputs_that_do_not_match_the_model(gpt) -> None:
    model, (x, _y) = gpt
    with pytest.raises(CaptureError):
        autoscale.optimize(model, (x[:, :5].float(),), trials=1, precisions=FAST)
    with pytest.raises(CaptureError, match="tuple of positional tensors or a dict"):
        autoscale.optimize(model, "not a batch", trials=1, precisions=FAST)


@pytest.mark.distributed
@pytest.mark.slow  # ~20-30 s; resume is also shown fast by tests/test_cli.py's Ctrl-C test
def test_study_resumes_from_sqlite(gpt, tmp_path) -> None:
    model, batch = gpt
    db = tmp_path / "study.db"
    from autoscale.search._study import counted_trials

    first = autoscale.optimize(model, batch, trials=2, storage=str(db), study_name="s",
                               precisions=FAST)
    # The same study asked for 4: it runs the 2 missing ones, and then none at all.
    second = autoscale.optimize(model, batch, trials=4, storage=str(db), study_name="s",
                                precisions=FAST)
    third = autoscale.optimize(model, batch, trials=4, storage=str(db), study_name="s",
                               precisions=FAST)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert counted_trials(study) == 4
    assert [len([r for r in res.report.trials if not r.is_repeat])
            for res in (first, second, third)] == [2, 2, 0]
    assert third.plan.measured is not None  # a resumed study still names its winner


@pytest.mark.distributed
@pytest.mark.slow  # ~15 s; apply's refusals run by default in tests/test_cli_apply.py
def test_apply_matching_and_mismatched_models(gpt, tmp_path) -> None:
    model, batch = gpt
    result = autoscale.optimize(model, batch, trials=2, precisions=FAST)
    path = tmp_path / "plan.json"
    result.plan.save(path)
    applied = autoscale.apply(Plan.load(path), model, batch)
    assert applied.plan == result.plan and applied.model is not model
    assert applied.step(batch) > 0

    import gpt as gpt_module
    from tests_helpers import tiny_gpt

    bigger, bigger_batch = gpt_module.build(batch_size=8, config=gpt_module.GPTConfig(
        block_size=32, n_layer=4, n_head=2, n_embd=32))
    before = path.read_text()
    with pytest.raises(PlanMismatchError, match=r"parameter 'h\.3\.attn\.c_attn\.bias'"):
        autoscale.apply(Plan.load(path), bigger, bigger_batch)
    assert path.read_text() == before
    other, other_batch = tiny_gpt(batch_size=8)
    autoscale.apply(Plan.load(path), other, other_batch)  # same architecture: accepted


class TwoBlocks(torch.nn.Module):
    """Small enough that fp16 autocast, many times slower than bf16 on CPU, costs little."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 16))
                                          for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.pow(2).mean()


class RefusesBf16(TwoBlocks):
    """Crashes under bf16 autocast: a stand-in for a kernel without a bf16 implementation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("no bf16 kernel for this op")
        return super().forward(x)


@pytest.mark.distributed
@pytest.mark.slow  # ~19 s; crashes in trials: tests/search/test_workers.py's sweep
def test_a_crashing_trial_fails_alone() -> None:
    model = RefusesBf16()
    result = autoscale.optimize(model, (torch.randn(8, 16),), trials=4, precisions=FAST)
    states = {t.state for t in result.report.trials}
    assert "failed" in states and "measured" in states
    failed = [t for t in result.report.trials if t.state == "failed"]
    assert all(t.plan.precision.mode == "bf16" for t in failed)
    assert "no bf16 kernel" in failed[0].note
    assert result.plan.precision.mode == "fp32"


@pytest.mark.distributed
@pytest.mark.slow  # ~21 s
def test_tuner_may_choose_among_allowed_optimizers(gpt) -> None:
    model, batch = gpt
    result = autoscale.optimize(model, batch, trials=6, precisions=("fp32",),
                                optimizer="adamw", allowed_optimizers=["adamw8bit"], seed=3)
    kinds = {t.plan.optimizer.kind for t in result.report.trials}
    assert kinds == {"adamw", "adamw8bit"}
    assert result.plan.optimizer.kind in kinds
    eight = next(t.plan.optimizer for t in result.report.trials
                 if t.plan.optimizer.kind == "adamw8bit")
    assert eight.state_precision == "int8"
    # the plan names the optimizer that the Result runs
    expected = {"adamw": "AdamW", "adamw8bit": "AdamW8bit"}[result.plan.optimizer.kind]
    assert type(result.optimizer).__name__ == expected


@pytest.mark.distributed
@pytest.mark.slow  # ~12 s
def test_default_precisions_skip_fp16_on_cpu_but_honour_an_explicit_list() -> None:
    model, batch = TwoBlocks(), (torch.randn(8, 16),)
    seen: list[str] = []
    autoscale.optimize(model, batch, trials=4, seed=0,
                       on_trial=lambda r: seen.append(r.plan.precision.mode))
    assert seen and "fp16" not in seen
    seen.clear()
    autoscale.optimize(model, batch, trials=1, seed=0, precisions=("fp16",),
                       on_trial=lambda r: seen.append(r.plan.precision.mode))
    assert seen == ["fp16"]


@pytest.mark.distributed
@pytest.mark.slow  # ~20 s
def test_repeated_proposals_are_reused_not_measured_and_do_not_count(gpt) -> None:
    model, batch = gpt
    records = []
    # fp32 only, 8 samples, 3 blocks: 4 micro-batch sizes x 4 checkpoint counts = 16
    # plans, so in 10 trials the sampler is likely to propose tried plans again.
    result = autoscale.optimize(model, batch, trials=10, seed=0, precisions=("fp32",),
                                on_trial=records.append)
    fresh = [r for r in records if not r.is_repeat]
    repeats = [r for r in records if r.is_repeat]
    assert len(fresh) == 10
    plans = [r.plan.to_dict()["sections"] for r in fresh]
    assert all(plans.count(p) == 1 for p in plans), "a plan was measured twice"
    by_number = {r.number: r for r in fresh}
    for r in repeats:
        first = by_number[int(r.state.rsplit("#", 1)[1])]
        assert r.plan.to_dict()["sections"] == first.plan.to_dict()["sections"]
        assert r.samples_per_s == first.samples_per_s
    assert result.plan is not None


@pytest.mark.slow  # ~19 s; the default test_short_optimize_... checks the confirmed winner
def test_winner_and_baseline_are_confirmed_in_interleaved_rounds(gpt, monkeypatch) -> None:
    # Note: [confirming the winner]: after the search, baseline and winner are measured in
    # turn (B, P, B, P, B, P) and the report takes the median round of each.
    from autoscale import _api
    from autoscale.search import _trial

    calls: list[tuple[str, float]] = []
    real_baseline, real_plan = _trial.measure_baseline, _trial.measure_plan

    def baseline(*args, **kwargs):
        m = real_baseline(*args, **kwargs)
        calls.append(("B", m.samples_per_s))
        return m

    def plan(*args, **kwargs):
        m = real_plan(*args, **kwargs)
        calls.append(("P", m.samples_per_s))
        return m

    monkeypatch.setattr(_trial, "measure_baseline", baseline)
    monkeypatch.setattr(_trial, "measure_plan", plan)
    model, batch = gpt
    # In this process, so that the patched functions are the ones measuring.
    result = autoscale.optimize(model, batch, trials=4, seed=0, precisions=("fp32",),
                                isolate=False)
    rounds = _api._CONFIRM_ROUNDS
    # the confirmation is the last thing measured: B, then every finalist, per round (the
    # first B of all is the baseline measured before the search)
    starts = [i for i, (kind, _) in enumerate(calls) if kind == "B"][-rounds:]
    assert len(starts) == rounds and starts[0] > 0
    per_round = starts[1] - starts[0]
    tail = calls[starts[0]:]
    assert len(tail) == per_round * rounds
    n_final = per_round - 1
    assert 1 <= n_final <= _api._FINALISTS
    assert [kind for kind, _ in tail] == (["B"] + ["P"] * n_final) * rounds

    def median(values: list[float]) -> float:
        return sorted(values)[(len(values) - 1) // 2]

    base = median([sps for kind, sps in tail if kind == "B"])
    plans = [median([tail[r * per_round + 1 + j][1] for r in range(rounds)])
             for j in range(n_final)]  # fmt: skip
    assert result.report.baseline.samples_per_s == base
    assert result.plan.measured.samples_per_s == max(plans)  # the fastest finalist wins
