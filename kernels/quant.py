"""Block-wise int8 quantization for gradient compression, with error feedback fused in.

Layout: a tensor of n elements is cut into nb = ceil(n / block_size) blocks of its
flattened order; q is int8 (n,), scales is fp32 (nb,). Per block, with
scale = absmax / 127:

    q = clamp(round(x / scale), -127, 127)      (round half away from zero)
    dequantize(q) = q * scale                   so |x - dequantize(q)| <= scale / 2

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD"): the part of the
gradient lost to rounding is carried to the next step, x = grad + residual,
residual <- x - dequantize(q). The sum of what was sent then differs from the sum of the
gradients by exactly the current residual, which stays within scale / 2 per element.
:func:`quantize_with_feedback` does that in one pass over memory.

Rounding is floor(|y| + 0.5) with the sign copied back, and y = x * (127 / absmax), so
the reference, the compiled CPU path and the Triton kernel agree up to fp32 noise in y.

A block holding an inf or NaN (a loss-scaled fp16/bf16 step that overflowed) gets q = 0
and scale = NaN, so it dequantizes to NaN and the overflow reaches the loss scaler, which
skips the step; its residual is left as it was, since error feedback would otherwise
carry the NaN into every later step (Note: [non-finite gradients] in ``kernels/__init__.py``).

Paths (``kernel=``), and the machines that need them:
  "triton":    CUDA GPUs (one program per block).
  "compiled":  CPUs (inductor fuses the spec into one loop, Note: [compiled quantize]).
  "reference": the spec, and CPUs where torch.compile does not work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from autoscale.errors import KernelUnavailable

from . import _dispatch
from ._triton_util import HAS_TRITON, on_device, tuning_configs

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "KERNELS",
    "dequantize_blockwise",
    "quantize_blockwise",
    "quantize_with_feedback",
    "quantize_with_feedback_reference",
]

#: The ``kernel=`` names the quantization ops accept; "auto" chooses.
KERNELS: tuple[str, ...] = ("auto", "triton", "compiled", "reference")


if HAS_TRITON:

    def _configs() -> list[triton.Config]:
        # One program per quantization block; only the warp count is free.
        return tuning_configs([triton.Config({}, num_warps=w) for w in (4, 1, 2, 8)])

    @triton.autotune(
        configs=_configs(),
        key=["BLOCK_SIZE"],
        restore_value=["r_ptr"],  # the residual is updated in place
    )
    @triton.jit
    def _quantize_kernel(
        x_ptr, r_ptr, q_ptr, s_ptr, n_elements,
        BLOCK_SIZE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0).to(tl.int64)  # int64: tensors past 2**31 elements
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_elements
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + offs, mask=mask, other=0.0)
            x += r
        # Counted, not taken from the max: tl.max may drop a NaN.
        n_bad = tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=0)
        finite = n_bad == 0
        absmax = tl.max(tl.where(x == x, tl.abs(x), 0.0), axis=0)
        inv = tl.where(finite & (absmax > 0), 127.0 / absmax, 0.0)
        y = tl.minimum(tl.floor(tl.where(finite, tl.abs(x), 0.0) * inv + 0.5), 127.0)
        y = tl.where(x < 0, -y, y)
        tl.store(q_ptr + offs, y.to(tl.int8), mask=mask)
        scale = tl.where(finite, absmax * (1.0 / 127.0), float("nan"))
        tl.store(s_ptr + pid, scale)
        if HAS_RESIDUAL:
            tl.store(r_ptr + offs, tl.where(finite, x - y * scale, r), mask=mask)


def _quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nb, B) fp32 -> (levels as fp32 (nb, B), scales (nb, 1), finite (nb, 1) bool).

    The maths of the spec; a block with a non-finite value gets levels 0 and scale NaN.
    """
    finite = torch.isfinite(x).all(dim=1, keepdim=True)
    ax = torch.where(finite, x.abs(), 0.0)
    absmax = ax.amax(dim=1, keepdim=True)
    inv = torch.where(absmax > 0, 127.0 / absmax, 0.0)
    y = torch.copysign(torch.floor(ax * inv + 0.5).clamp(max=127.0), x)
    return y, torch.where(finite, absmax * (1.0 / 127.0), torch.nan), finite


