"""The dispatcher's agreement check (``kernels._dispatch``): which candidate paths it lets
``kernel="auto"`` measure."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from autoscale.kernels import _cpu_optim, _dispatch
from autoscale.kernels import adamw as adamw_op
from autoscale.kernels import sgd as sgd_op

# The bench's values (bench/bench_optim_cpu.py): GPT-2-like init and small grads.
SHAPES = [(1000, 64), (64,), (3000,), (512, 17)]
ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False)
SGD = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=False,
           maximize=False)


def _params_grads(seed: int, dtype: torch.dtype) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(s, generator=gen) * 0.02).to(dtype) for s in SHAPES]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(dtype) for s in SHAPES]
    return params, grads


def _adamw_lists(seed: int, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    params, grads = _params_grads(seed, dtype)
    return [params, grads, [torch.zeros(s) for s in SHAPES], [torch.zeros(s) for s in SHAPES],
            [torch.tensor(0.0) for _ in SHAPES]]


def _adamw_reference(lists) -> None:
    adamw_op.adamw_reference(*lists, **ADAMW)


def _needs_native() -> None:
    if not _cpu_optim.available():
        pytest.skip(f"the C kernels did not build: {_cpu_optim.load_error()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_check_accepts_native_adamw_on_every_seed(dtype) -> None:
    # The C loop and the reference round to neighbouring bf16 values on ~1 seed in 7 here;
    # the check must accept that on every seed, or "auto" falls back to the reference.
    _needs_native()
    native = partial(adamw_op._adamw_native, **ADAMW)
    refused = [s for s in range(40)
               if not _dispatch._agrees(native, _adamw_reference, _adamw_lists(s, dtype))]
    assert refused == []


@pytest.mark.parametrize("first_step", [True, False], ids=["first", "later"])
def test_check_accepts_native_sgd_on_bf16_params_on_every_seed(first_step) -> None:
    _needs_native()
    hyper = dict(first_step=first_step, **SGD)
    native = partial(sgd_op._sgd_native, **hyper)

    def reference(lists) -> None:
        sgd_op.sgd_reference(*lists, **hyper)

    def lists(seed: int) -> list[list[torch.Tensor]]:
        params, grads = _params_grads(seed, torch.bfloat16)
        gen = torch.Generator().manual_seed(seed + 1000)
        return [params, grads, [torch.randn(s, generator=gen) * 1e-3 for s in SHAPES]]

    assert [s for s in range(40) if not _dispatch._agrees(native, reference, lists(s))] == []


def _off_by(ulps: int):
    """The reference, then every bf16 param moved ``ulps`` rounding steps up."""
    def impl(lists) -> None:
        _adamw_reference(lists)
        for p in lists[0]:
            for _ in range(ulps):
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    return impl


def test_check_takes_one_rounding_step_of_the_param_dtype_and_no_more() -> None:
    lists = _adamw_lists(0, torch.bfloat16)
    assert _dispatch._agrees(_off_by(1), _adamw_reference, lists)
    assert not _dispatch._agrees(_off_by(2), _adamw_reference, lists)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("want", [1.0, 1.5, -0.75], ids=["binade_edge", "mid", "negative"])
def test_close_is_one_step_either_side(dtype, want) -> None:
    # At a binade edge (1.0) the steps below are half those above: one step is the gap to
    # the neighbour on got's side, so two steps down are refused there too.
    w = torch.tensor([want], dtype=dtype)
    for toward in (float("inf"), float("-inf")):
        one = torch.nextafter(w, torch.full_like(w, toward))
        two = torch.nextafter(one, torch.full_like(w, toward))
        assert _dispatch._close(one, w), (dtype, want, toward)
        assert not _dispatch._close(two, w), (dtype, want, toward)


def test_check_refuses_a_bf16_path_with_other_maths() -> None:
    # Twice the learning rate: each param moves by ~lr, many bf16 ulps at |p| ~ 0.02 and
    # more than one wherever |p| is small; the fp32 moments agree, so only p can tell.
    def double_lr(lists) -> None:
        adamw_op.adamw_reference(*lists, **{**ADAMW, "lr": 2 * ADAMW["lr"]})

    assert not _dispatch._agrees(double_lr, _adamw_reference, _adamw_lists(0, torch.bfloat16))


@pytest.mark.parametrize(("got", "want", "close"), [
    (0.0, 0.0, True),
    (1e-7, 0.0, True),  # within atol at zero, where the step to a neighbour is subnormal
    (1e-5, 0.0, False),
    (float("inf"), float("inf"), True),
    (3e38, float("inf"), False),  # a finite value never matches an inf, whatever rtol
    (float("-inf"), float("inf"), False),
    (float("nan"), float("nan"), True),
    (1.0, float("nan"), False),
])
def test_close_handles_zero_and_non_finite_values(got, want, close) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        assert _dispatch._close(torch.tensor([got]).to(dtype),
                                torch.tensor([want]).to(dtype)) is close, dtype
