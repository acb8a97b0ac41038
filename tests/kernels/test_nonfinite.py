"""Note: [non-finite gradients] (kernels/__init__.py), on every path of every optimizer op.

Each op steps twice, first with grads holding a NaN, a +inf and a -inf, then with clean
grads. The reference's non-finite elements are pinned to the policy (what depends on a
bad element turns non-finite, and stays so), and every other path must put its
non-finite values exactly where the reference does, with its finite values close.
(Quantization: test_quant.py::test_overflowed_blocks_send_nan_and_keep_their_residual.)
"""

from __future__ import annotations

import pytest
import torch
from _optim_lists import CHUNK, adamw8bit_state

from autoscale.kernels import _cpu_adamw8bit, _cpu_optim
from autoscale.kernels import adamw8bit as k8
from autoscale.kernels.adamw import adamw
from autoscale.kernels.lamb import lamb
from autoscale.kernels.lars import lars
from autoscale.kernels.sgd import sgd

# Tensor 0 (adapted by LAMB/LARS) gets a NaN, tensor 1 a +inf, tensor 2 (1-D: excluded by
# LAMB/LARS) a -inf; tensor 3 stays clean.
SHAPES = [(4, 8), (3, 5), (7,), (6, 2)]
BAD = {0: (1, float("nan")), 1: (7, float("inf")), 2: (4, float("-inf"))}  # flat index, value
EXCLUDED = [len(s) == 1 for s in SHAPES]
# The Triton interpreter runs on numpy, which warns on the NaN arithmetic these tests want.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
TORCH_PATHS = ("foreach", "torch_fused")  # state in the param dtype: fp32 params only


def _grads(dtype: torch.dtype, *, bad: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3 if bad else 4)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    if bad:
        for i, (j, value) in BAD.items():
            grads[i].view(-1)[j] = value
    return [g.to(dtype) for g in grads]


def _bad_mask(i: int) -> torch.Tensor:
    mask = torch.zeros(SHAPES[i], dtype=torch.bool)
    if i in BAD:
        mask.view(-1)[BAD[i][0]] = True
    return mask


def _skip_unless_available(kernel: str, dtype: torch.dtype, ops: tuple[str, ...],
                           request) -> None:  # fmt: skip
    if kernel == "triton":
        request.getfixturevalue("interpret")
    if kernel in TORCH_PATHS and dtype != torch.float32:
        pytest.skip("torch's fused/foreach paths keep state in the param dtype: fp32 only here")
    if kernel == "torch_fused" and "torch_fused" not in ops:
        pytest.skip("this op has no torch fused path")
    if kernel == "native" and not _cpu_optim.available():
        pytest.skip(f"the C library did not build: {_cpu_optim.load_error()}")


def _assert_same_nonfinite(got: list[torch.Tensor], want: list[torch.Tensor],
                           dtype: torch.dtype) -> None:  # fmt: skip
    for g, w in zip(got, want, strict=True):
        g32, w32 = g.float(), w.float()
        assert torch.equal(torch.isfinite(g32), torch.isfinite(w32))
        fin = torch.isfinite(w32)
        # Finite values: fp32 op-order noise; for bf16 params one bf16 ulp (2^-7 relative)
        # per step, since the Triton interpreter casts to bf16 by truncation and torch
        # rounds to nearest, which fp32 state inherits through weight decay and the trust
        # ratio (values near 0: atol). Two steps: 2^-5 leaves room; a wrong update is ~100 %.
        tol = dict(rtol=2**-5, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g32[fin], w32[fin], **tol)


# (op, its paths, a function (kernel, dtype) -> the tensor lists after two steps, which
# lists are elementwise state)
def _run_adamw(kernel: str, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    lists = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES],
             [torch.zeros(s) for s in SHAPES], [torch.zeros(s) for s in SHAPES]]  # fmt: skip
    steps = [torch.tensor(0.0) for _ in SHAPES]
    for bad in (True, False):
        adamw(lists[0], _grads(dtype, bad=bad), lists[1], lists[2], steps, lr=1e-2, beta1=0.9,
              beta2=0.999, eps=1e-8, weight_decay=1e-2, kernel=kernel, chunk=CHUNK)  # fmt: skip
    return lists


