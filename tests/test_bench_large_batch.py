"""bench/bench_large_batch.py: importable, its LR grids are what it says, --quick runs."""

from __future__ import annotations

import importlib.util
import itertools
import math
import re
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


def _main(bench, argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return bench.main(argv)
    finally:
        torch.set_num_threads(threads)  # main() sets 1 thread; don't leak it to other tests


def test_quick_run_prints_the_table_and_a_verdict(bench, capsys) -> None:
    assert _main(bench, ["--quick"]) == 0  # default --task all: all three tasks
    out = capsys.readouterr().out
    text, _, rest = out.partition("== task: charcnn")
    charcnn, _, digits = rest.partition("== task: digits")
    for label in ("AdamW naive", "AdamW scaled", "LAMB", "LARS"):
        assert label in text
    assert "ratio" in text and "torch " in text
    # A verdict either way: --quick trains too briefly for the goal itself to be asserted.
    assert re.search(r"^goal \(.*\): (MET|NOT MET) ", text, re.MULTILINE), text
    assert charcnn, "the charcnn task printed nothing"
    for label in ("SGD naive", "AdamW naive", "SGD scaled", "AdamW scaled", "LAMB", "LARS"):
        assert label in charcnn
    assert "goal (LARS within" in charcnn and "baseline: the better on val" in charcnn
    assert digits, "the digits task printed nothing"
    if importlib.util.find_spec("sklearn") is None:
        assert "skipped: pip install scikit-learn" in digits
    else:
        for label in ("SGD naive", "SGD scaled", "AdamW scaled", "LAMB", "LARS", "test acc"):
            assert label in digits
        assert "goal (" in digits and "LARS within tolerance" in digits


def test_task_option_runs_one_task(bench, capsys) -> None:
    assert _main(bench, ["--quick", "--task", "text"]) == 0
    out = capsys.readouterr().out
    assert "digits" not in out and "charcnn" not in out


def test_charcnn_is_causal(bench) -> None:
    """Changing the character at position t changes no output before t (eval mode, where
    BatchNorm uses running statistics), and does change the output at t."""
    torch.manual_seed(0)
    model = bench.CharCNN().eval()
    x = torch.randint(bench.VOCAB_SIZE, (2, bench.CONFIG.block_size))
    t = 20
    x2 = x.clone()
    x2[:, t] = (x[:, t] + 1) % bench.VOCAB_SIZE

    def hidden(idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.blocks(model.embed(idx).transpose(1, 2))

    h, h2 = hidden(x), hidden(x2)
    assert torch.equal(h[..., :t], h2[..., :t])
    assert not torch.allclose(h[..., t], h2[..., t])
    assert model(x, x).shape == ()  # called like gpt.GPT: (idx, targets) -> mean loss


def test_digits_task_is_skipped_without_sklearn(bench, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes the import raise ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert _main(bench, ["--quick", "--task", "digits"]) == 0
    out = capsys.readouterr().out
    assert "skipped: pip install scikit-learn" in out and "goal (" not in out


def test_digits_split_and_stream(bench) -> None:
    pytest.importorskip("sklearn")
    data = bench.load_digits_split()
    n_test, n_val = bench.DIGITS_SPLIT
    assert len(data.test[1]) == n_test and len(data.val[1]) == n_val
    assert len(data.train_y) + n_test + n_val == 1797
    assert bench.load_digits_split().train_y.equal(data.train_y)  # seeded: the same split
    # a batch of k*B is exactly the next k batches of B, past an epoch boundary too
    big = bench.DigitBatches(data, seed=3).get(8 * 200)
    small = bench.DigitBatches(data, seed=3)
    parts = [small.get(200) for _ in range(8)]
    assert big[0].equal(torch.cat([x for x, _ in parts]))
    assert big[1].equal(torch.cat([y for _, y in parts]))
    assert big[0].shape == (1600, 1, 8, 8)
    logits = bench.DigitsCNN()(big[0][:4])
    assert logits.shape == (4, 10)
