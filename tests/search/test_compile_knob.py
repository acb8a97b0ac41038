"""torch.compile as a tuner knob: the search space maps it into the plan, a compiled trial
reports its compile time apart from its step time, and a compile failure fails that trial
alone."""

from __future__ import annotations

import pytest
import torch
from tests_helpers import tiny_gpt

import autoscale
from autoscale import CompilePlan, Plan, TunerError
from autoscale.search._study import SearchSpace


def _space(**kwargs) -> SearchSpace:
    return SearchSpace(batch_size=8, block_names=("h.0", "h.1"), precisions=("fp32",),
                       **kwargs)


def test_the_knob_maps_into_the_plan_and_only_where_allowed() -> None:
    space = _space(compile_modes=("off", "inductor", "inductor-eager-rng", "inductor-budget"))
    params = space.default_params()
    assert params["compile"] == "off"
    assert space.plan_from({**params, "compile": "inductor"}, Plan()).compile == CompilePlan(
        mode="inductor")
    rng = space.plan_from({**params, "compile": "inductor-eager-rng"}, Plan()).compile
    assert rng == CompilePlan(mode="inductor-eager-rng") and rng.eager_rng and rng.budget == 1
    # inductor-budget takes the activation-budget knob as inductor's own budget and keeps
    # no checkpoint section (the min-cut partitioner decides what to recompute)
    plan = space.plan_from({"compile": "inductor-budget", "checkpointed_blocks": 2}, Plan())
    assert plan.compile == CompilePlan(mode="inductor-budget", activation_memory_budget=1.0)
    # one mode allowed: no knob, that mode
    only = _space(compile_modes=("inductor",))
    assert "compile" not in only.default_params()
    assert only.plan_from(only.default_params(), Plan()).compile.mode == "inductor"
    # across ranks plans are never compiled (Note: [compile and sharding])
    ranks = _space(compile_modes=("off", "inductor"), world_size=2)
    assert "compile" not in ranks.default_params()
    assert ranks.plan_from(ranks.default_params(), Plan()).compile.mode == "off"


def test_optimize_refuses_an_unknown_mode() -> None:
    model, batch = tiny_gpt(batch_size=4)
    with pytest.raises(TunerError, match="compile_modes"):
        autoscale.optimize(model, batch, trials=1, compile_modes=("jit",))


@pytest.mark.slow  # ~10-20 s
def test_optimize_defaults_to_eager_on_cpu() -> None:
    model, batch = tiny_gpt(batch_size=4)
    seen: list[str] = []
    autoscale.optimize(model, batch, trials=2, precisions=("fp32",), isolate=False, iters=1,
                       on_trial=lambda r: seen.append(r.plan.compile.mode))
    assert seen and set(seen) == {"off"}


class GraphBreak(torch.nn.Module):
    """Eager is fine; torch.compile(fullgraph=True) refuses its graph break."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
            torch._dynamo.graph_break()
        return x.pow(2).mean()


@pytest.mark.distributed
def test_a_compile_failure_fails_its_trial_alone() -> None:
    # Known-good plans go first: the default (compile_modes[0], inductor) then the frugal
    # one (eager), so both modes are tried within two trials.
    result = autoscale.optimize(GraphBreak(), (torch.randn(8, 16),), trials=2,
                                precisions=("fp32",), compile_modes=("inductor", "off"))
    by_mode = {t.plan.compile.mode: t for t in result.report.trials if not t.is_repeat}
    assert by_mode["inductor"].state == "failed"
    assert "graph" in by_mode["inductor"].note.lower()
    assert by_mode["off"].state == "measured" and by_mode["off"].compile_time_s is None
    assert result.plan.compile.mode == "off"


@pytest.mark.distributed
@pytest.mark.slow  # ~30 s: inductor compiles the GPT forward and backward on CPU
def test_a_compiled_trial_reports_its_compile_time_apart() -> None:
    model, batch = tiny_gpt(batch_size=4)
    result = autoscale.optimize(model, batch, trials=2, precisions=("fp32",), iters=1,
                                compile_modes=("inductor", "off"))
    compiled = [t for t in result.report.trials if t.plan.compile.mode == "inductor"]
    assert compiled and compiled[0].state == "measured"
    # compiling takes seconds on CPU; a steady compiled step takes milliseconds
    assert compiled[0].compile_time_s is not None and compiled[0].compile_time_s > 0.5
