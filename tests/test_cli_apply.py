"""`autoscale apply` (a saved plan trained in production, checks shown) and the Pareto
table at the end of `autoscale tune`, run as a user runs them: real subprocesses, a real
two-rank torchrun job."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

import autoscale
from autoscale.cli import app, pareto_rows
from autoscale.plan import (
    BatchPlan,
    CheckpointPlan,
    Environment,
    Fingerprint,
    Measured,
    Plan,
    ShardPlan,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MLP = str(EXAMPLES / "mlp.py")
ENV = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}


def cli(*args: str, cwd: Path, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable])
    return subprocess.run([*launcher, "-m", "autoscale.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=ENV)


def in_process(*args: str) -> str:
    """The command run by typer's CliRunner in this process: cheap where no exit status or
    rank is under test (autoscale.cli.main's error line is not in this path)."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def losses(stdout: str) -> list[float]:
    """The loss column of the 'training steps' table."""
    table = stdout.split("training steps", 1)[1]
    return [float(loss) for loss in re.findall(r"│\s+\d+ │\s+([-\d.naninf]+) │", table)]


@pytest.fixture(scope="module")
def mlp_plan() -> Plan:
    """A plan for examples/mlp.py that rewrites something (micro-batches of 32 accumulated
    twice, two blocks fully checkpointed), with its figures measured here for real."""
    import mlp

    from autoscale.capture import capture

    model, batch, loss_fn = mlp.build()
    plan = Plan(fingerprint=Fingerprint.of(model, capture(model, batch).structure_hash()),
                environment=Environment.current("cpu")).replace(
        batch=BatchPlan(micro_batch_size=32, grad_accum_steps=2),
        checkpoint=CheckpointPlan.of({"net.blocks.0": "full", "net.blocks.2": "full"}))
    m = autoscale.measure(autoscale.apply(plan, model, batch, loss_fn=loss_fn), batch,
                          warmup=0, iters=1)
    return plan.replace(measured=Measured(
        samples_per_s=m.samples_per_s, step_time_s=m.step_time_s,
        peak_memory_bytes=m.peak_memory_bytes, memory_budget_bytes=64 * 2**20,
        batch_size=m.batch_size))


def test_module_entry_registers_every_command(tmp_path) -> None:
    # `if __name__ == "__main__"` once sat mid-file, so report and dashboard were missing.
    helped = cli("report", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "Pareto front" in helped.stdout


def test_apply_checks_then_trains_with_falling_loss(tmp_path, mlp_plan) -> None:
    path = tmp_path / "plan.json"
    mlp_plan.save(path)
    out = in_process("apply", MLP, str(path), "--steps", "4")
    assert "model fingerprint │ matches (28 parameter tensors" in out
    assert "here 1, plan 1: matches" in out
    assert ": same" in out and "warning" not in out
    seen = losses(out)
    assert len(seen) == 4 and all(math.isfinite(x) for x in seen), out
    assert seen[-1] < seen[0], seen
    # The recorded figures appear beside this run's, with the budget verdict.
    assert "budget 64.00 MiB" in out and "plan (recorded when tuned)" in out
    assert f"{mlp_plan.measured.samples_per_s:.1f}" in out
    assert "ratio (this run / recorded)" in out


def test_apply_warns_on_another_environment(tmp_path, mlp_plan) -> None:
    path = tmp_path / "plan.json"
    mlp_plan.replace(environment=Environment(torch="2.0.0+cu118", device="NVIDIA H100",
                                             world_size=1)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command shows it, it does not re-raise it
        out = in_process("apply", MLP, str(path), "--steps", "1")
    assert "NVIDIA H100; torch 2.0.0+cu118: differs" in out
    assert re.search(r"warning: the plan was measured on NVIDIA H100 with torch\s+2\.0\.0",
                     out), out
    assert "training steps" in out


@pytest.mark.distributed
def test_apply_refuses_another_model_in_one_line(tmp_path, mlp_plan) -> None:
    path = tmp_path / "plan.json"
    mlp_plan.save(path)
    other = tmp_path / "wider_head.py"
    other.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(EXAMPLES)!r})\n"
        "import torch, mlp\n\n\n"
        "def build():\n"
        "    model, batch, loss_fn = mlp.build()\n"
        "    model.net.head = torch.nn.Linear(256, 12)\n"
        "    return model, batch, loss_fn\n")
    run = cli("apply", str(other), str(path), cwd=tmp_path)
    assert run.returncode == 1, run.stdout
    assert run.stdout.startswith("error: this plan was made for a different model")
    assert "net.head.weight" in run.stdout and "Re-tune for this model" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr and "training steps" not in run.stdout


