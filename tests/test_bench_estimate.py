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


def test_resolved_pairs_skip_ties_and_name_what_is_misordered(bench, capsys) -> None:
    def row(label: str, rounds: list[float], est: float) -> dict:
        return {"label": label, "step": min(rounds), "est_step": est, "rounds": rounds}

    # a and b's rounds interleave (a tie the resamples do not order); c's lie above both
    # and it is priced below them
    bench._resolved_pairs({"m": [row("a", [1.00, 1.02, 1.04, 1.06], 1.0),
                                 row("b", [1.01, 1.03, 1.05, 1.07], 0.9),
                                 row("c", [1.20, 1.21, 1.22, 1.23], 0.8)]})
    out = capsys.readouterr().out
    assert "m         0/2 of 2 resolved (3 pairs)" in out
    assert "a / c (+20.0%)" in out and "b / c (+18.8%)" in out
    assert "a / b" not in out
