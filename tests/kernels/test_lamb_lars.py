"""LAMB and LARS kernels (two-phase per-tensor norms) against their references."""

from __future__ import annotations

import pytest
import torch
from _optim_lists import CHUNK, SHAPE_SETS, clone_all, randn_list, zeros_list

from autoscale.kernels.lamb import lamb, lamb_reference
from autoscale.kernels.lars import lars, lars_reference

LAMB_HYPERS = [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=1e-2, bias_correction=True),
    dict(lr=5e-2, beta1=0.8, beta2=0.99, eps=1e-4, weight_decay=0.0, bias_correction=False),
]
LARS_HYPERS = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, eta=1e-3,
         eps=1e-8),
    dict(lr=0.5, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, eta=0.02,
         eps=1e-8),
    dict(lr=0.5, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, eta=0.02,
         eps=1e-8),
]


def _excluded(shapes) -> list[bool]:
    return [len(s) == 1 for s in shapes]  # the usual rule: 1-D tensors are not adapted


def _lamb_state(shapes, dtype):
    return [randn_list(shapes, dtype), zeros_list(shapes), zeros_list(shapes),
            [torch.tensor(0.0) for _ in shapes]]


def _assert_lists_close(got, want, *, rtol: float, atol: float) -> None:
    for gs, ws in zip(got, want, strict=True):
        for g, w in zip(gs, ws, strict=True):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("hyper", LAMB_HYPERS)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("kernel", ["triton", "foreach", "native"])
def test_lamb_fp32_matches_reference(kernel: str, shapes, hyper: dict, request) -> None:
    if kernel == "triton":
        request.getfixturevalue("interpret")
    got = _lamb_state(shapes, torch.float32)
    want = clone_all(got)
    for _ in range(3):
        grads = randn_list(shapes, torch.float32)
        assert lamb(got[0], grads, *got[1:], _excluded(shapes), **hyper, kernel=kernel,
                    chunk=CHUNK) == kernel
        lamb_reference(want[0], grads, *want[1:], _excluded(shapes), **hyper)
    # fp32; the norms are summed in a different order (per chunk, then per tensor), which
    # changes the trust ratio in the last ulps; 1e-5 leaves two orders of margin.
    _assert_lists_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hyper", LARS_HYPERS)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("kernel", ["triton", "foreach", "native"])
def test_lars_fp32_matches_reference(kernel: str, shapes, hyper: dict, request) -> None:
    if kernel == "triton":
        request.getfixturevalue("interpret")
    got = [randn_list(shapes, torch.float32), zeros_list(shapes) if hyper["momentum"] else []]
    want = clone_all(got)
    for i in range(3):
        grads = randn_list(shapes, torch.float32)
        assert lars(got[0], grads, got[1], _excluded(shapes), first_step=i == 0, **hyper,
                    kernel=kernel, chunk=CHUNK) == kernel
        lars_reference(want[0], grads, want[1], _excluded(shapes), first_step=i == 0, **hyper)
    # fp32; norms summed in another order move the trust ratio by ulps only.
    _assert_lists_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shapes", [SHAPE_SETS["mixed"], SHAPE_SETS["many"]], ids=["mixed", "many"])
def test_triton_bf16_params_fp32_state(interpret, shapes) -> None:
    got = _lamb_state(shapes, torch.bfloat16)
    want = clone_all(got)
    grads = randn_list(shapes, torch.bfloat16)
    lamb(got[0], grads, *got[1:], _excluded(shapes), **LAMB_HYPERS[0], kernel="triton",
         chunk=CHUNK)
    lamb_reference(want[0], grads, *want[1:], _excluded(shapes), **LAMB_HYPERS[0])
    # One step, fp32 maths rounded once to bf16: at most one bf16 ulp apart (rtol 2^-7).
    torch.testing.assert_close(got[0], want[0], rtol=2**-7, atol=1e-6)
    _assert_lists_close(got[1:3], want[1:3], rtol=1e-5, atol=1e-6)

    p = randn_list(shapes, torch.bfloat16)
    bufs = zeros_list(shapes)
    p_ref, bufs_ref = clone_all([p, bufs])
    lars(p, grads, bufs, _excluded(shapes), first_step=True, **LARS_HYPERS[1], kernel="triton",
         chunk=CHUNK)
    lars_reference(p_ref, grads, bufs_ref, _excluded(shapes), first_step=True, **LARS_HYPERS[1])
    torch.testing.assert_close(p, p_ref, rtol=2**-7, atol=1e-6)
    _assert_lists_close([bufs], [bufs_ref], rtol=1e-5, atol=1e-6)


def test_lamb_excluded_tensor_is_plain_adam_without_decay() -> None:
    (p,), (g,) = randn_list([(50,)], torch.float32), randn_list([(50,)], torch.float32)
    expected = p - 0.1 * (g * 0.1 / 0.1) / ((g * g * 1e-3 / 1e-3).sqrt() + 1e-6)
    lamb_reference([p], [g], [torch.zeros(50)], [torch.zeros(50)], [torch.tensor(0.0)], [True],
                   lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.5)
    # Step 1 with bias correction is p - lr * g / (|g| + eps): a few fp32 ops, ulps apart.
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-6)


def test_trust_ratio_is_one_for_zero_params() -> None:
    """A zero-initialised weight must still move (||p|| = 0 gives ratio 1, not 0)."""
    p, g = torch.zeros(4, 4), torch.ones(4, 4)
    lars_reference([p], [g], [], [False], first_step=True, lr=0.1, momentum=0.0,
                   dampening=0.0, weight_decay=0.0, nesterov=False, eta=1e-3, eps=1e-8)
    torch.testing.assert_close(p, torch.full((4, 4), -0.1), rtol=0, atol=0)
