"""bench/bench_optim_cpu.py runs end to end at a small size and prints its goal lines."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_optim_cpu.py"


def test_small_run_prints_every_row_and_the_goals(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_optim_cpu", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # importing must not start a run
    threads = torch.get_num_threads()
    try:
        assert module.main(["--params", "3e5", "--repeats", "3", "--warmup-s", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    tables = ("AdamW ", "SGD momentum ", "AdamW bf16 ", "SGD bf16 ", "LAMB ", "LARS ")
    rows = [line for line in out.splitlines() if line.startswith(tables)]
    assert len(rows) == 5 + 5 + 5 + 4 + 3 + 3
    # the kernel the dispatcher measured and picked (which one depends on the machine)
    assert sum("autoscale auto" in r and r.split()[-1] != "-" for r in rows) == 6
    for table in ("AdamW bf16", "SGD bf16"):
        assert any(r.startswith(table) and "autoscale ref" in r and r.endswith("reference")
                   for r in rows)
    # the auto rows end with whichever kernel the dispatcher picked (foreach under load):
    # only the fixed foreach rows are counted
    assert sum(r.startswith(("LAMB", "LARS")) and "autoscale auto" not in r
               and "foreach" in r and r.endswith("foreach") for r in rows) == 4
    assert out.count("(stream)") == 6
    assert out.count("goal: autoscale") == 2
    assert out.count("claim: autoscale") == 4