def _run_sgd(kernel: str, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    lists = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES],
             [torch.zeros(s) for s in SHAPES]]  # fmt: skip
    for first, bad in ((True, True), (False, False)):
        sgd(lists[0], _grads(dtype, bad=bad), lists[1], first_step=first, lr=0.1, momentum=0.9,
            weight_decay=1e-2, kernel=kernel, chunk=CHUNK)  # fmt: skip
    return lists


def _run_lamb(kernel: str, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    lists = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES],
             [torch.zeros(s) for s in SHAPES], [torch.zeros(s) for s in SHAPES]]  # fmt: skip
    steps = [torch.tensor(0.0) for _ in SHAPES]
    for bad in (True, False):
        lamb(lists[0], _grads(dtype, bad=bad), lists[1], lists[2], steps, EXCLUDED, lr=1e-2,
             beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=1e-2, kernel=kernel,
             chunk=CHUNK)  # fmt: skip
    return lists


def _run_lars(kernel: str, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    lists = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES],
             [torch.zeros(s) for s in SHAPES]]  # fmt: skip
    for first, bad in ((True, True), (False, False)):
        lars(lists[0], _grads(dtype, bad=bad), lists[1], EXCLUDED, first_step=first, lr=0.1,
             momentum=0.9, weight_decay=1e-3, eta=0.02, kernel=kernel, chunk=CHUNK)  # fmt: skip
    return lists


def _elementwise(i: int) -> torch.Tensor:
    return _bad_mask(i)


def _whole_if_adapted(i: int) -> torch.Tensor:
    # An adapted tensor's trust ratio depends on all of it: NaN once a norm is NaN, and
    # then the whole tensor is. LAMB: u is NaN at an inf grad (inf / inf), so ||u|| is NaN
    # at step 1. LARS: an inf grad gives ||g|| = inf and ratio 0 (finite / inf), so step 1
    # turns only that element NaN (0 * inf), and step 2's ||p|| is NaN. The excluded
    # tensor (ratio 1) stays elementwise.
    return torch.ones(SHAPES[i], dtype=torch.bool) if i in (0, 1) else _bad_mask(i)


OPS = {
    # op: (paths, run, expected non-finite mask of each list, per tensor)
    "adamw": (("reference", "torch_fused", "native", "triton"), _run_adamw,
              [_elementwise, _elementwise, _elementwise]),
    "sgd": (("reference", "torch_fused", "native", "triton"), _run_sgd,
            [_elementwise, _elementwise]),
    "lamb": (("reference", "foreach", "native", "triton"), _run_lamb,
             [_whole_if_adapted, _elementwise, _elementwise]),
    "lars": (("reference", "foreach", "native", "triton"), _run_lars,
             [_whole_if_adapted, _whole_if_adapted]),
}  # fmt: skip
CASES = [(op, kernel) for op, (paths, _, _) in OPS.items() for kernel in paths]


@DTYPES
@pytest.mark.parametrize("op", OPS)
def test_reference_follows_the_policy(op: str, dtype: torch.dtype) -> None:
    _, run, expected = OPS[op]
    lists = run("reference", dtype)
    for ts, mask_of in zip(lists, expected, strict=True):
        for i, t in enumerate(ts):
            assert torch.equal(~torch.isfinite(t.float()), mask_of(i)), (op, i)


