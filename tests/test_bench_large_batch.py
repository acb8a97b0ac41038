"""bench/bench_large_batch.py: importable, its LR grids are what it says, --quick runs."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_large_batch.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_large_batch", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)  # importing must not start a run
    return module


def test_log_grid_is_centred_and_sqrt2_spaced(bench) -> None:
    grid = bench.log_grid(1e-2, points=5)
    assert len(grid) == 5
    assert math.isclose(grid[2], 1e-2)
    for a, b in itertools.pairwise(grid):
        assert math.isclose(b / a, math.sqrt(2))


def test_quick_run_prints_the_table_and_a_verdict(bench, capsys) -> None:
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick"]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets 1 thread; don't leak it to other tests
    out = capsys.readouterr().out
    for label in ("AdamW naive", "AdamW scaled", "LAMB", "LARS"):
        assert label in out
    assert "ratio" in out and "torch " in out
    assert "goal (" in out and "MET" in out
