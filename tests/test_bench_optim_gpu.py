"""bench/bench_optim_gpu.py: skips cleanly without a GPU, and --smoke runs every row's code
path (each Triton kernel under Triton's CPU interpreter) and prints the table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_optim_gpu.py"


def _run(*args: str, interpret: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(BENCH), *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="this process has a GPU: it would run")
def test_without_a_gpu_it_skips_and_exits_0() -> None:
    out = _run(interpret=False)
    assert out.returncode == 0, out.stderr
    assert "no CUDA device" in out.stdout and "skipped" in out.stdout


@pytest.mark.distributed
def test_smoke_without_the_interpreter_is_one_clear_error() -> None:
    out = _run("--smoke", interpret=False)
    assert out.returncode == 2
    assert "TRITON_INTERPRET=1 python bench/bench_optim_gpu.py --smoke" in out.stderr


@pytest.mark.distributed
def test_smoke_runs_every_row_on_the_triton_path() -> None:
    out = _run("--smoke", interpret=True)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()
            if line.split()[:1] in (["AdamW"], ["SGD"], ["LAMB"], ["LARS"])]
    table = {(r[0], " ".join(r[1:3]) if r[0] != "SGD" else " ".join(r[2:4])): r[-1]
             for r in rows}
    for group in ("AdamW", "SGD", "LAMB", "LARS"):
        assert table[(group, "autoscale triton")] == "triton", out.stdout
    assert table[("AdamW", "autoscale 8bit")] == "triton"
    assert table[("LAMB", "autoscale foreach")] == "foreach"
    assert table[("LARS", "autoscale foreach")] == "foreach"
    assert table[("AdamW", "torch fused")] == "torch"
    assert len(rows) == 10
