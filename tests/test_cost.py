"""The graph estimate (the tuner's fallback when a model cannot be simulated): exact static
memory, monotone activation estimate, calibration."""

from __future__ import annotations

import torch

import autoscale
from autoscale import BatchPlan, CheckpointPlan, OptimizerPlan, Plan, PrecisionPlan


def test_static_categories_are_exact_and_knobs_only_lower_activations() -> None:
    from tests_helpers import tiny_gpt

    from autoscale.cost._cost import estimate_graph

    model, batch = tiny_gpt(batch_size=8)
    graph = autoscale.capture(model, batch)
    n = sum(p.numel() for p in model.parameters())  # tied weight counted once
    base = estimate_graph(model, graph, Plan())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert base.parameters == 4 * n + buffers
    assert base.gradients == 4 * n
    assert base.optimizer_state == 8 * n  # AdamW: exp_avg + exp_avg_sq
    sgd = Plan(sections={"optimizer": OptimizerPlan(kind="sgd", kwargs={"lr": 0.1})})
    assert estimate_graph(model, graph, sgd).optimizer_state == 0

    blocks = tuple(b.fqn for b in graph.blocks)
    ckpt = estimate_graph(model, graph, Plan(sections={
        "checkpoint": CheckpointPlan(blocks=blocks)}))
    micro = estimate_graph(model, graph, Plan(sections={
        "batch": BatchPlan(micro_batch_size=2, grad_accum_steps=4)}))
    bf16 = estimate_graph(model, graph, Plan(sections={
        "precision": PrecisionPlan(mode="bf16")}))
    assert ckpt.activations < base.activations
    assert micro.activations < base.activations
    assert bf16.activations < base.activations
    assert base.total == (base.parameters + base.gradients + base.optimizer_state
                          + base.activations + base.temporaries)


def test_calibrated_estimate_is_close_to_measurement() -> None:
    from tests_helpers import tiny_gpt

    from autoscale._api import measure_baseline
    from autoscale.cost._cost import calibrate, estimate_graph

    model, batch = tiny_gpt(batch_size=8)
    graph = autoscale.capture(model, batch)
    plan = Plan(sections={"optimizer": OptimizerPlan(kind="adamw", kernel="torch")})
    m = measure_baseline(model, batch, loss_fn=None, optimizer=plan.optimizer)
    cal = calibrate(model, graph, plan, peak_bytes=m.peak_memory_bytes,
                    step_time_s=m.step_time_s)
    est = estimate_graph(model, graph, plan, calibration=cal)
    # Calibrated on this very plan: equal by construction up to integer rounding.
    assert abs(est.total - m.peak_memory_bytes) <= 0.01 * m.peak_memory_bytes
    assert est.step_time_s is not None and est.step_time_s > 0
    # and it still says that checkpointing every block needs less
    blocks = tuple(b.fqn for b in graph.blocks)
    ckpt = estimate_graph(model, graph, plan.replace(checkpoint=CheckpointPlan(blocks=blocks)),
                          calibration=cal)
    assert ckpt.total < est.total
    assert torch.is_tensor(batch[0])