@DTYPES
@pytest.mark.parametrize(("op", "kernel"), [c for c in CASES if c[1] != "reference"])
def test_every_path_puts_nonfinite_where_the_reference_does(op: str, kernel: str,
                                                            dtype: torch.dtype, request) -> None:
    paths, run, _ = OPS[op]
    _skip_unless_available(kernel, dtype, paths, request)
    got, want = run(kernel, dtype), run("reference", dtype)
    for gs, ws in zip(got, want, strict=True):
        _assert_same_nonfinite(gs, ws, dtype)


# 8-bit AdamW: 600 elements are two whole 256-blocks (the C kernel's AVX-512 path, where
# the CPU has it) and a partial one (its generic path); 100 elements one partial block.
SIZES_8BIT = [600, 100, 300]
BAD_8BIT = {(0, 10): float("nan"), (0, 300): float("inf"), (1, 50): float("nan")}
BAD_BLOCKS = {0: [0, 1], 1: [0]}  # tensor -> its blocks holding a bad element
BLOCK = 256


def _run_adamw8bit(kernel: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], list]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(dtype) for n in SIZES_8BIT]
    states = [adamw8bit_state(n, BLOCK) for n in SIZES_8BIT]
    for step in (1, 2):
        grads = [torch.randn(n, generator=gen) * 0.1 for n in SIZES_8BIT]
        if step == 1:
            for (i, j), value in BAD_8BIT.items():
                grads[i][j] = value
        k8.adamw8bit_multi(params, [g.to(dtype) for g in grads],
                           *[[st[k] for st in states] for k in range(4)], lr=1e-3, beta1=0.9,
                           beta2=0.999, eps=1e-8, weight_decay=1e-2, step=step,
                           block_size=BLOCK, kernel=kernel)  # fmt: skip
    return params, states


def test_adamw8bit_reference_follows_the_policy() -> None:
    params, states = _run_adamw8bit("reference", torch.float32)
    for i, (p, (mq, ms, vq, vs)) in enumerate(zip(params, states, strict=True)):
        bad_blocks = BAD_BLOCKS.get(i, [])
        # After the clean second step: the whole block of a bad element is NaN in p (its
        # state dequantizes to NaN), everything else finite.
        want = torch.zeros(p.numel(), dtype=torch.bool)
        for b in bad_blocks:
            want[b * BLOCK:(b + 1) * BLOCK] = True
        assert torch.equal(~torch.isfinite(p), want), i
        for scale in (ms, vs):
            assert torch.isnan(scale[bad_blocks]).all()
            good = [b for b in range(scale.numel()) if b not in bad_blocks]
            assert torch.isfinite(scale[good]).all()
        for codes in (mq, vq):
            for b in bad_blocks:
                assert (codes[b * BLOCK:(b + 1) * BLOCK] == 0).all()


@pytest.mark.parametrize("kernel", ["native", "compiled", "triton"])
@DTYPES
def test_adamw8bit_paths_put_nonfinite_where_the_reference_does(kernel: str, dtype: torch.dtype,
                                                                request) -> None:
    if kernel == "triton":
        request.getfixturevalue("interpret")
    if kernel == "native" and not _cpu_adamw8bit.available():
        pytest.skip(f"the C kernel did not build: {_cpu_adamw8bit.load_error()}")
    if kernel == "compiled" and k8._get_compiled() is None:
        pytest.skip("torch.compile is unavailable on this host")
    got_p, got_st = _run_adamw8bit(kernel, dtype)
    want_p, want_st = _run_adamw8bit("reference", dtype)
    for gp, wp in zip(got_p, want_p, strict=True):
        assert torch.equal(torch.isfinite(gp), torch.isfinite(wp))
    for i, (gs, ws) in enumerate(zip(got_st, want_st, strict=True)):
        for k in (1, 3):  # scales: NaN where the reference's are
            assert torch.equal(torch.isnan(gs[k]), torch.isnan(ws[k])), (i, k)
        for b in BAD_BLOCKS.get(i, []):
            for k in (0, 2):
                assert (gs[k][b * BLOCK:(b + 1) * BLOCK] == 0).all(), (i, k, b)
