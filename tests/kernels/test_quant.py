"""Block-wise int8 quantization with error feedback: every path against the reference,
the reference against its error bound, and feedback against the sum of its inputs."""

from __future__ import annotations

import os

# tests/kernels/conftest.py sets this too; kept so the file also runs on its own. Never
# overrides an explicit setting.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from autoscale.kernels import quant


def _block_scales(scales: torch.Tensor, n: int, block: int) -> torch.Tensor:
    return scales.repeat_interleave(block)[:n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "block"), [(1000, 256), (4096, 256), (77, 64), (5000, 2048)])
def test_reference_error_bound(n, block, dtype) -> None:
    x = (torch.randn(n) * torch.logspace(-3, 1, n)).to(dtype)
    q, s = quant.quantize_blockwise(x, block, kernel="reference")
    assert q.dtype == torch.int8 and q.shape == (n,) and s.shape == (-(-n // block),)
    err = (quant.dequantize_blockwise(q, s, block) - x.float()).abs()
    # Round to nearest: |x - q*scale| <= scale/2, plus fp32 rounding of y = x*127/absmax
    # (up to 127 * 2**-24 ~ 8e-6 of a level; bf16 inputs hit exact .5 ties).
    assert (err <= _block_scales(s, n, block) * (0.5 + 2e-5)).all()
    assert q.abs().max() == 127  # the block max maps to the top code


def _check(kernel: str, sizes: list[int], dtype: torch.dtype, block: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for n in sizes:  # several tensors of different shapes through the same path
        g = (torch.randn(n, generator=gen) * 3).to(dtype)
        r0 = torch.randn(n, generator=gen) * 0.01
        r_out, r_ref = r0.clone(), r0.clone()
        q_out, s_out = quant.quantize_with_feedback(g, r_out, block, kernel=kernel)
        q_ref, s_ref = quant.quantize_with_feedback_reference(g, r_ref, block)
        # Codes: off by one level at most where x*127/absmax is within fp32 noise of a
        # .5 tie (paths order fp32 ops differently); scales: fp32 rounding only.
        diff = (q_out.int() - q_ref.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
        torch.testing.assert_close(s_out, s_ref, rtol=1e-6, atol=0.0)
        # Whatever the codes, each path must account for x exactly: deq(q) + r == x
        # (1e-6 relative to the block scale: fp32 rounding of x - q*scale).
        x = g.float() + r0
        recon = quant.dequantize_blockwise(q_out, s_out, block) + r_out
        torch.testing.assert_close(recon, x, rtol=0.0, atol=1e-6 * s_ref.max().item())
        assert (r_out.abs() <= _block_scales(s_out, n, block) * (0.5 + 2e-5)).all()
        # Without feedback too.
        q2, _ = quant.quantize_blockwise(g, block, kernel=kernel)
        q2_ref, _ = quant.quantize_blockwise(g, block, kernel="reference")
        assert (q2.int() - q2_ref.int()).abs().max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [64, 256])
def test_triton_matches_reference(interpret, block, dtype) -> None:
    _check("triton", [1000, 2 * block, 7], dtype, block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_matches_reference(dtype) -> None:
    if quant._get_compiled("feedback") is None:
        pytest.skip("torch.compile is unavailable on this host")
    _check("compiled", [5 * 256 + 3, 4096, 100], dtype, 256)


@pytest.mark.parametrize("kernel", ["reference", "compiled"])
def test_feedback_tracks_sum_of_inputs(kernel) -> None:
    # EF invariant: sum(sent) = sum(grads) - residual, and |residual| <= scale/2, so the
    # running sums never drift apart however many steps. Gradients with a heavy tail
    # per block make plain rounding lose most small entries every step.
    n, block, steps = 2000, 256, 200
    gen = torch.Generator().manual_seed(0)
    residual = torch.zeros(n)
    sent = torch.zeros(n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        g = torch.randn(n, generator=gen) * torch.rand(n, generator=gen).pow(8)
        q, s = quant.quantize_with_feedback(g, residual, block, kernel=kernel)
        sent += quant.dequantize_blockwise(q, s, block).double()
        total += g.double()
    drift = (total - sent).abs()
    # Bounded by the last residual (<= scale/2, scale = absmax/127 <= 4/127 here), plus
    # fp32 rounding of 200 residual updates; without feedback the drift grows ~ sqrt(steps).
    torch.testing.assert_close(drift, residual.abs().double(), rtol=0.0, atol=1e-4)
    assert drift.max() < 0.05


def test_bad_residual_is_refused() -> None:
    with pytest.raises(ValueError, match="residual must be"):
        quant.quantize_with_feedback(torch.zeros(10), torch.zeros(10, dtype=torch.float16), 4)


@pytest.mark.parametrize("feedback", [True, False], ids=["feedback", "plain"])
@pytest.mark.parametrize("kernel", ["reference", "compiled", "triton"])
def test_overflowed_blocks_send_nan_and_keep_their_residual(kernel, feedback, request) -> None:
    # A loss-scaled step that overflowed: an inf in block 0, a NaN in block 2 and one in
    # the trailing partial block. The overflow must reach the loss scaler (those blocks
    # dequantize to NaN: Triton's max had dropped a NaN and sent a finite block), and
    # error feedback must not absorb it (the residual had become NaN for good).
    if kernel == "triton":
        request.getfixturevalue("interpret")
    if kernel == "compiled" and quant._get_compiled("feedback") is None:
        pytest.skip("torch.compile is unavailable on this host")
    block, n = 256, 4 * 256 + 100
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(n, generator=gen)
    grad[5], grad[600], grad[n - 3] = float("inf"), float("nan"), float("nan")
    residual = torch.randn(n, generator=gen) * 1e-2 if feedback else None
    before = residual.clone() if feedback else None
    q, s = quant.quantize_with_feedback(grad, residual, block, kernel=kernel)
    sent = quant.dequantize_blockwise(q, s, block)
    bad, good = [0, 2, 4], [1, 3]
    assert torch.isnan(s[bad]).all() and torch.isfinite(s[good]).all()
    for b in bad:
        part = slice(b * block, min((b + 1) * block, n))
        assert (q[part] == 0).all() and torch.isnan(sent[part]).all()
        if feedback:
            assert torch.equal(residual[part], before[part])
    for b in good:  # untouched by the overflow next door
        part = slice(b * block, (b + 1) * block)
        want = grad[part] + (before[part] if feedback else 0.0)
        assert (sent[part] - want).abs().max() <= s[b] / 2 + 1e-6
        if feedback:
            torch.testing.assert_close(residual[part], want - sent[part], rtol=0, atol=1e-6)


def test_small_and_large_inputs_choose_their_path_apart() -> None:
    """Note: [the quantize path is chosen per size class]: a choice made on small tensors
    is not the one a gradient bucket runs."""
    from autoscale.kernels import _dispatch

    _dispatch.clear_cache()
    cpu = torch.device("cpu")
    small = torch.randn(1000)
    quant.quantize_with_feedback(small, torch.zeros_like(small))
    assert _dispatch.cached_choice("quantize_with_feedback/small", cpu, torch.float32)
    assert _dispatch.cached_choice("quantize_with_feedback/large", cpu, torch.float32) is None
    large = torch.randn(1 << 16)
    quant.quantize_with_feedback(large, torch.zeros_like(large))
    assert _dispatch.cached_choice("quantize_with_feedback/large", cpu, torch.float32)
