"""bench/bench_estimate.py: its rank correlation (written here, scipy is not a dependency)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_estimate",
                                                  BENCH_DIR / "bench_estimate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # importing must not start a run
    return module


def test_spearman_matches_the_textbook_cases(bench) -> None:
    assert bench.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert bench.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Monotone but not linear: ranks only.
    assert bench.spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)
    # Ties take their average rank: x ranks (0, 1.5, 1.5, 3) against y's (0, 1, 2, 3).
    assert bench.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)
    # One swapped pair of five: 1 - 6 * 2 / (5 * 24).
    assert bench.spearman([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]) == pytest.approx(0.9)


def test_the_paired_test_orders_a_steady_gap_and_not_an_interleaved_one(bench) -> None:
    base = [1.00, 1.05, 0.98, 1.10, 1.02, 0.99, 1.07, 1.01]
    # 1% slower every round, under rounds that themselves wander by 10%: ordered.
    assert bench.paired_order([x * 1.01 for x in base], base) == 1
    assert bench.paired_order(base, [x * 1.01 for x in base]) == -1
    # Slower in half the rounds, faster in the other half: a tie.
    mixed = [x * (1.01 if i % 2 else 0.99) for i, x in enumerate(base)]
    assert bench.paired_order(mixed, base) == 0
    # Four rounds cannot reach 5% two-sided (the smallest p is 2/16), however steady.
    assert bench.paired_order([2.0] * 4, [1.0] * 4) == 0
    # Past 14 rounds the patterns are drawn; a steady gap is still found.
    long = base * 3
    assert bench.paired_order([x * 1.01 for x in long], long) == 1


def test_tied_spearman_gives_unresolved_plans_one_average_rank(bench) -> None:
    # Plans 1-3 tie (0), each faster than 4 (-1 against it); 0 is the fastest.
    order = [[0, -1, -1, -1, -1],
             [1, 0, 0, 0, -1],
             [1, 0, 0, 0, -1],
             [1, 0, 0, 0, -1],
             [1, 1, 1, 1, 0]]
    # Measured ranks (1, 3, 3, 3, 5): any order of the estimates inside the tie scores
    # the same, the textbook tied Spearman of x = 1..5 against y = (1, 3, 3, 3, 5).
    for est in ([1, 2, 3, 4, 5], [1, 4, 3, 2, 5]):
        assert bench.tied_spearman(est, order) == pytest.approx(
            bench.spearman([1, 2, 3, 4, 5], [1, 3, 3, 3, 5]))
    # cov 8 over sqrt(10 * 8): 2 / sqrt(5)
    assert bench.spearman([1, 2, 3, 4, 5], [1, 3, 3, 3, 5]) == pytest.approx(0.8944272,
                                                                             rel=1e-6)
    # An estimate putting the slowest first is penalized as in plain Spearman.
    assert bench.tied_spearman([5, 2, 3, 4, 1], order) < 0


def test_resolved_pairs_skip_ties_and_name_what_is_misordered(bench, capsys) -> None:
    def row(label: str, rounds: list[float], est: float) -> dict:
        return {"label": label, "step": min(rounds), "est_step": est, "rounds": rounds}

    # a and b's rounds cross round by round (a tie the test does not order); c's lie
    # above both every round and it is priced below them
    a = [1.00, 1.02, 1.04, 1.06, 1.01, 1.03, 1.05, 1.07]
    b = [x * (1.01 if i % 2 else 0.99) for i, x in enumerate(a)]
    c = [x * 1.2 for x in a]
    bench._resolved_pairs({"m": [row("a", a, 1.0), row("b", b, 0.9), row("c", c, 0.8)]})
    out = capsys.readouterr().out
    assert "m         0/2 of 2 resolved (3 pairs)" in out
    assert "a / c (+20.0%)" in out and "b / c (+" in out
    assert "a / b" not in out