def _padded_blocks(t: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Flat copy of ``t`` in ``dtype``, zero-padded to whole blocks, as (nb, B)."""
    n = t.numel()
    nb = -(-n // block_size)
    out = torch.zeros(nb * block_size, dtype=dtype, device=t.device)
    out[:n] = t.reshape(-1)
    return out.view(nb, block_size)


def _check(grad: torch.Tensor, residual: torch.Tensor | None, block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if not grad.is_floating_point():
        raise ValueError(f"grad must be a floating tensor, got {grad.dtype}.")
    if residual is not None and (
        residual.dtype != torch.float32 or residual.shape != grad.shape
        or not residual.is_contiguous()
    ):  # fmt: skip
        raise ValueError(
            f"residual must be a contiguous fp32 tensor shaped like grad {tuple(grad.shape)}, "
            f"got {residual.dtype} {tuple(residual.shape)}; create it with "
            "torch.zeros_like(grad, dtype=torch.float32)."
        )


def quantize_with_feedback_reference(
    grad: torch.Tensor, residual: torch.Tensor | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec: quantize x = grad + residual per block; residual <- x - dequantize(q).

    Returns (q int8 (n,), scales fp32 (nb,)). ``residual`` (fp32, grad's shape) is
    updated in place; with ``residual=None`` this is plain block-wise quantization.
    Invariant: |residual| <= scales / 2 element-wise (per block) after the call.
    """
    _check(grad, residual, block_size)
    n = grad.numel()
    x = _padded_blocks(grad, block_size, torch.float32)
    if residual is not None:
        r = _padded_blocks(residual, block_size, torch.float32)
        x += r
    y, scale, finite = _quantize_blocks(x)
    if residual is not None:
        new = torch.where(finite, x - y * scale, r)
        residual.copy_(new.reshape(-1)[:n].view_as(residual))
    return y.to(torch.int8).reshape(-1)[:n], scale.squeeze(1)


def dequantize_blockwise(
    q: torch.Tensor, scales: torch.Tensor, block_size: int, shape: torch.Size | None = None
) -> torch.Tensor:
    """q * scale per block, fp32, shaped ``shape`` (default: flat). One fused op."""
    n = q.numel()
    nb = scales.numel()
    if nb != -(-n // block_size):
        raise ValueError(
            f"{nb} scales do not match {n} codes with block_size={block_size}; pass the "
            "block_size used to quantize."
        )
    qp = _padded_blocks(q, block_size, torch.float32)
    out = (qp * scales.unsqueeze(1)).reshape(-1)[:n]
    return out.view(shape) if shape is not None else out


# Note: [compiled quantize]
# Eager torch runs the spec as ~10 passes over memory. torch.compile (inductor C++ on
# CPU) fuses it into one loop over blocks: read grad and residual, reduce absmax, write
# q, scales and the residual (each block's second sweep hits L1). As in
# kernels/adamw8bit.py the block count is dynamic so every tensor shape shares a graph.
def _feedback_blocks(x: torch.Tensor, r: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    xf = x.float() + r
    y, scale, finite = _quantize_blocks(xf)
    q.copy_(y.to(torch.int8))
    s.copy_(scale.squeeze(1))
    r.copy_(torch.where(finite, xf - y * scale, r))


def _plain_blocks(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    y, scale, _ = _quantize_blocks(x.float())
    q.copy_(y.to(torch.int8))
    s.copy_(scale.squeeze(1))


_compiled: dict[str, Callable[..., None] | None] = {}


def _get_compiled(name: str) -> Callable[..., None] | None:
    if name not in _compiled:
        fn = _feedback_blocks if name == "feedback" else _plain_blocks
        try:
            _compiled[name] = torch.compile(
                fn, fullgraph=True, options={"cpp.dynamic_threads": True}
            )
        except Exception:  # no working compiler on this host: use the reference
            _compiled[name] = None
    return _compiled[name]


# Every path writes (q, s), preallocated by quantize_with_feedback, given the lists
# [grad, residual, q, s] (with feedback) or [grad, q, s] (without), one tensor each.
Lists = Sequence[Sequence[torch.Tensor]]


def _unpack(lists: Lists) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    if len(lists) == 4:
        return lists[0][0], lists[1][0], lists[2][0], lists[3][0]
    return lists[0][0], None, lists[1][0], lists[2][0]


def _run_reference(lists: Lists, *, block_size: int) -> None:
    grad, residual, q, s = _unpack(lists)
    q_ref, s_ref = quantize_with_feedback_reference(grad, residual, block_size)
    q.copy_(q_ref)
    s.copy_(s_ref)


def _run_compiled(lists: Lists, *, block_size: int) -> None:
    grad, residual, q_out, s = _unpack(lists)
    n = grad.numel()
    nb = -(-n // block_size)
    full = n // block_size
    fn = _get_compiled("feedback" if residual is not None else "plain")
    if fn is None:
        raise KernelUnavailable("quantize: torch.compile is unavailable; use kernel='auto'.")
    # Dynamo guards on storage offsets: a view at a new offset (a DDP bucket slice) would
    # recompile per offset, so such inputs go through a copy at offset 0.
    g = grad.view(-1)
    g = g if g.storage_offset() == 0 else g.clone()
    q = torch.empty(nb * block_size, dtype=torch.int8)
    r = None
    if residual is not None:
        r = residual.view(-1) if residual.storage_offset() == 0 else residual.view(-1).clone()
    if full:
        args = [g[: full * block_size].view(full, block_size)]
        if r is not None:
            args.append(r[: full * block_size].view(full, block_size))
        args += [q[: full * block_size].view(full, block_size), s[:full]]
        for t in args:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        fn(*args)
    if nb > full:  # trailing partial block, through the reference maths
        tail = slice(full * block_size, n)
        rt = r[tail].clone() if r is not None else None
        qt, st = quantize_with_feedback_reference(g[tail], rt, block_size)
        q[tail] = qt
        s[full:] = st
        if r is not None and rt is not None:
            r[tail] = rt
    if residual is not None and r is not None and r.data_ptr() != residual.data_ptr():
        residual.view(-1).copy_(r)
    q_out.copy_(q[:n])


def _run_triton(lists: Lists, *, block_size: int) -> None:
    grad, residual, q, s = _unpack(lists)
    if block_size & (block_size - 1):
        raise KernelUnavailable(f"quantize: the Triton kernel needs a power-of-two block_size, "
                                f"got {block_size}; use kernel='auto'.")
    # Without a residual the kernel never reads r_ptr; pass grad as a placeholder.
    r = residual if residual is not None else grad
    with on_device(grad.device):
        _quantize_kernel[(s.numel(),)](grad, r, q, s, grad.numel(), BLOCK_SIZE=block_size,
                                       HAS_RESIDUAL=residual is not None)  # fmt: skip


def _codes_agree(impl: Callable[[Lists], None], reference: Callable[[Lists], None],
                 lists: Lists, *, block_size: int) -> bool:  # fmt: skip
    """On clones of the first 16 blocks: codes within one level (fp32 noise at a .5 tie)
    on < 1 % of elements; scales and residuals within fp32 rounding, NaN where the
    reference's are."""
    nb = min(lists[-1][0].numel(), 16)
    k = min(lists[0][0].numel(), nb * block_size)
    head = [[ts[0][:nb] if i == len(lists) - 1 else ts[0][:k]] for i, ts in enumerate(lists)]
    got = [[t.clone() for t in ts] for ts in head]
    want = [[t.clone() for t in ts] for ts in head]
    reference(want)
    impl(got)
    (_, r_got, q_got, s_got), (_, r_want, q_want, s_want) = _unpack(got), _unpack(want)
    diff = (q_got.int() - q_want.int()).abs()
    codes_ok = diff.numel() == 0 or (
        diff.max().item() <= 1 and (diff > 0).sum().item() <= max(0.01 * diff.numel(), 16))
    close = partial(torch.allclose, rtol=1e-5, atol=1e-6, equal_nan=True)
    return codes_ok and close(s_got, s_want) and (r_got is None or r_want is None
                                                  or close(r_got, r_want, atol=1e-5))


_LARGE = 1 << 16  # elements: Note: [the quantize path is chosen per size class]


def quantize_with_feedback(
    grad: torch.Tensor,
    residual: torch.Tensor | None,
    block_size: int = 256,
    *,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher for :func:`quantize_with_feedback_reference` (same contract).

    ``kernel``: one of :data:`KERNELS` (paths in the module docstring). "auto": Triton on
    CUDA, else the fastest path that agrees with the reference, measured once per process
    (``kernels._dispatch``). Raises ValueError for bad arguments, KernelUnavailable when a
    forced path cannot run here.
    """
    _check(grad, residual, block_size)
    if kernel not in KERNELS:
        raise ValueError(f"quantize: kernel={kernel!r} is not one of {KERNELS}.")
    n = grad.numel()
    q = torch.empty(n, dtype=torch.int8, device=grad.device)
    s = torch.empty(-(-n // block_size), dtype=torch.float32, device=grad.device)
    if n == 0:
        return q, s
    bind: dict[str, Any] = dict(block_size=block_size)
    impls: dict[str, Callable[[Lists], None]] = {"reference": partial(_run_reference, **bind)}
    why: dict[str, str] = {}
    if HAS_TRITON:
        impls["triton"] = partial(_run_triton, **bind)
    else:
        why["triton"] = "kernel='triton' needs the triton package"
    if grad.device.type != "cpu":
        why["compiled"] = f"a CPU path; got {grad.device.type} tensors"
    elif _get_compiled("feedback" if residual is not None else "plain") is None:
        why["compiled"] = "torch.compile is unavailable"
    else:
        impls["compiled"] = partial(_run_compiled, **bind)
    flat = grad.reshape(-1)
    if residual is None:
        op, lists = "quantize", [[flat], [q], [s]]
    else:
        op, lists = "quantize_with_feedback", [[flat], [residual.view(-1)], [q], [s]]
    # Note: [the quantize path is chosen per size class]
    # Which path is fastest depends on the size (on a few thousand elements eager torch's
    # passes beat the compiled loop's call overhead; on a bucket of millions the compiled
    # loop wins), and the paths hold different temporaries. One choice per process, made on
    # whatever size came first, let a process that first quantized small tensors run a
    # gradient bucket on the eager path, and the cost model's probe of the codec's memory
    # (autoscale/cost/_cost.py) measure another path than the training job ran (87.19 MB
    # against 74.51 on the mlp's 2-rank ddp int8). So small and large inputs choose apart.
    op += "/large" if n >= _LARGE else "/small"
    _dispatch.run(op, kernel, impls, lists, kernels=KERNELS,
                  agrees=partial(_codes_agree, **bind),
                  why_not=why)
    return q, s


def quantize_blockwise(
    x: torch.Tensor, block_size: int = 256, *, kernel: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise int8 quantization without feedback: (q int8 (n,), scales fp32 (nb,)).

    Invariant: |x - dequantize_blockwise(q, scales, block_size)| <= scales / 2 per block.
    """
    return quantize_with_feedback(x, None, block_size, kernel=kernel)
