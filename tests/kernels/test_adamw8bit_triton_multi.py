"""Multi-tensor 8-bit AdamW Triton kernel (under TRITON_INTERPRET=1) against
``adamw8bit_reference`` applied tensor by tensor; one launch for the whole list."""

from __future__ import annotations

import math
import os

# tests/kernels/conftest.py sets this too; kept so the file also runs on its own. Never
# overrides an explicit setting.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from _optim_lists import adamw8bit_state

from autoscale.kernels import _triton_adamw8bit as tm
from autoscale.kernels import adamw8bit as k

HYPER = [
    dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2),
    dict(lr=3e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.0),
]
# Sizes not multiples of the block (1000, 37, 3000), one exact block (256), some 2-D.
SHAPES = [(40, 25), (256,), (37,), (30, 100)]


_state = adamw8bit_state


def _states(shapes: list[tuple[int, ...]], block: int) -> list[list[torch.Tensor]]:
    """Four lists (m_q, m_scale, v_q, v_scale), one entry per shape."""
    per = [_state(math.prod(s), block) for s in shapes]
    return [[st[i] for st in per] for i in range(4)]


def _hyper(hyper: dict, step: int) -> tuple[float, ...]:
    return k._hyper(hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"],
                    hyper["weight_decay"], step)  # fmt: skip


def _assert_codes_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    # As in test_adamw8bit.py: codes may differ by one level where y lands within fp32
    # noise of a rounding boundary; anything more, or on >= 1 % of elements, is a bug.
    diff = (out.int() - ref.int()).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).float().mean().item() < 0.01


