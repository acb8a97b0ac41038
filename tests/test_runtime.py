"""Result.step: micro-batching, precision and state round-trip against a plain loop."""

from __future__ import annotations

import copy

import pytest
import torch
from tests_helpers import params_of

from autoscale import AutoscaleError, BatchPlan, OptimizerPlan, Plan, PrecisionPlan
from autoscale.runtime._result import build_result

SGD = OptimizerPlan(kind="sgd", kernel="torch", kwargs={"lr": 0.1})


def plain_sgd_step(model, x, y, lr=0.1) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = model(x, y)
    loss.backward()
    opt.step()
    loss = loss.detach()
    return loss.item()


@pytest.mark.parametrize("micro", [1, 3, 4, 8])
def test_micro_batching_matches_whole_batch(micro) -> None:
    from tests_helpers import tiny_gpt

    model, (x, y) = tiny_gpt(batch_size=8, dropout=0.0)
    reference = copy.deepcopy(model)
    plan = Plan(sections={"batch": BatchPlan(micro_batch_size=micro,
                                             grad_accum_steps=-(-8 // micro)),
                          "optimizer": SGD})
    result = build_result(plan, model)
    loss = result.step((x, y))
    ref_loss = plain_sgd_step(reference, x, y)
    # Summing micro-batch means in another order: fp32 rounding only.
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, ref in params_of(reference).items():
        torch.testing.assert_close(params_of(result.model)[name], ref, rtol=1e-5, atol=1e-6)


def test_user_model_is_not_changed() -> None:
    from tests_helpers import tiny_gpt

    model, (x, y) = tiny_gpt(batch_size=4)
    before = params_of(model)
    result = build_result(Plan(sections={"optimizer": SGD}), model)
    result.step((x, y))
    assert result.model is not model
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_low_precision_tracks_fp32(mode) -> None:
    from tests_helpers import tiny_gpt

    model, (x, y) = tiny_gpt(batch_size=8, dropout=0.0)
    fp32 = build_result(Plan(sections={"optimizer": SGD}), model)
    # A moderate initial loss scale: 2**16 overflows fp16 activation grads on the first
    # steps, which GradScaler handles by skipping them, and then the runs differ by design.
    precision = PrecisionPlan(mode=mode, init_scale=2.0**8)
    low = build_result(Plan(sections={"optimizer": SGD, "precision": precision}), model)
    losses = [(fp32.step((x, y)), low.step((x, y))) for _ in range(5)]
    for ref, got in losses:
        # bf16 keeps 8 bits of mantissa (rel. error ~4e-3 per op); over a loss of ~4.8
        # that stays within 2%.
        assert got == pytest.approx(ref, rel=0.02)
    assert all(p.dtype == torch.float32 for p in low.model.parameters())
    if mode == "fp16":
        assert low.scaler is not None
        assert low.scaler.get_scale() >= 2.0**8  # never backed off: no step was skipped


def test_state_dict_round_trip_resumes_identically() -> None:
    from tests_helpers import tiny_gpt

    model, (x, y) = tiny_gpt(batch_size=4, dropout=0.0)
    adam = OptimizerPlan(kind="adamw", kernel="torch", kwargs={"lr": 1e-3})
    plan = Plan(sections={"optimizer": adam, "batch": BatchPlan(micro_batch_size=2,
                                                                 grad_accum_steps=2)})
    a = build_result(plan, model)
    a.step((x, y))
    b = build_result(plan, model)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert a.step((x, y)) == b.step((x, y))
    for name, value in params_of(a.model).items():
        assert torch.equal(value, params_of(b.model)[name]), name


def test_output_without_loss_gets_a_clear_error() -> None:
    model = torch.nn.Linear(4, 2)
    result = build_result(Plan(sections={"optimizer": SGD}), model)
    with pytest.raises(AutoscaleError, match=r"not a scalar loss.*pass loss_fn="):
        result.step((torch.randn(3, 4),))


def test_schedule_section_scales_lr_and_warms_up() -> None:
    from autoscale import SchedulePlan

    schedule = SchedulePlan(lr_scaling="sqrt", base_batch_size=8, batch_size=32,
                            warmup_steps=4)
    plan = Plan(sections={"schedule": schedule, "optimizer": OptimizerPlan(
        kind="sgd", kernel="torch", kwargs={"lr": 0.01})})
    result = build_result(plan, torch.nn.Linear(4, 4), loss_fn=lambda out, b: out.pow(2).mean())
    applied = []
    for _ in range(6):
        applied.append(result.optimizer.param_groups[0]["lr"])
        result.step((torch.randn(32, 4),))
    peak = 0.01 * (32 / 8) ** 0.5  # sqrt rule
    assert applied[-1] == pytest.approx(peak)
    assert applied[0] < applied[1] < applied[2] < applied[3] <= peak  # linear warm-up
    assert Plan.from_json(plan.to_json()) == plan
    state = result.state_dict()
    assert "scheduler" in state


def test_schedule_needs_batch_sizes_for_scaling() -> None:
    from autoscale import PlanError, SchedulePlan

    with pytest.raises(PlanError, match=r"needs schedule\.base_batch_size"):
        SchedulePlan(lr_scaling="linear")
    with pytest.raises(PlanError, match=r"needs schedule\.total_steps"):
        SchedulePlan(decay="cosine")
