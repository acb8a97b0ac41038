"""The tuner rejects a plan its estimate puts over the budget before measuring it, and
records it in the study as infeasible with that estimate (Note: [pruning on the
estimate] in autoscale/search/_study.py)."""

from __future__ import annotations

from typing import Any

import cnn
import optuna
import torch

import autoscale
from autoscale import Plan
from autoscale.cost._cost import Calibration
from autoscale.measure import measure
from autoscale.runtime import build_result
from autoscale.search._study import (
    SIMULATED_MARGIN,
    PlanEstimates,
    SearchSpace,
    open_study,
    run_search,
)


def test_a_plan_estimated_over_the_budget_is_recorded_infeasible_and_not_measured(
        tmp_path) -> None:
    # The CNN example: its activations, which micro-batches shrink, outweigh its weights.
    model, batch = cnn.build(batch_size=16)
    loss_fn = None
    graph = autoscale.capture(model, batch)
    estimates = PlanEstimates(model, batch, graph, loss_fn=loss_fn, calibration=Calibration())
    space = SearchSpace(batch_size=16, block_names=(), precisions=("fp32",))
    whole, quarter = (space.plan_from({"micro_batch_size": m}, Plan()) for m in (16, 4))
    # A budget the whole batch's estimate exceeds by more than the margin and micro-batches
    # of 4 fit: the first plan queued (the untouched one) must be pruned unmeasured.
    budget = int(estimates.bytes(whole) / SIMULATED_MARGIN) - 1
    assert estimates.bytes(quarter) < budget
    measured: list[Plan] = []

    def measure_plan(plan: Plan):
        measured.append(plan)
        return measure(build_result(plan, model, graph=graph, loss_fn=loss_fn), batch,
                       warmup=1, iters=1)

    study = open_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="prune",
                       seed=0)
    records = run_search(study, space, Plan(), estimates=estimates, budget=budget,
                         trials=3, measure=measure_plan)
    pruned = [r for r in records if r.state == "pruned by cost model"]
    assert pruned and pruned[0].plan == whole and not pruned[0].feasible
    assert pruned[0].estimated_bytes == estimates.bytes(whole)
    assert whole not in measured and measured
    # In the stored study: infeasible (its constraint is the bytes over the budget), with
    # the estimate and the margin it was judged by, and no measured figure.
    stored = optuna.load_study(study_name="prune", storage=f"sqlite:///{tmp_path / 'study.db'}")
    trial = next(t for t in stored.trials if t.number == pruned[0].number)
    assert trial.user_attrs["estimated_bytes"] == estimates.bytes(whole)
    assert trial.user_attrs["prune_margin"] == SIMULATED_MARGIN
    assert "peak_memory_bytes" not in trial.user_attrs
    assert trial.constraints == {"peak_over_budget_bytes": float(estimates.bytes(whole) - budget)}


class _ReadsInBackward(torch.autograd.Function):
    """Identity whose backward scales by a value it reads: a backward fake tensors cannot
    run, after a forward they can (so the model captures, and its step cannot be
    simulated)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (2.0 if float(x.abs().max()) > 0 else 1.0)


class _NotSimulable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReadsInBackward.apply(self.lin(x)).square().mean()


def test_a_model_the_estimator_cannot_simulate_is_measured_and_the_tune_says_so() -> None:
    result = autoscale.optimize(_NotSimulable(), (torch.randn(8, 16),), trials=2,
                                precisions=("fp32",), isolate=False)
    assert any(t.state == "measured" for t in result.report.trials)
    assert any(n.startswith("estimates: the graph's (calibrated), not the simulated step")
               and "could not simulate" in n for n in result.report.notes)
