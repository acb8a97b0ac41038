"""The tuner's checkpoint knob (Note: [the checkpoint knob]): a fraction f turned into every
block's policy by the exact solver. f=1 is no checkpointing, f=0 the leanest policies, and
the activations the plans keep fall (never rise) as f falls, staying within the budget the
solver was given."""

from __future__ import annotations

import pytest
from tests_helpers import tiny_gpt

import autoscale
from autoscale import BatchPlan, Plan, PrecisionPlan
from autoscale.cost._checkpoint_solver import CheckpointBudgets
from autoscale.search._study import SearchSpace


@pytest.fixture(scope="module")
def knob():
    model, batch = tiny_gpt(batch_size=8, dropout=0.1)
    graph = autoscale.capture(model, batch)
    budgets = CheckpointBudgets(model, batch, graph)
    space = SearchSpace(batch_size=8, block_names=tuple(b.fqn for b in graph.blocks),
                        precisions=("fp32",), checkpoint=budgets)
    return model, batch, graph, budgets, space


def _activations(knob, plan: Plan) -> int:
    model, batch, graph, *_ = knob
    return autoscale.estimate(model, batch, plan, graph=graph).activations


def test_the_ends_of_the_knob_are_no_checkpointing_and_the_leanest_policies(knob) -> None:
    *_, budgets, space = knob
    assert space.solves_checkpoints
    top = space.plan_from({"activation_budget": 1.0, "precision": "fp32"}, Plan())
    assert not top.checkpoint.blocks
    lean = space.plan_from({"activation_budget": 0.0, "precision": "fp32"}, Plan())
    assert len(lean.checkpoint.blocks) == len(space.block_names)  # every block at its leanest
    floor, ceiling = budgets.bounds(Plan())
    assert 0 < floor < ceiling
    assert _activations(knob, top) == ceiling
    assert _activations(knob, lean) <= floor


def test_activations_fall_with_the_fraction_and_fit_the_solvers_budget(knob) -> None:
    *_, budgets, space = knob
    floor, ceiling = budgets.bounds(Plan())
    previous = None
    for fraction in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0):
        plan = space.plan_from({"activation_budget": fraction, "precision": "fp32"}, Plan())
        kept = _activations(knob, plan)
        assert kept <= floor + fraction * (ceiling - floor), fraction
        assert previous is None or kept <= previous, (fraction, kept, previous)
        previous = kept


def test_the_knob_follows_the_rest_of_the_plan(knob) -> None:
    # Micro-batches of 2 keep a quarter of the batch's activations: their own bounds.
    *_, budgets, space = knob
    whole = budgets.bounds(Plan())
    micro = budgets.bounds(Plan().replace(batch=BatchPlan(micro_batch_size=2,
                                                          grad_accum_steps=4)))
    assert micro[1] < whole[1] and micro[0] < whole[0]
    bf16 = space.plan_from({"activation_budget": 0.5, "precision": "bf16"}, Plan())
    assert bf16.precision == PrecisionPlan(mode="bf16") and bf16.checkpoint.blocks
