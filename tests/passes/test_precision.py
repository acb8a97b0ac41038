"""autocast_forward: low-precision forward, fp32 parameters."""

from __future__ import annotations

import copy

import torch

from autoscale import PrecisionPlan
from autoscale.passes import autocast_forward


def test_fp32_is_a_no_op_and_bf16_runs_matmuls_in_bf16() -> None:
    model = torch.nn.Linear(8, 4)
    same = autocast_forward(model, plan=PrecisionPlan(mode="fp32"), device_type="cpu")
    assert same(torch.randn(2, 8)).dtype == torch.float32
    low = autocast_forward(copy.deepcopy(model), plan=PrecisionPlan(mode="bf16"),
                           device_type="cpu")
    assert low(torch.randn(2, 8)).dtype == torch.bfloat16
    assert low.weight.dtype == torch.float32


def test_deepcopy_of_rewritten_model_runs_its_own_weights() -> None:
    model = autocast_forward(torch.nn.Linear(8, 4), plan=PrecisionPlan(mode="bf16"),
                             device_type="cpu")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.weight.zero_()
        clone.bias.zero_()
    assert torch.count_nonzero(clone(torch.randn(2, 8))) == 0
    assert torch.count_nonzero(model(torch.randn(2, 8))) > 0
