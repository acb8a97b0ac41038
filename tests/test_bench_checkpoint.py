"""bench/bench_checkpoint.py runs, and its autoscale rows keep the solver's invariants on
real measured memory: within the budget and falling as it falls. No timing is asserted."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_checkpoint


def test_quick_bench_structure_and_memory_invariants() -> None:
    report = bench_checkpoint.run(("gpt",), (1.0, 0.5), repeats=2, compile_rows=False,
                                  quick=True)
    rows = report["gpt"]
    assert [r.label for r in rows] == ["no ckpt", "no ckpt again", "autoscale 100%",
                                       "autoscale 50%", "full ckpt"]
    base, ours = rows[0], [r for r in rows if r.kind == "autoscale"]
    assert base.act_bytes > 0 and math.isclose(base.time_ratio, 1.0)
    # Each checkpointed block's recompute saves the CPU RNG state (torch.utils.checkpoint
    # preserves it for dropout), which the allocator sees and the solver's budget does not.
    rng = torch.get_rng_state().numel()
    previous = None
    for row in ours:
        checkpointed = 0 if row.policies == "none" else sum(
            int(part.split("x")[1]) for part in row.policies.split())
        assert row.act_bytes <= row.fraction * base.act_bytes + checkpointed * rng, row
        assert previous is None or row.act_bytes <= previous
        previous = row.act_bytes
        assert row.step_s > 0 and row.peak_bytes >= row.act_bytes
    assert ours[0].act_bytes == base.act_bytes  # 100%: nothing to recompute
    full = rows[-1]
    assert full.act_bytes <= ours[-1].act_bytes
    assert rows[1].act_bytes == base.act_bytes  # the baseline again: only its time differs
    lines = bench_checkpoint.goals(rows)
    assert lines[0].startswith("noise: ")
    assert len(lines) == 5 and all(
        any(word in line for word in ("met", "missed", "tie within noise", "monotone"))
        for line in lines[1:]), lines


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_configs_each_in_their_own_process() -> None:
    from autoscale import CheckpointPlan, Plan
    from autoscale.plan import CompilePlan

    plan = Plan(sections={"checkpoint": CheckpointPlan(blocks=("h.0",)),
                          "compile": CompilePlan(mode="inductor")})
    specs = [dict(model="gpt", label="compile 0.5", kind="compile", fraction=0.5,
                  policies="", budget=0.5, repeats=2),
             dict(model="gpt", label="autoscale 50% ind", kind="autoscale", fraction=0.5,
                  policies="fullx1 +inductor", plan=plan.to_dict(), repeats=2)]
    rows = [bench_checkpoint.worker_row(spec, timeout=600) for spec in specs]
    for spec, row in zip(specs, rows, strict=True):
        assert row.error is None, row.error
        assert (row.label, row.policies) == (spec["label"], spec["policies"])
        assert row.compile_s is not None and row.compile_s > 0
        assert 0 < row.act_bytes <= row.peak_bytes and row.time_ratio > 0
    # One block checkpointed keeps less for the backward than none does under inductor.
    assert rows[1].act_bytes < bench_checkpoint.worker_row(
        dict(specs[1], plan=Plan(sections={"compile": CompilePlan(mode="inductor")}
                                 ).to_dict()), timeout=600).act_bytes


def test_compiled_rows_take_the_median_of_their_processes_and_share_equal_plans(
        monkeypatch) -> None:
    # The aggregation alone: worker_row (a process each) is replaced by a list of readings.
    Row = bench_checkpoint.Row
    readings = iter([0.90, 0.80, 0.86, 1.10, 1.00, 1.20, None, None, None])
    calls = []

    def fake_worker_row(spec):
        calls.append(spec["label"])
        ratio = next(readings)
        if ratio is None:
            return Row(spec["label"], spec["kind"], spec["fraction"], 0, 0, math.nan,
                       math.nan, error="compile failed")
        return Row(spec["label"], spec["kind"], spec["fraction"], 100, 200, ratio / 10,
                   ratio, compile_s=5.0)

    monkeypatch.setattr(bench_checkpoint, "worker_row", fake_worker_row)
    spec = dict(model="gpt", kind="autoscale", policies="p", plan={"a": 1}, budget=None)
    specs = [dict(spec, label="autoscale 100% ind", fraction=1.0),
             dict(spec, label="autoscale 75% ind", fraction=0.75),  # the same plan: shared
             dict(spec, label="autoscale 50% ind", fraction=0.5, plan={"a": 2}),
             dict(model="gpt", kind="compile", policies="", plan=None, budget=0.5,
                  label="compile 0.5", fraction=0.5)]
    rows = bench_checkpoint.compiled_rows(specs, processes=3)
    assert calls == ["autoscale 100% ind"] * 3 + ["autoscale 50% ind"] * 3 + \
        ["compile 0.5"] * 3
    assert [r.label for r in rows] == [s["label"] for s in specs]
    assert [r.fraction for r in rows] == [1.0, 0.75, 0.5, 0.5]
    assert rows[0].time_ratio == rows[1].time_ratio == 0.86  # the median of three
    assert rows[0].spread == pytest.approx(0.10)
    assert rows[2].time_ratio == 1.10 and rows[2].step_s == pytest.approx(0.11)
    assert rows[3].error == "compile failed" and rows[3].kind == "compile"


def test_a_gap_within_the_compiled_rows_spread_is_a_tie() -> None:
    Row = bench_checkpoint.Row

    def row(label, kind, fraction, act, ratio, spread=None):
        return Row(label, kind, fraction, act, act, ratio / 10, ratio, spread=spread)

    rows = [row("no ckpt", "none", None, 100, 1.0), row("no ckpt again", "noise", None, 100,
                                                        1.01),
            row("autoscale 50% ind", "autoscale", 0.5, 40, 1.07, spread=0.09),
            row("compile 0.5", "compile", 0.5, 45, 1.00, spread=0.02),
            row("autoscale 25% ind", "autoscale", 0.25, 20, 1.14, spread=0.02),
            row("compile 0.25", "compile", 0.25, 21, 1.07, spread=0.02)]
    lines = bench_checkpoint.goals(rows)
    # 7% slower, within the 8.4% its own processes spread: a tie; at 25% 6.5% slower with
    # spreads of 2%: missed
    assert any(ln.startswith("budget 50%") and "tie within noise (band 8.4%)" in ln
               for ln in lines), lines
    assert any(ln.startswith("budget 25%") and ": solver missed (band 1.9%)" in ln
               for ln in lines), lines


def test_a_tie_with_torch_compile_is_run_head_to_head_and_printed_under_it(monkeypatch
                                                                           ) -> None:
    from autoscale import Plan
    from autoscale.plan import CompilePlan

    Row = bench_checkpoint.Row

    def row(label, kind, fraction, act, ratio, spread=None):
        return Row(label, kind, fraction, act, act, ratio / 10, ratio, spread=spread)

    rows = [row("no ckpt", "none", None, 100, 1.0),
            row("no ckpt again", "noise", None, 100, 1.01),
            row("autoscale 50% ind", "autoscale", 0.5, 40, 1.03, spread=0.02),
            row("compile 0.5", "compile", 0.5, 45, 1.00, spread=0.04),
            row("autoscale 25% ind", "autoscale", 0.25, 20, 0.95, spread=0.02),
            row("compile 0.25", "compile", 0.25, 21, 1.00, spread=0.02),
            # 75%: the same pair as at 50% (the solver's plan, compile 0.5 the fastest
            # fitting): its head-to-head is shared, not run again.
            row("autoscale 75% ind", "autoscale", 0.75, 40, 1.03, spread=0.02)]
    ind = Plan(sections={"compile": CompilePlan(mode="inductor")})
    plans = {"autoscale 50% ind": ind, "autoscale 25% ind": ind, "autoscale 75% ind": ind}
    specs = []

    class Done:
        returncode = 0
        stdout = '{"ours": 1.02, "theirs": 1.0}\n'

    def fake_run(cmd, **kwargs):
        specs.append(json.loads(cmd[-1]))
        return Done()

    monkeypatch.setattr(bench_checkpoint.subprocess, "run", fake_run)
    got = bench_checkpoint.duels("gpt", rows, plans, repeats=5, processes=2)
    # 50%: 3% slower, a tie within the 4% band: run head to head, twice; 25%: met, not run.
    assert got == {0.75: [1.02, 1.02], 0.5: [1.02, 1.02]}
    assert [(s["duel"], s["budget"], s["repeats"]) for s in specs] == [(True, 0.5, 5)] * 2
    assert specs[0]["plan"] == plans["autoscale 50% ind"].to_dict()
    lines = bench_checkpoint.goals(rows, got)
    at = next(i for i, ln in enumerate(lines) if ln.startswith("budget 50%"))
    assert "tie within noise" in lines[at]  # the verdict stays the rows'
    assert lines[at + 1].strip().startswith("head to head, autoscale 50% ind / compile 0.5")
    assert "median 1.020" in lines[at + 1]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_real_head_to_head_compiles_both_in_one_process() -> None:
    import subprocess

    from autoscale import CheckpointPlan, Plan
    from autoscale.plan import CompilePlan

    plan = Plan(sections={"checkpoint": CheckpointPlan(blocks=("h.0",)),
                          "compile": CompilePlan(mode="inductor")})
    spec = dict(model="gpt", duel=True, plan=plan.to_dict(), budget=0.5, repeats=2)
    proc = subprocess.run([sys.executable, bench_checkpoint.__file__, "--worker",
                           json.dumps(spec)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert set(got) == {"ours", "theirs"} and got["ours"] > 0 and got["theirs"] > 0