@pytest.mark.distributed
def test_apply_refuses_another_world_size(tmp_path, mlp_plan) -> None:
    path = tmp_path / "plan.json"
    mlp_plan.replace(shard=ShardPlan(strategy="ddp", world_size=2)).save(path)
    run = cli("apply", MLP, str(path), cwd=tmp_path)
    assert run.returncode == 1, run.stdout
    assert "made for 2 ranks" in run.stdout and "torchrun --nproc-per-node 2" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr


@pytest.mark.distributed
def test_apply_under_torchrun_trains_a_ddp_plan_like_one_process(tmp_path, mlp_plan) -> None:
    path = tmp_path / "ddp.json"
    mlp_plan.replace(shard=ShardPlan(strategy="ddp", world_size=2)).save(path)
    ranks = cli("apply", MLP, str(path), "--steps", "3", cwd=tmp_path, torchrun=2)
    assert ranks.returncode == 0, ranks.stderr[-3000:] + ranks.stdout
    assert "here 2, plan 2: matches" in ranks.stdout and "rank 0 of 2" in ranks.stdout
    assert ranks.stdout.count("training steps") == 1  # rank 0 alone prints
    # Each rank trains on half the batch and DDP averages the gradients, so the mean of
    # the ranks' losses follows the one-process run of the same plan step for step.
    single_path = tmp_path / "one.json"
    mlp_plan.save(single_path)
    single = in_process("apply", MLP, str(single_path), "--steps", "3")
    assert losses(ranks.stdout) == pytest.approx(losses(single), rel=1e-4)


@pytest.mark.slow
@pytest.mark.distributed
def test_apply_refuses_a_one_process_plan_under_torchrun(tmp_path, mlp_plan) -> None:
    path = tmp_path / "one.json"
    mlp_plan.save(path)
    refused = cli("apply", MLP, str(path), "--steps", "1", cwd=tmp_path, torchrun=2)
    assert refused.returncode != 0
    assert "the plan is for one process (shard.strategy 'none') but this job has 2 ranks" \
        in refused.stdout


def _record(number: int, plan: Plan, sps: float | None, peak: int | None, *,
            state: str = "measured", feasible: bool = True):
    from autoscale.search._study import TrialRecord

    return TrialRecord(number, plan, state, sps, peak, peak or 0, feasible)


def test_pareto_rows_keep_the_measured_feasible_front() -> None:
    plans = [Plan().replace(batch=BatchPlan(micro_batch_size=m, grad_accum_steps=64 // m))
             for m in (64, 32, 16, 8, 4, 2)]
    report = type("R", (), {"trials": (
        _record(0, plans[0], 100.0, 50), _record(1, plans[1], 120.0, 60),  # both on front
        _record(2, plans[2], 90.0, 70),  # beaten by #0 on both
        _record(3, plans[3], 200.0, 40, feasible=False),  # over the budget
        _record(4, plans[4], None, None, state="failed"),
        _record(5, plans[1], 120.0, 60, state="repeat of #1"),
        _record(6, plans[5], 80.0, 30))})()
    assert [r.number for r in pareto_rows(report)] == [6, 0, 1]


@pytest.mark.slow
@pytest.mark.distributed
def test_tune_ends_with_the_pareto_table_and_the_plan_applies(tmp_path) -> None:
    out = tmp_path / "plan.json"
    tuned = cli("tune", MLP, "--budget", "64MiB", "--trials", "3", "--out", str(out),
                cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr + tuned.stdout
    table = tuned.stdout.split("Pareto front of the measured trials", 1)[1]
    rows = [line for line in table.splitlines() if re.match(r"│ (chosen|      ) │\s+\d", line)]
    assert rows, tuned.stdout
    chosen = autoscale.Plan.load(out)
    on_front = any(line.startswith("│ chosen") for line in rows)
    assert on_front or "the chosen plan is not on this front" in table
    peaks = [json.loads(out.read_text())["measured"]["peak_memory_bytes"]]
    assert peaks[0] <= 64 * 2**20

    applied = cli("apply", MLP, str(out), "--steps", "3", cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr + applied.stdout
    assert all(math.isfinite(x) for x in losses(applied.stdout))
    assert chosen.measured is not None and "plan (recorded when tuned)" in applied.stdout
