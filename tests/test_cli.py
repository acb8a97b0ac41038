"""The autoscale command, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

#: Every test here starts other processes.
pytestmark = pytest.mark.distributed

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "autoscale.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "160"})


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


def test_the_compile_flag_reaches_the_search_and_a_typo_is_refused(tmp_path) -> None:
    tuned = run("tune", str(EXAMPLES / "mlp.py"), "--trials", "1", "--compile", "off",
                "--compile", "max-autotune", cwd=tmp_path)
    assert tuned.returncode == 1, tuned.stdout + tuned.stderr
    assert "compile_modes=['off', 'max-autotune']" in tuned.stdout, tuned.stdout


def test_the_plan_summary_names_the_compile_mode() -> None:
    from autoscale import CompilePlan, Plan
    from autoscale.cli import _plan_summary

    assert _plan_summary(Plan()) == "micro=allx1 fp32 ckpt=0"
    assert _plan_summary(Plan().replace(compile=CompilePlan(mode="inductor-eager-rng"))
                         ).endswith(" inductor-eager-rng")
    assert _plan_summary(Plan().replace(compile=CompilePlan(
        mode="inductor-budget", activation_memory_budget=0.5))).endswith(" inductor-budget@0.5")


def _finished_trials(db: Path) -> int:
    """COMPLETE trials in Optuna's SQLite schema, read directly: optuna.load_study takes
    about a second, as long as a trial of this workload."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            (n,), = conn.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'")
    except sqlite3.OperationalError:  # the schema is not created yet
        return 0
    return int(n)


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_stops_the_sweep_and_the_same_command_resumes_it_and_show_bench_read_the_plan(
        tmp_path) -> None:
    # One tune serves the whole command line: tune (interrupted, resumed), show, bench.
    import os
    import signal
    import time

    import optuna
    from tests_helpers import child_pids

    from autoscale.search._study import counted_trials

    db = tmp_path / "study.db"
    args = ["tune", str(EXAMPLES / "mlp.py"), "--budget", "64MiB", "--trials", "3",
            "--storage", str(db), "--study-name", "s", "--out", str(tmp_path / "plan.json")]
    cmd = [sys.executable, "-m", "autoscale.cli", *args]
    # Its own process group, as a shell gives a foreground job: Ctrl-C is SIGINT to it.
    # SIGINT's default disposition restored: a shell's background job (CI, nohup) starts
    # with SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    tuner = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                             env={**os.environ, "COLUMNS": "160"})
    workers: set[int] = set()
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            workers |= set(child_pids(tuner.pid))
            if _finished_trials(db) >= 1:  # the baseline: what a resume must keep
                break
            time.sleep(0.05)
        assert tuner.poll() is None, tuner.communicate()[0]
        workers |= set(child_pids(tuner.pid))
        os.killpg(tuner.pid, signal.SIGINT)
        output, _ = tuner.communicate(timeout=60)
    finally:
        if tuner.poll() is None:
            tuner.kill()
    assert tuner.returncode == 130, output
    assert "interrupted" in output and "resume" in output
    assert workers and not any(_alive(pid) for pid in workers), "a worker outlived the tuner"
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    before = {t.number: (t.params, t.value) for t in study.trials
              if t.state == optuna.trial.TrialState.COMPLETE}
    assert counted_trials(study) < 3

    resumed = run(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert counted_trials(study) == 3
    after = {t.number: (t.params, t.value) for t in study.trials}
    assert all(after[n] == kept for n, kept in before.items()), "a finished trial changed"
    measured = [t.params for t in study.trials if "peak_memory_bytes" in t.user_attrs
                and "repeat_of" not in t.user_attrs]
    assert len(measured) == len({json.dumps(p, sort_keys=True) for p in measured}), \
        "a plan was measured twice"
    assert "best plan vs untouched baseline" in resumed.stdout
    assert "ratio (plan / baseline)" in resumed.stdout
    out = tmp_path / "plan.json"
    plan = json.loads(out.read_text())
    assert plan["measured"]["peak_memory_bytes"] <= 64 * 2**20

    shown = run("show", str(out), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "batch.micro_batch_size" in shown.stdout and "measured.samples_per_s" in shown.stdout

    bench = run("bench", str(EXAMPLES / "mlp.py"), "--plan", str(out), "--repeats", "1",
                "--iters", "2", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr + bench.stdout
    assert "ratio (plan / baseline)" in bench.stdout
