"""AdamW kernels: the reference against torch.optim.AdamW, other paths against the reference."""

from __future__ import annotations

import pytest
import torch
from _optim_lists import CHUNK, SHAPE_SETS, clone_all, randn_list, zeros_list

from autoscale.errors import KernelUnavailable
from autoscale.kernels import _cpu_optim, _dispatch, _triton_util
from autoscale.kernels.adamw import adamw, adamw_reference

HYPERS = [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False),
    dict(lr=3e-1, beta1=0.5, beta2=0.9, eps=1e-3, weight_decay=0.0, maximize=True),
]


def _state(shapes, dtype):
    return [randn_list(shapes, dtype), zeros_list(shapes), zeros_list(shapes),
            [torch.tensor(0.0) for _ in shapes]]


@pytest.mark.parametrize("hyper", HYPERS)
def test_reference_matches_torch_adamw(hyper: dict) -> None:
    params = [torch.nn.Parameter(t) for t in randn_list(SHAPE_SETS["mixed"], torch.float32)]
    ours = [p.detach().clone() for p in params]
    m, v = zeros_list(SHAPE_SETS["mixed"]), zeros_list(SHAPE_SETS["mixed"])
    steps = [torch.tensor(0.0) for _ in params]
    opt = torch.optim.AdamW(params, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]),
                            eps=hyper["eps"], weight_decay=hyper["weight_decay"],
                            maximize=hyper["maximize"], foreach=False)
    for _ in range(5):
        grads = randn_list(SHAPE_SETS["mixed"], torch.float32)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        adamw_reference(ours, grads, m, v, steps, **hyper)
    # Same operation order as torch's single-tensor AdamW: equal up to vectorisation ulps.
    for p, q in zip(params, ours, strict=True):
        torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("hyper", HYPERS)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("kernel", ["triton", "torch_fused"])
def test_fp32_paths_match_reference(kernel: str, shapes, hyper: dict, request) -> None:
    if kernel == "triton":
        request.getfixturevalue("interpret")
    got = _state(shapes, torch.float32)
    want = clone_all(got)
    for _ in range(3):
        grads = randn_list(shapes, torch.float32)
        used = adamw(got[0], grads, *got[1:], **hyper, kernel=kernel, chunk=CHUNK)
        assert used == kernel
        adamw_reference(want[0], grads, *want[1:], **hyper)
    # fp32 throughout; fused kernels reorder a handful of fp32 ops (lerp vs mul-add, one
    # division), which over 3 steps moves values by a few ulps, far below 1e-5.
    for gs, ws in zip(got, want, strict=True):
        for g, w in zip(gs, ws, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hyper", HYPERS)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
def test_triton_bf16_params_fp32_state(interpret, shapes, hyper: dict) -> None:
    got = _state(shapes, torch.bfloat16)
    want = clone_all(got)
    grads = randn_list(shapes, torch.bfloat16)
    adamw(got[0], grads, *got[1:], **hyper, kernel="triton", chunk=CHUNK)
    adamw_reference(want[0], grads, *want[1:], **hyper)
    # One step from equal inputs: both compute in fp32 and round once to bf16; a different
    # fp32 op order can flip that rounding by one bf16 ulp (2^-8 relative -> rtol 2^-7).
    torch.testing.assert_close(got[0], want[0], rtol=2**-7, atol=1e-6)
    for gs, ws in zip(got[1:], want[1:], strict=True):  # fp32 state: fp32 tolerance
        for g, w in zip(gs, ws, strict=True):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# The C loop has no maximize; HYPERS[1] with maximize off still varies every other knob.
NATIVE_HYPERS = [HYPERS[0], {**HYPERS[1], "maximize": False}]


@pytest.mark.parametrize("hyper", NATIVE_HYPERS)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_matches_reference(dtype, shapes, hyper: dict) -> None:
    if not _cpu_optim.available():
        pytest.skip(f"the C kernel did not build: {_cpu_optim.load_error()}")
    got = _state(shapes, dtype)
    want = clone_all(got)
    for _ in range(3):
        grads = randn_list(shapes, dtype)
        assert adamw(got[0], grads, *got[1:], **hyper, kernel="native") == "native"
        adamw_reference(want[0], grads, *want[1:], **hyper)
    # Another fp32 op order (see _cpu_optim): a few fp32 ulps on the state; for bf16
    # params a rounding to bf16 may flip by one ulp (2^-8 relative) and carry on.
    p_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], **p_tol)
    for gs, ws in zip(got[1:3], want[1:3], strict=True):
        for g, w in zip(gs, ws, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert [s.item() for s in got[3]] == [3.0] * len(shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_splits_large_tensors_across_threads(dtype) -> None:
    # Chunks of 16384 elements over all tensors (the C loop's ADAMW32_CHUNK): tensors
    # spanning several chunks, exactly one, one more than one, and empty ones between.
    if not _cpu_optim.available():
        pytest.skip(f"the C kernel did not build: {_cpu_optim.load_error()}")
    shapes = [(70000,), (0,), (5,), (16384,), (3, 16385), (0, 4)]
    got = _state(shapes, dtype)
    want = clone_all(got)
    for _ in range(2):
        grads = randn_list(shapes, dtype)
        adamw(got[0], grads, *got[1:], **HYPERS[0], kernel="native")
        adamw_reference(want[0], grads, *want[1:], **HYPERS[0])
    p_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], **p_tol)
    for gs, ws in zip(got[1:3], want[1:3], strict=True):
        torch.testing.assert_close(gs, ws, rtol=1e-4, atol=1e-6)


