"""The autoscale command, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "autoscale.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "160"})


def test_tune_show_bench_on_the_mlp_example(tmp_path) -> None:
    out = tmp_path / "plan.json"
    tuned = run("tune", str(EXAMPLES / "mlp.py"), "--budget", "64MiB", "--trials", "3",
                "--out", str(out), cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr + tuned.stdout
    assert "best plan vs untouched baseline" in tuned.stdout
    assert "ratio (plan / baseline)" in tuned.stdout
    plan = json.loads(out.read_text())
    assert plan["measured"]["peak_memory_bytes"] <= 64 * 2**20

    shown = run("show", str(out), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "batch.micro_batch_size" in shown.stdout and "measured.samples_per_s" in shown.stdout

    bench = run("bench", str(EXAMPLES / "mlp.py"), "--plan", str(out), "--repeats", "1",
                "--iters", "2", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr + bench.stdout
    assert "ratio (plan / baseline)" in bench.stdout


@pytest.mark.parametrize("content", ["{broken", '{"schema_version": 99}'])
def test_bad_plan_file_is_one_clear_line(tmp_path, content) -> None:
    path = tmp_path / "plan.json"
    path.write_text(content)
    shown = run("show", str(path), cwd=tmp_path)
    assert shown.returncode == 1
    assert "error:" in shown.stdout and "Traceback" not in shown.stdout + shown.stderr
    assert path.read_text() == content


def test_script_without_build_is_refused(tmp_path) -> None:
    script = tmp_path / "nobuild.py"
    script.write_text("x = 1\n")
    tuned = run("tune", str(script), "--trials", "1", cwd=tmp_path)
    assert tuned.returncode == 1 and "defines no build()" in tuned.stdout
