"""Two `autoscale tune` processes run one study in a real PostgreSQL server on loopback;
one is killed mid-trial, and no trial is lost, left RUNNING or measured twice (Note:
[many workers, one study])."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _postgres

ROOT = Path(__file__).resolve().parents[2]
# The workload's space holds more distinct plans than that: 4 micro-batch sizes x fp32/bf16
# x the checkpoint solver's activation budgets.
TRIALS = 6


@pytest.fixture(scope="module")
def postgres_url():
    why = _postgres.unavailable()
    if why is not None:
        pytest.skip(f"no PostgreSQL server here: {why}")
    with _postgres.server() as url:
        yield url


def _tune(url: str, out: Path, *, step_s: float = 0.0) -> subprocess.Popen[bytes]:
    cmd = [str(Path(sys.executable).parent / "autoscale"), "tune",
           str(ROOT / "tests" / "workloads" / "paced.py"), "--storage", url,
           "--study-name", "shared",
           "--trials", str(TRIALS), "--heartbeat", "1",
           "--precision", "fp32", "--precision", "bf16",
           "--out", str(out)]
    env = {**os.environ, "PACED_STEP_S": str(step_s)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # its own group: killed with its worker


def _measuring_trial_of(study, pid: int):
    """The worker's RUNNING trial once it is being measured, else None.

    A trial is created before its knobs are suggested one by one, and a repeat of a plan
    already measured ends at once: killing either would test nothing, or find the trial
    already COMPLETE. A trial holding ``prune_margin`` and no ``repeat_of`` has all its
    parameters stored and is inside its measurement, which takes seconds (a spawned
    worker process), so the kill lands mid-trial.
    """
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return next((t for t in running if t.user_attrs.get("worker", "").endswith(f":{pid}")
                 and "prune_margin" in t.user_attrs and "repeat_of" not in t.user_attrs),
                None)


@pytest.mark.distributed
def test_a_killed_worker_loses_no_trial_and_leaves_none_running(postgres_url, tmp_path):
    import optuna

    from autoscale.search._study import counted_trials

    doomed = _tune(postgres_url, tmp_path / "a.json", step_s=0.3)  # measures for seconds
    survivor = _tune(postgres_url, tmp_path / "b.json")
    deadline, victim = time.monotonic() + 240, None
    while victim is None and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name="shared", storage=postgres_url)
        except KeyError:  # not created yet
            continue
        victim = _measuring_trial_of(study, doomed.pid)
    assert victim is not None, "the first worker never started measuring a trial"
    os.killpg(doomed.pid, signal.SIGKILL)  # mid-trial: no chance to mark anything
    doomed.wait()
    out, _ = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, out.decode()[-3000:]

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    states = {t.number: t.state for t in trials}
    assert optuna.trial.TrialState.RUNNING not in states.values()
    # The killed trial was failed by the survivor's heartbeat check and run again once.
    assert states[victim.number] == optuna.trial.TrialState.FAIL
    retries = [t for t in trials
               if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    # Every counted trial is a distinct plan measured once; both workers measured some.
    assert counted_trials(study) >= TRIALS
    measured = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                and "peak_memory_bytes" in t.user_attrs and "repeat_of" not in t.user_attrs]
    plans = [repr(sorted(t.params.items())) for t in measured]
    assert len(plans) == len(set(plans))
    workers = {t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}
    assert len(workers) == 2, workers
