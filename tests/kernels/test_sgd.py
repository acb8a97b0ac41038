"""SGD kernels: the reference against torch.optim.SGD, every other path against the reference."""

from __future__ import annotations

import pytest
import torch
from _optim_lists import CHUNK, SHAPE_SETS, clone_all, randn_list, zeros_list

from autoscale.errors import KernelUnavailable
from autoscale.kernels import _triton_util
from autoscale.kernels.sgd import sgd, sgd_reference

HYPERS = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=True),
]


def _bufs(shapes, hyper):
    return zeros_list(shapes) if hyper["momentum"] else []


@pytest.mark.parametrize("hyper", HYPERS)
def test_reference_matches_torch_sgd(hyper: dict) -> None:
    shapes = SHAPE_SETS["mixed"]
    params = [torch.nn.Parameter(t) for t in randn_list(shapes, torch.float32)]
    ours, bufs = [p.detach().clone() for p in params], _bufs(shapes, hyper)
    opt = torch.optim.SGD(params, foreach=False, **hyper)
    for i in range(5):
        grads = randn_list(shapes, torch.float32)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        sgd_reference(ours, grads, bufs, first_step=i == 0, **hyper)
    # Same operation order as torch's single-tensor SGD: equal up to vectorisation ulps.
    for p, q in zip(params, ours, strict=True):
        torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("hyper", HYPERS)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("kernel", ["triton", "torch_fused", "native"])
def test_fp32_paths_match_reference(kernel: str, shapes, hyper: dict, request) -> None:
    if kernel == "triton":
        request.getfixturevalue("interpret")
    got = [randn_list(shapes, torch.float32), _bufs(shapes, hyper)]
    want = clone_all(got)
    for i in range(3):
        grads = randn_list(shapes, torch.float32)
        assert sgd(got[0], grads, got[1], first_step=i == 0, **hyper, kernel=kernel,
                   chunk=CHUNK) == kernel
        sgd_reference(want[0], grads, want[1], first_step=i == 0, **hyper)
    # fp32 throughout; only the order of two or three fp32 multiply-adds differs.
    for gs, ws in zip(got, want, strict=True):
        for g, w in zip(gs, ws, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hyper", HYPERS)
@pytest.mark.parametrize("first_step", [True, False])
def test_triton_bf16_params_fp32_state(interpret, hyper: dict, first_step: bool) -> None:
    shapes = SHAPE_SETS["mixed"]
    got = [randn_list(shapes, torch.bfloat16),
           randn_list(shapes, torch.float32) if hyper["momentum"] else []]
    want = clone_all(got)
    grads = randn_list(shapes, torch.bfloat16)
    sgd(got[0], grads, got[1], first_step=first_step, **hyper, kernel="triton", chunk=CHUNK)
    sgd_reference(want[0], grads, want[1], first_step=first_step, **hyper)
    # One step, fp32 maths rounded once to bf16: at most one bf16 ulp apart (rtol 2^-7).
    torch.testing.assert_close(got[0], want[0], rtol=2**-7, atol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_forcing_triton_on_cpu_without_interpreter_raises(monkeypatch) -> None:
    monkeypatch.setattr(_triton_util, "INTERPRET", False)
    shapes = SHAPE_SETS["one_small"]
    with pytest.raises(KernelUnavailable, match="TRITON_INTERPRET=1"):
        sgd(randn_list(shapes, torch.float32), randn_list(shapes, torch.float32), [],
            first_step=True, lr=0.1, kernel="triton")
