"""Large-batch LR rules: scaling and warm-up."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from autoscale.optim._schedule import scale_lr, warmup_lambda, warmup_schedule


def test_scale_lr_rules() -> None:
    assert scale_lr(0.1, 256, 1024, rule="linear") == pytest.approx(0.4)
    assert scale_lr(1e-3, 64, 512, rule="sqrt") == pytest.approx(1e-3 * math.sqrt(8))
    assert scale_lr(0.1, 256, 256) == pytest.approx(0.1)


@pytest.mark.parametrize("args", [(0.1, 0, 8), (0.1, 8, -1), (-1.0, 8, 8)])
def test_scale_lr_rejects_bad_input(args) -> None:
    with pytest.raises(ValueError):
        scale_lr(*args)
    with pytest.raises(ValueError, match="rule"):
        scale_lr(0.1, 8, 16, rule="cubic")  # type: ignore[arg-type]


def test_warmup_then_constant() -> None:
    f = warmup_lambda(4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_warmup_then_cosine_is_monotone_and_ends_at_floor() -> None:
    f = warmup_lambda(10, 110, decay="cosine", min_factor=0.1)
    values = [f(s) for s in range(150)]
    assert values[9] == 1.0 and values[10] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(values[:10]))
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    assert values[110] == pytest.approx(0.1) and values[-1] == pytest.approx(0.1)
    assert all(0 < v <= 1 for v in values)


def test_bad_schedules_rejected() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        warmup_lambda(10, decay="cosine")
    with pytest.raises(ValueError, match="min_factor"):
        warmup_lambda(10, 100, decay="cosine", min_factor=2.0)


def test_warmup_schedule_drives_optimizer_lr() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.8)
    sched = warmup_schedule(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
