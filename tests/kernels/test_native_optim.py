"""The C loops of kernels/_cpu_optim.py (SGD, LARS, LAMB "native") on bf16 params with
fp32 state, and on tensors spanning several of their 16K-element chunks, against the
references. (fp32 on the small shape sets: tests/kernels/test_sgd.py, test_lamb_lars.py.)"""

from __future__ import annotations

import pytest
import torch
from _optim_lists import clone_all, randn_list, zeros_list

from autoscale.kernels import _cpu_optim
from autoscale.kernels.lamb import lamb, lamb_reference
from autoscale.kernels.lars import lars, lars_reference
from autoscale.kernels.sgd import sgd, sgd_reference

# Several chunks, exactly one, one element more, empty tensors between, 1-D and 2-D.
SHAPES = [(70000,), (0,), (5,), (16384,), (3, 16385), (0, 4), (40, 30)]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])

pytestmark = pytest.mark.skipif(not _cpu_optim.available(),
                                reason=f"the C library did not build: {_cpu_optim.load_error()}")


def _close_params(got, want, dtype: torch.dtype) -> None:
    if dtype == torch.float32:  # another op order: a few ulps
        _close_lists(got, want, rtol=1e-5, atol=1e-6)
        return
    # bf16: fp32 maths rounded to bf16 each step. A rounding may flip by one bf16 ulp and
    # carry on (while |p| shrinks it can exceed one ulp of the final value), on a few
    # elements; a broken bf16 load or store would be off nearly everywhere.
    for g, w in zip(got, want, strict=True):
        if w.numel() == 0:
            continue
        err = (g.float() - w.float()).abs()
        assert (err > 2**-7 * w.float().abs() + 1e-6).float().mean() < 1e-3
        assert (err <= 2**-7 * w.float().abs().max()).all()


def _close_lists(got, want, **tol) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


@DTYPES
@pytest.mark.parametrize("hyper", [
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=True),
    dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.0, nesterov=False, maximize=False),
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=1e-3, nesterov=False, maximize=False),
])  # fmt: skip
def test_sgd_native(dtype, hyper: dict) -> None:
    got = [randn_list(SHAPES, dtype), zeros_list(SHAPES) if hyper["momentum"] else []]
    want = clone_all(got)
    for i in range(3):
        grads = randn_list(SHAPES, dtype)
        assert sgd(got[0], grads, got[1], first_step=i == 0, **hyper, kernel="native") == "native"
        sgd_reference(want[0], grads, want[1], first_step=i == 0, **hyper)
    _close_params(got[0], want[0], dtype)
    _close_lists(got[1], want[1], rtol=1e-4, atol=1e-6)


@DTYPES
def test_lars_native(dtype) -> None:
    hyper = dict(lr=0.5, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True,
                 eta=0.02, eps=1e-8)
    excluded = [len(s) == 1 for s in SHAPES]
    got = [randn_list(SHAPES, dtype), zeros_list(SHAPES)]
    want = clone_all(got)
    for i in range(3):
        grads = randn_list(SHAPES, dtype)
        assert lars(got[0], grads, got[1], excluded, first_step=i == 0, **hyper,
                    kernel="native") == "native"
        lars_reference(want[0], grads, want[1], excluded, first_step=i == 0, **hyper)
    _close_params(got[0], want[0], dtype)
    _close_lists(got[1], want[1], rtol=1e-4, atol=1e-6)


@DTYPES
def test_lamb_native(dtype) -> None:
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=1e-2,
                 bias_correction=True)
    excluded = [len(s) == 1 for s in SHAPES]
    got = [randn_list(SHAPES, dtype), zeros_list(SHAPES), zeros_list(SHAPES),
           [torch.tensor(0.0) for _ in SHAPES]]
    want = clone_all(got)
    for _ in range(3):
        grads = randn_list(SHAPES, dtype)
        assert lamb(got[0], grads, *got[1:], excluded, **hyper, kernel="native") == "native"
        lamb_reference(want[0], grads, *want[1:], excluded, **hyper)
    _close_params(got[0], want[0], dtype)
    for gs, ws in zip(got[1:3], want[1:3], strict=True):
        _close_lists(gs, ws, rtol=1e-4, atol=1e-6)
    assert [s.item() for s in got[3]] == [3.0] * len(SHAPES)


def test_sq_norms_are_per_tensor() -> None:
    a, b = randn_list(SHAPES, torch.float32), randn_list(SHAPES, torch.float32)
    got = _cpu_optim.sq_norms(a, b)
    want = torch.tensor([[x.double().square().sum(), y.double().square().sum()]
                         for x, y in zip(a, b, strict=True)])  # fmt: skip
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_native_is_not_offered_for_what_it_cannot_take() -> None:
    # fp64 params, and fp16 (no C loop for it): the dispatcher never sees a native path.
    for dtype in (torch.float64, torch.float16):
        assert not _cpu_optim.takes(randn_list(SHAPES, dtype), randn_list(SHAPES, dtype))
    # bf16 params with fp32 grads (a grad_dtype override): one dtype per call only.
    assert not _cpu_optim.takes(randn_list(SHAPES, torch.bfloat16),
                                randn_list(SHAPES, torch.float32))


def test_without_a_c_compiler_the_torch_paths_step(monkeypatch) -> None:
    # No compiler (or a failed build): native is never offered, forcing it says why, and
    # auto steps on a torch path. The real build is skipped here, not broken.
    from autoscale.errors import KernelUnavailable
    from autoscale.kernels import _dispatch

    monkeypatch.setattr(_cpu_optim, "available", lambda: False)
    _dispatch.clear_cache()
    try:
        p, g = randn_list(SHAPES, torch.float32), randn_list(SHAPES, torch.float32)
        state = [zeros_list(SHAPES), zeros_list(SHAPES), [torch.tensor(0.0) for _ in SHAPES]]
        excluded = [len(s) == 1 for s in SHAPES]
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0)
        with pytest.raises(KernelUnavailable, match="native"):
            lamb(p, g, *state, excluded, **hyper, kernel="native")
        assert lamb(p, g, *state, excluded, **hyper, kernel="auto") in ("foreach", "reference")
    finally:
        _dispatch.clear_cache()
