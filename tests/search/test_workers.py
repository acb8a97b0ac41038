"""Measured trials in worker processes: a crash, a hang, an OS kill or an exception fails
that trial only; workers are reused after success, replaced after failure, never left
behind; a model that cannot be serialized is refused with the fix."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import optuna
import pytest
import torch
from tests_helpers import child_pids

import autoscale
from autoscale import OptimizerPlan, Plan, TunerError
from autoscale._api import optimize_script
from autoscale.capture import capture
from autoscale.plan import BatchPlan, Fingerprint
from autoscale.search._workers import TrialFailed, WorkerRunner, script_workload

#: Every test here starts other processes.
pytestmark = pytest.mark.distributed

FAULTY = Path(__file__).resolve().parents[1] / "workloads" / "faulty.py"
ADAM = OptimizerPlan(kind="adam", kernel="torch")


def worker_pids() -> list[int]:
    """Live (not zombie) children of this process that run an autoscale worker."""
    return child_pids(os.getpid(), marker=b"worker_main", live=True)


def test_sweep_survives_a_segfault_a_hang_and_an_exception(tmp_path) -> None:
    # Four plans: whole batch (fine), micro-batches of 1 (raises), 2 (segfaults), 4 (hangs).
    db = tmp_path / "study.db"
    result = optimize_script(FAULTY, trials=4, precisions=("fp32",), optimizer="adam",
                             trial_timeout=4, storage=str(db), study_name="faulty")
    fresh = {r.plan.batch.micro_batch_size: r for r in result.report.trials
             if not r.is_repeat}
    assert set(fresh) == {None, 1, 2, 4}
    assert fresh[None].state == "measured"
    assert fresh[1].state == "failed" and "no kernel for a batch of one" in fresh[1].note
    assert fresh[2].state == "failed" and "SIGSEGV" in fresh[2].note
    assert fresh[4].state == "failed" and "timed out" in fresh[4].note
    assert result.plan.batch.micro_batch_size is None  # the only plan that ran
    study = optuna.load_study(study_name="faulty", storage=f"sqlite:///{db}")
    failed = {t.number: t for t in study.trials if t.state == optuna.trial.TrialState.FAIL}
    for record in (fresh[1], fresh[2], fresh[4]):
        assert failed[record.number].user_attrs["error"] == record.note
    assert worker_pids() == []


def _runner(**kwargs) -> WorkerRunner:
    from autoscale.search._workload import load_workload

    work = load_workload(FAULTY)
    graph = capture(work.model, work.example_inputs)
    digest = Plan(fingerprint=Fingerprint.of(work.model, graph.structure_hash())
                  ).fingerprint_digest()
    return WorkerRunner(script_workload(FAULTY), device=torch.device("cpu"),
                        fingerprint=digest, warmup=1, iters=2, **kwargs)


def _micro(n: int | None) -> Plan:
    batch = BatchPlan() if n is None else BatchPlan(micro_batch_size=n, grad_accum_steps=8 // n)
    return Plan(sections={"batch": batch, "optimizer": ADAM})


def test_a_worker_is_reused_after_success_and_replaced_after_failure() -> None:
    with _runner() as runner:
        runner.baseline(ADAM, timeout_s=60)
        runner.measure(_micro(None), timeout_s=60)
        runner.measure(_micro(8), timeout_s=60)
        assert runner.started == 1, "successful trials share one worker"
        with pytest.raises(TrialFailed, match="no kernel for a batch of one") as err:
            runner.measure(_micro(1), timeout_s=60)
        assert err.value.kind == "error"
        assert worker_pids() == [], "the failed worker is gone before the next trial"
        m = runner.measure(_micro(None), timeout_s=60)
        assert m.samples_per_s > 0 and runner.started == 2
    assert worker_pids() == []


def test_a_worker_killed_by_the_os_fails_its_trial_as_out_of_memory() -> None:
    with _runner() as runner:
        runner.baseline(ADAM, timeout_s=60)
        (pid,) = worker_pids()
        # The OS out-of-memory killer sends SIGKILL; the hanging plan keeps the worker busy.
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(TrialFailed, match="SIGKILL") as err:
            runner.measure(_micro(4), timeout_s=600)
        # Reported as the death it was, not as the time limit running out.
        assert err.value.kind == "oom" and "timed out" not in err.value.reason


class SharedStats:
    """A metrics sink every copy of the model shares (deepcopy keeps it); its lock cannot
    be pickled, so the model cannot reach another process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> SharedStats:
        return self


class HoldsALock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.stats = SharedStats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).pow(2).mean()


def test_a_model_that_cannot_be_serialized_names_the_two_fixes() -> None:
    with pytest.raises(TunerError, match="workload script") as err:
        autoscale.optimize(HoldsALock(), (torch.randn(4, 4),), trials=1)
    assert "isolate=False" in str(err.value)
    result = autoscale.optimize(HoldsALock(), (torch.randn(4, 4),), trials=1, isolate=False,
                                precisions=("fp32",))
    assert result.report.trials[0].state == "measured"


class LocalModel(torch.nn.Module):
    """Defined in a test module, reached by the worker through the pickled sys.path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).pow(2).mean()


def test_python_api_serializes_model_and_lambda_loss_to_the_worker() -> None:
    model = LocalModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = autoscale.optimize(model, (torch.randn(8, 8),), trials=2, precisions=("fp32",),
                                loss_fn=lambda out, batch: out * 2)
    assert all(r.state == "measured" for r in result.report.trials if not r.is_repeat)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), "the caller's model is untouched"
    assert worker_pids() == []


def test_a_script_that_builds_another_model_in_the_worker_is_refused() -> None:
    script = FAULTY.with_name("unstable.py")
    with pytest.raises(TunerError, match="worker built a different model") as err:
        optimize_script(script, trials=1, precisions=("fp32",))
    assert "build() must return the same architecture" in str(err.value)
    assert worker_pids() == []
