"""Multi-rank trials: a plan for N ranks is measured as N real gloo processes; the figures
are the job's (global throughput, largest rank's peak); a rank that dies fails that trial
only and takes no live rank with it; bad world sizes are refused with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests_helpers import child_pids

import autoscale
from autoscale import CompressPlan, OptimizerPlan, Plan, PlanMismatchError, ShardPlan, TunerError
from autoscale._api import _check_world_size, optimize_script
from autoscale.capture import capture
from autoscale.plan import BatchPlan, Fingerprint
from autoscale.plan._shard import SHARD_STRATEGIES
from autoscale.search._workers import TrialFailed, WorkerRunner, script_workload

RANKED = Path(__file__).resolve().parents[1] / "workloads" / "ranked.py"
APPLY_WORKER = Path(__file__).resolve().parents[1] / "distributed" / "apply_worker.py"
ADAM = OptimizerPlan(kind="adam", kernel="torch")


def worker_pids() -> list[int]:
    return child_pids(os.getpid(), marker=b"worker_main", live=True)


def _runner() -> tuple[WorkerRunner, Plan]:
    from autoscale.search._workload import load_workload

    work = load_workload(RANKED)
    graph = capture(work.model, work.example_inputs)
    base = Plan(sections={"optimizer": ADAM},
                fingerprint=Fingerprint.of(work.model, graph.structure_hash()))
    runner = WorkerRunner(script_workload(RANKED), device=torch.device("cpu"), warmup=1,
                          iters=2, fingerprint=base.fingerprint_digest(), world_size=2)
    return runner, base


@pytest.mark.distributed
def test_two_rank_trials_report_the_jobs_figures_and_survive_a_dead_rank() -> None:
    runner, base = _runner()
    ddp = base.replace(shard=ShardPlan(strategy="ddp", world_size=2))
    with runner:
        baseline = runner.baseline(ADAM, timeout_s=120)
        assert baseline.batch_size == 8  # the global batch: 4 rows on each of 2 ranks
        assert baseline.samples_per_s == pytest.approx(8 / baseline.step_time_s)
        assert len(worker_pids()) == 2
        first = runner.measure(ddp, timeout_s=120)
        assert first.batch_size == 8 and first.peak_memory_bytes > 0
        # micro-batches of 1: rank 1 segfaults, rank 0 would wait in the all-reduce.
        crash = ddp.replace(batch=BatchPlan(micro_batch_size=1, grad_accum_steps=4))
        with pytest.raises(TrialFailed) as info:
            runner.measure(crash, timeout_s=120)
        assert info.value.kind == "crash" and "SIGSEGV" in info.value.reason
        assert worker_pids() == []  # the live rank was killed with the dead one
        again = runner.measure(ddp, timeout_s=120)
        assert again.batch_size == 8
        # The link check's probe: one all-reduce between the live ranks, timed.
        assert 0 < runner.all_reduce_seconds(1 << 20, timeout_s=60) < 60
        assert runner.started == 2
    assert worker_pids() == []


@pytest.mark.distributed
def test_a_ddp_powersgd_trial_measures_steps_that_compress() -> None:
    # torch's PowerSGD hook all-reduces the whole bucket for its first 2 steps; with the
    # runner's one warm-up step the tracked step would be one of them, and the per-step
    # bytes the mean of whole and compressed steps (over half the gradient).
    from autoscale.search._workload import load_workload

    runner, base = _runner()
    plan = base.replace(shard=ShardPlan(strategy="ddp", world_size=2),
                        compress=CompressPlan(method="powersgd"))
    grad_bytes = sum(p.nbytes for p in load_workload(RANKED).model.parameters())
    with runner:
        out = runner.measure(plan, timeout_s=120)
    assert out.comm_bytes_per_step is not None
    # Rank 1 sends each weight matrix as its P and Q (a (64, 32) one as 96 numbers).
    assert 0 < out.comm_bytes_per_step < grad_bytes / 4


def test_bad_world_sizes_are_refused_with_the_fix() -> None:
    cores = os.cpu_count() or 1
    with pytest.raises(TunerError, match=f"at most {cores}"):
        optimize_script(RANKED, world_size=cores + 1, trials=1)
    with pytest.raises(TunerError, match="multiple of 2"):
        _check_world_size(2, (torch.zeros(7, 2),), torch.device("cpu"))
    with pytest.raises(TunerError, match="needs several ranks"):
        optimize_script(RANKED, world_size=1, compressors=("int8",), trials=1)
    with pytest.raises(TunerError, match="isolate=False"):
        optimize_script(RANKED, world_size=2, isolate=False, trials=1)


@pytest.mark.distributed
def test_a_plan_tuned_at_two_ranks_runs_unchanged_under_torchrun(tmp_path) -> None:
    result = optimize_script(RANKED, world_size=2, trials=4, precisions=("fp32",),
                             compressors=("none", "bf16"), optimizer="adam", iters=2)
    plan = result.plan
    assert plan.shard.world_size == 2 and plan.shard.strategy in SHARD_STRATEGIES[1:]
    # The link was timed before the search and decided whether bf16 was tried; a
    # compressed winner beat its uncompressed twin, confirmed beside it.
    notes = result.report.notes
    assert notes[0].startswith("link: an all-reduce of the"), notes
    if plan.compress.method != "none":
        assert any("uncompressed twin (chosen)" in n for n in notes), notes
    assert plan.measured is not None and plan.measured.batch_size == 8
    with pytest.raises(TunerError, match="2-rank job"):
        result.step(torch.zeros(8, 16))  # this process is not a rank of the job
    path = tmp_path / "plan.json"
    plan.save(path)
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(APPLY_WORKER), str(path), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    # Same wrapping and hooks as the tuner's trial workers built, and the same losses.
    expected_wrapper = "DistributedDataParallel" if plan.shard.uses_ddp else "FSDPRanked"
    assert got["wrapper"] == expected_wrapper
    assert got["units"] == got["tuner_units"]
    assert got["compressed"] == (plan.compress.method != "none")
    assert got["applied"] == got["tuner_way"]
    # Against one process on the whole batch: fp32 sum reordering, or bf16 rounding of
    # the communicated gradients (eps 7.8e-3 on each step's update).
    tol = 1e-5 if plan.compress.method == "none" else 2e-2
    torch.testing.assert_close(got["applied"], got["one_process"], rtol=tol, atol=1e-6)


def test_a_plan_for_two_ranks_is_refused_in_one_process(tmp_path) -> None:
    from autoscale.search._workload import load_workload

    work = load_workload(RANKED)
    graph = capture(work.model, work.example_inputs)
    plan = Plan(sections={"shard": ShardPlan(strategy="ddp", world_size=2)},
                fingerprint=Fingerprint.of(work.model, graph.structure_hash()))
    with pytest.raises(PlanMismatchError, match=r"made for 2 ranks.*torchrun --nproc-per-node 2"):
        autoscale.apply(plan, work.model, work.example_inputs)
    # size-agnostic: runs here as one process (no sharding, nothing to compress)
    agnostic = plan.replace(shard=ShardPlan(strategy="ddp", world_size=2, size_agnostic=True))
    result = autoscale.apply(agnostic, work.model, work.example_inputs)
    assert result.plan.shard.strategy == "none"
    assert result.step(work.example_inputs) > 0