def _check_against_reference(shapes: list[tuple[int, ...]], dtype: torch.dtype, block: int,
                             hyper: dict, chunk: int | None, steps: int = 3) -> None:  # fmt: skip
    """Run ``steps`` steps; each from the reference's state, so errors cannot compound."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) * 0.1 for s in shapes]
             for _ in range(steps)]  # fmt: skip
    st = _states(shapes, block)
    for step, gs in enumerate(grads, start=1):
        ps_out = [p.clone() for p in ps]
        st_out = [[t.clone() for t in ts] for ts in st]
        tm.adamw8bit_triton_multi(ps_out, gs, *st_out, _hyper(hyper, step), block, chunk=chunk)
        for i, g in enumerate(gs):
            k.adamw8bit_reference(ps[i], g, *(ts[i] for ts in st), step=step,
                                  block_size=block, **hyper)  # fmt: skip
        for i in range(len(shapes)):
            if dtype == torch.bfloat16:
                # One bf16 ulp: the interpreter casts fp32 -> bf16 by truncation, torch
                # rounds to nearest even.
                torch.testing.assert_close(ps_out[i], ps[i], rtol=2**-7, atol=0.0)
            else:
                torch.testing.assert_close(ps_out[i], ps[i], rtol=1e-5, atol=1e-6)
            _assert_codes_close(st_out[0][i], st[0][i])
            _assert_codes_close(st_out[2][i], st[2][i])
            torch.testing.assert_close(st_out[1][i], st[1][i], rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(st_out[3][i], st[3][i], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("block", "chunk", "hyper"),
    # chunk=512 with block 256: the 3000-element tensor spans 6 chunks, 1000 spans 2.
    [(256, 512, HYPER[0]), (256, None, HYPER[1]), (2048, None, HYPER[0])],
    ids=["b256-chunk512", "b256-default-no_wd", "b2048-default"],
)  # fmt: skip
def test_multi_matches_reference(interpret, block, chunk, hyper, dtype) -> None:
    _check_against_reference(SHAPES, dtype, block, hyper, chunk)


def test_one_launch_covers_all_tensors(interpret, monkeypatch) -> None:
    grids: list[tuple[int, ...]] = []
    real = tm._adamw8bit_multi_kernel

    class Recorder:  # stands in for the jitted kernel: records each grid, then launches
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(tm, "_adamw8bit_multi_kernel", Recorder())
    block, chunk = 256, 512
    ps = [torch.randn(s) for s in SHAPES]
    gs = [torch.randn(s) for s in SHAPES]
    tm.adamw8bit_triton_multi(ps, gs, *_states(SHAPES, block), _hyper(HYPER[0], 1), block,
                              chunk=chunk)  # fmt: skip
    n_chunks = sum(-(-math.prod(s) // chunk) for s in SHAPES)  # 2 + 1 + 1 + 6
    assert grids == [(n_chunks,)]


def test_untouched_past_the_end(interpret) -> None:
    # Param and state as views into larger buffers with sentinels after them: the kernel
    # must write neither past a param's numel nor past its padded state.
    block, n = 256, 300  # two blocks, the second partial
    ns = k.state_numel(n, block)
    pbuf = torch.randn(n + 64)
    pbuf[n:] = 7.0
    mq_buf = torch.zeros(ns + block, dtype=torch.int8)
    vq_buf = torch.zeros(ns + block, dtype=torch.uint8)
    ms_buf, vs_buf = torch.zeros(ns // block + 1), torch.zeros(ns // block + 1)
    mq_buf[ns:], vq_buf[ns:], ms_buf[-1], vs_buf[-1] = 5, 5, 3.0, 3.0
    p, g = pbuf[:n], torch.randn(n)
    st = [mq_buf[:ns], ms_buf[:-1], vq_buf[:ns], vs_buf[:-1]]
    ref_p, ref_st = p.clone(), [t.clone() for t in st]
    tm.adamw8bit_triton_multi([p], [g], *([t] for t in st), _hyper(HYPER[0], 1), block)
    k.adamw8bit_reference(ref_p, g, *ref_st, step=1, block_size=block, **HYPER[0])
    assert (pbuf[n:] == 7.0).all()
    assert (mq_buf[ns:] == 5).all() and (vq_buf[ns:] == 5).all()
    assert ms_buf[-1] == 3.0 and vs_buf[-1] == 3.0
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
    # The padding of the partial block stays zero.
    assert (st[0][n:] == 0).all() and (st[2][n:] == 0).all()


# All-zero blocks: the interpreter evaluates both sides of tl.where(m_max > 0, 1 / m_max, 0)
# in numpy, so 1 / 0 warns although the result is selected away.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_guard_zeroes_m_where_v_is_zero(interpret) -> None:
    # beta1=0 forgets the huge first grad of element 0 in m but not in v: at step 2,
    # element 1 holds its block's m-max while its sqrt(v) is ~1e-6 of the block's max, so
    # v quantizes to 0 and, without the guard, m would quantize to 127 (then m / eps).
    block = 256
    hyper = dict(lr=1e-3, beta1=0.0, beta2=0.999, eps=1e-8, weight_decay=0.0)
    ps = [torch.zeros(300), torch.zeros(40)]
    st = _states([(300,), (40,)], block)
    g1 = [torch.zeros(300), torch.zeros(40)]
    g1[0][0], g1[1][0] = 1e3, 1e3
    g2 = [torch.zeros(300), torch.zeros(40)]
    g2[0][1], g2[1][1] = 1e-3, 1e-3
    for step, gs in enumerate((g1, g2), start=1):
        tm.adamw8bit_triton_multi(ps, gs, *st, _hyper(hyper, step), block)
    for i in range(2):
        assert st[2][i][1] == 0 and st[0][i][1] == 0


def test_strided_param_and_empty_list(interpret) -> None:
    block = 256
    base = torch.randn(30, 20)
    p, ref_p = base.t(), base.t().clone()  # non-contiguous (20, 30)
    g = torch.randn(20, 30)
    st = _state(600, block)
    ref_st = [t.clone() for t in st]
    tm.adamw8bit_triton_multi([p], [g], *([t] for t in st), _hyper(HYPER[0], 1), block)
    k.adamw8bit_reference(ref_p, g, *ref_st, step=1, block_size=block, **HYPER[0])
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
    tm.adamw8bit_triton_multi([], [], [], [], [], [], _hyper(HYPER[0], 1), block)  # no-op


def test_errors(interpret) -> None:
    block = 256
    hp = _hyper(HYPER[0], 1)
    ps = [torch.zeros(300), torch.zeros(40)]
    gs = [torch.zeros(300), torch.zeros(40)]
    st = _states([(300,), (40,)], block)
    with pytest.raises(ValueError, match="power-of-two block_size, got 100"):
        tm.adamw8bit_triton_multi(ps, gs, *st, hp, 100)
    with pytest.raises(ValueError, match="multiple of block_size=256"):
        tm.adamw8bit_triton_multi(ps, gs, *st, hp, block, chunk=384)
    with pytest.raises(ValueError, match="share one dtype"):
        tm.adamw8bit_triton_multi([ps[0], ps[1].bfloat16()], gs, *st, hp, block)
    with pytest.raises(ValueError, match="share one dtype"):
        tm.adamw8bit_triton_multi(ps, [gs[0], gs[1].bfloat16()], *st, hp, block)
    with pytest.raises(ValueError, match="differ in length"):
        tm.adamw8bit_triton_multi(ps, gs[:1], *st, hp, block)
    with pytest.raises(ValueError, match="6 scalars"):
        tm.adamw8bit_triton_multi(ps, gs, *st, hp[:5], block)
    bad = [list(ts) for ts in st]
    bad[0][1] = bad[0][1][:128]  # m_q of the 40-element param: needs 256 codes
    with pytest.raises(ValueError, match="m_q must be"):
        tm.adamw8bit_triton_multi(ps, gs, *bad, hp, block)