def test_native_refuses_maximize() -> None:
    got = _state(SHAPE_SETS["one_small"], torch.float32)
    with pytest.raises(KernelUnavailable, match="native"):
        adamw(got[0], randn_list(SHAPE_SETS["one_small"], torch.float32), *got[1:],
              **HYPERS[1], kernel="native")


def test_forcing_triton_on_cpu_without_interpreter_raises(monkeypatch) -> None:
    monkeypatch.setattr(_triton_util, "INTERPRET", False)
    got = _state(SHAPE_SETS["one_small"], torch.float32)
    with pytest.raises(KernelUnavailable, match="TRITON_INTERPRET=1"):
        adamw(got[0], randn_list(SHAPE_SETS["one_small"], torch.float32), *got[1:],
              **HYPERS[0], kernel="triton")


def test_bf16_refuses_torch_paths() -> None:
    got = _state(SHAPE_SETS["one_small"], torch.bfloat16)
    with pytest.raises(KernelUnavailable, match="torch_fused"):
        adamw(got[0], randn_list(SHAPE_SETS["one_small"], torch.bfloat16), *got[1:],
              **HYPERS[0], kernel="torch_fused")


def test_auto_measures_once_and_caches() -> None:
    _dispatch.clear_cache()
    got = _state(SHAPE_SETS["mixed"], torch.float32)
    want = clone_all(got)
    grads = randn_list(SHAPE_SETS["mixed"], torch.float32)
    name = adamw(got[0], grads, *got[1:], **HYPERS[0], kernel="auto")
    adamw_reference(want[0], grads, *want[1:], **HYPERS[0])
    # the interpreter never competes
    assert name in ("torch_fused", "native", "reference")
    assert _dispatch.cached_choice("adamw", torch.device("cpu"), torch.float32) == name
    assert set(_dispatch.TIMINGS[("adamw", "cpu", torch.float32)]) >= {"reference", "torch_fused"}
    # Measuring ran on scratch copies: the real tensors took exactly one step.
    for gs, ws in zip(got, want, strict=True):
        for g, w in zip(gs, ws, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_auto_rules_out_a_candidate_that_raises() -> None:
    # A path that cannot run on these tensors must lose the choice, not fail the step.
    _dispatch.clear_cache()

    def broken(lists) -> None:
        raise RuntimeError("no kernel for this layout")

    got = _state(SHAPE_SETS["one_small"], torch.float32)
    want = clone_all(got)
    grads = randn_list(SHAPE_SETS["one_small"], torch.float32)

    def reference(lists) -> None:
        adamw_reference(*lists, **HYPERS[0])

    with pytest.warns(RuntimeWarning, match="'broken' failed its check.*no kernel"):
        name = _dispatch.run("adamw_test", "auto", {"reference": reference, "broken": broken},
                             [got[0], grads, *got[1:]],
                             kernels=("auto", "reference", "broken"))
    assert name == "reference"
    assert set(_dispatch.TIMINGS[("adamw_test", "cpu", torch.float32)]) == {"reference"}
    adamw_reference(want[0], grads, *want[1:], **HYPERS[0])
    for gs, ws in zip(got, want, strict=True):
        for g, w in zip(gs, ws, strict=True):
            torch.testing.assert_close(g, w)
    _dispatch.clear_cache()
