"""bench/bench_search_quality.py's core on the MLP example: a tiny grid, one seed, TPE.

Structure only, and the one goal that must hold on any machine however loaded: no plan
the tuner returned measured a peak over its budget. Never a timing or a quality ratio.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_search_quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_search_quality", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # importing must not start a run
    return module


def test_trial_budget_is_a_fifth_of_the_grid_but_at_least_four(bench) -> None:
    assert [bench.trial_budget(n) for n in (4, 18, 24, 50)] == [4, 4, 4, 10]
    assert bench.micro_sizes(64, 4) == [64, 32, 16, 8]
    assert bench.micro_sizes(6, 4) == [6, 3]


# 110 s on this loaded 2-core machine (two tuner worker sets and two grid workers): slow.
@pytest.mark.slow
@pytest.mark.distributed
def test_mlp_core_returns_plans_that_fit(bench) -> None:
    cases = bench.bench_model("mlp", seeds=[0], micro=1, rounds=1, samplers=("tpe",),
                              which=("tight",), checkpoints=("none", "all"),
                              log=lambda line: None)
    assert len(cases) == 1
    case = cases[0]
    assert (case.model, case.budget_name, case.grid_size) == ("mlp", "tight", 4)
    assert case.trials == 4 and case.budget > 0
    assert [(o.sampler, o.seed) for o in case.outcomes] == [("tpe", 0)]
    outcome = case.outcomes[0]
    assert outcome.plan is not None, outcome.error
    assert outcome.peak is not None and outcome.peak <= case.budget
    assert not case.any_over()
    assert "mlp" in bench.table(cases) and "over its budget: met" in bench.verdict(cases)
