"""Multi-tensor 8-bit AdamW: one Triton launch steps every parameter of a list.

The "triton" path of ``kernels.adamw8bit``, needed by CUDA GPUs. Same maths, state layout,
quantization maps, rounding and non-finite rule as
:func:`autoscale.kernels.adamw8bit.adamw8bit_reference` (the spec). Per
parameter of n elements and nb = ceil(n / block_size) blocks, the state is

  m_q (nb * block_size,) int8,  m_scale (nb,) fp32,
  v_q (nb * block_size,) uint8, v_scale (nb,) fp32,

with the padding past n kept at zero.

Design. The chunk table (Note: [multi-tensor launch] in ``_triton_util``) is built from the
(params, grads) lists only, because ``tensor_table`` needs equal numels per tensor across
lists and the padded codes and per-block scales have other lengths. ``chunk`` is a multiple
of ``block_size``, so every chunk starts on a quantization-block boundary: element offsets
of p, g and the codes then coincide, and a block's scale sits at offset // block_size. The
four state lists travel as one extra (4, n_tensors) int64 address table. Each program loops
over the quantization blocks of its chunk, up to the tensor's end, so blocks past the end
are never touched; the trailing partial block masks p and g and writes its whole padded
code block (zeros, as the reference does). One launch per call, whatever the
number of tensors: the launch overhead of one kernel per parameter is what this removes.

The kernel is not autotuned (see ``_num_warps``): the step is in place and the state hides
behind the extra address table, which ``RESTORE_HOOKS`` does not know about, so a
benchmarked config would advance the real state several times.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from ._adamw8bit_layout import check as _check
from ._triton_util import DEFAULT_CHUNK, HAS_TRITON, launch, require_triton, tensor_table, tl_dtype

__all__ = ["adamw8bit_triton_multi"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _adamw8bit_multi_kernel(
        addrs_ptr, numels_ptr, chunk_tensor_ptr, chunk_start_ptr, n_tensors,
        state_addrs_ptr, beta1, beta2, eps, decay, step_size, inv_bc2_sqrt,
        CHUNK: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):  # fmt: skip
        c = tl.program_id(0)
        t = tl.load(chunk_tensor_ptr + c)
        start = tl.load(chunk_start_ptr + c)  # int64, a multiple of BLOCK_SIZE
        numel = tl.load(numels_ptr + t)
        end = tl.minimum(start + CHUNK, numel)
        # Rows of the chunk table's addrs: 0 params, 1 grads; of state_addrs: 0 m_q,
        # 1 m_scale, 2 v_q, 3 v_scale (see _state_addrs).
        p_ptr = tl.load(addrs_ptr + t).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(addrs_ptr + n_tensors + t).to(tl.pointer_type(P_DTYPE))
        mq_ptr = tl.load(state_addrs_ptr + t).to(tl.pointer_type(tl.int8))
        ms_ptr = tl.load(state_addrs_ptr + n_tensors + t).to(tl.pointer_type(tl.float32))
        vq_ptr = tl.load(state_addrs_ptr + 2 * n_tensors + t).to(tl.pointer_type(tl.uint8))
        vs_ptr = tl.load(state_addrs_ptr + 3 * n_tensors + t).to(tl.pointer_type(tl.float32))
        # One iteration per quantization block; the loop stops at the tensor's end, so a
        # block starting at or past numel is never read or written.
        for off in range(start, end, BLOCK_SIZE):
            blk = off // BLOCK_SIZE  # int64 like off: tensors past 2**31 elements
            offs = off + tl.arange(0, BLOCK_SIZE)
            mask = offs < numel
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            # Codes are padded to whole blocks: no mask needed.
            um = tl.load(mq_ptr + offs).to(tl.float32) * (1.0 / 127.0)
            uv = tl.load(vq_ptr + offs).to(tl.float32) * (1.0 / 255.0)
            m = um * tl.abs(um) * tl.load(ms_ptr + blk)
            sv_old = uv * uv * tl.load(vs_ptr + blk)

            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * (sv_old * sv_old) + (1.0 - beta2) * g * g
            sv = tl.sqrt(v)
            p = p * decay - step_size * m / (sv * inv_bc2_sqrt + eps)
            tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)

            # A block with an inf or NaN moment: codes 0, scales NaN (Note: [non-finite
            # gradients]). Counted, not read from the maxima: tl.max may drop a NaN.
            inf = float("inf")
            n_bad = tl.sum(((m != m) | (tl.abs(m) == inf) | (sv != sv) | (sv == inf))
                           .to(tl.int32), axis=0)  # fmt: skip
            ok = n_bad == 0
            m_max = tl.max(tl.abs(m), axis=0)
            sv_max = tl.max(sv, axis=0)
            m_inv = tl.where(ok & (m_max > 0), 1.0 / m_max, 0.0)
            sv_inv = tl.where(ok & (sv_max > 0), 1.0 / sv_max, 0.0)
            yv = tl.minimum(tl.floor(tl.sqrt(tl.where(ok, sv, 0.0) * sv_inv) * 255.0 + 0.5),
                            255.0)  # fmt: skip
            ym = tl.minimum(tl.floor(tl.sqrt(tl.where(ok, tl.abs(m), 0.0) * m_inv) * 127.0
                                     + 0.5), 127.0)  # fmt: skip
            ym = tl.where(m < 0, -ym, ym)
            ym = tl.where(yv == 0.0, 0.0, ym)  # guard: no m where v is 0 (adamw8bit note)
            tl.store(mq_ptr + offs, ym.to(tl.int8))
            tl.store(vq_ptr + offs, yv.to(tl.uint8))
            tl.store(ms_ptr + blk, tl.where(ok, m_max, float("nan")))
            tl.store(vs_ptr + blk, tl.where(ok, sv_max, float("nan")))


# The state address table costs host work and a host-to-device copy per build; a training
# loop passes the same state tensors every step, so keep the last few. The key is the
# addresses themselves, so a hit is always the right table (even if a tensor was freed and
# another allocated at the same address: the table holds only addresses).
_STATE_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_STATE_CACHE_SIZE = 16


def _state_addrs(lists: Sequence[Sequence[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """(len(lists), n_tensors) int64 base addresses on ``device``, cached by address."""
    ptrs = tuple(tuple(t.data_ptr() for t in ts) for ts in lists)
    key = (str(device), ptrs)
    hit = _STATE_TABLES.get(key)
    if hit is not None:
        _STATE_TABLES.move_to_end(key)
        return hit
    table = torch.tensor(ptrs, dtype=torch.int64, device=device)
    _STATE_TABLES[key] = table
    if len(_STATE_TABLES) > _STATE_CACHE_SIZE:
        _STATE_TABLES.popitem(last=False)
    return table


def _num_warps(block_size: int) -> int:
    """Warps per program: a fixed function of the block, no autotuning (module docstring).

    One program reduces one quantization block at a time (two block maxima per block), so
    more warps than ~16 elements per thread buys nothing but cross-warp reductions through
    shared memory: 1 warp for 256-element blocks, 4 for 2048, capped at 8. Not measured on
    a GPU; a choice by element count per thread.
    """
    return max(1, min(8, block_size // 512))


def _default_chunk(block_size: int) -> int:
    """The largest multiple of ``block_size`` not above DEFAULT_CHUNK (at least one block)."""
    return max(block_size, DEFAULT_CHUNK // block_size * block_size)


def adamw8bit_triton_multi(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    m_q: Sequence[torch.Tensor],
    m_scale: Sequence[torch.Tensor],
    v_q: Sequence[torch.Tensor],
    v_scale: Sequence[torch.Tensor],
    hyper: tuple[float, ...],
    block_size: int,
    *,
    chunk: int | None = None,
) -> None:
    """One 8-bit AdamW step in place over every tensor of the lists, in one Triton launch.

    ``hyper`` is the 6-tuple of ``_adamw8bit_layout.hyper`` (beta1, beta2, eps, 1 - lr*wd,
    lr/bc1, 1/sqrt(bc2)), shared by all tensors. Params (and grads, same dtype) are fp32 or
    bf16 on one device; the state of each follows the layout in the module docstring.
    ``chunk`` (elements per program, a multiple of ``block_size``) defaults to the largest
    such multiple not above ``DEFAULT_CHUNK``.

    Raises ValueError for a non power-of-two block_size, a bad chunk, mixed dtypes or
    devices, list length mismatches or a bad state layout; KernelUnavailable (from
    ``require_triton``) when Triton cannot run on the params' device.
    """
    lists = (params, grads, m_q, m_scale, v_q, v_scale)
    names = ("params", "grads", "m_q", "m_scale", "v_q", "v_scale")
    lengths = [len(ts) for ts in lists]
    if len(set(lengths)) != 1:
        raise ValueError(
            "adamw8bit_triton_multi: lists "
            + ", ".join(f"{n}={k}" for n, k in zip(names, lengths, strict=True))
            + " differ in length; pass one entry per parameter in every list."
        )
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(
            f"adamw8bit_triton_multi: Triton needs a power-of-two block_size, got {block_size}."
        )
    if len(hyper) != 6:
        raise ValueError(
            "adamw8bit_triton_multi: hyper must be the 6 scalars of _adamw8bit_layout.hyper "
            f"(beta1, beta2, eps, decay, step_size, inv_bc2_sqrt), got {len(hyper)}."
        )
    if not params:
        return
    if chunk is None:
        chunk = _default_chunk(block_size)
    elif chunk < block_size or chunk % block_size:
        raise ValueError(
            f"adamw8bit_triton_multi: chunk must be a positive multiple of block_size="
            f"{block_size} (chunks must start on quantization-block boundaries), got {chunk}."
        )
    dtype, device = params[0].dtype, params[0].device
    mixed = sorted({str(t.dtype) for t in (*params, *grads)})
    if len(mixed) > 1:
        raise ValueError(
            f"adamw8bit_triton_multi: params and grads must share one dtype, got {mixed}; "
            "step each dtype group with its own call."
        )
    if any(t.device != device for ts in lists for t in ts):
        raise ValueError(
            "adamw8bit_triton_multi: all tensors must be on one device (the params' "
            f"{device}); the kernel reads them through one address table."
        )
    require_triton(device, "adamw8bit")
    p_dtype = tl_dtype(dtype)
    # Per-tensor layout checks (shapes, state dtypes and padded lengths, contiguity) are the
    # reference path's; step=1 only satisfies its step argument, unused here.
    for p, g, mq, ms, vq, vs in zip(*lists, strict=True):
        _check(p, g, mq, ms, vq, vs, block_size, 1)
    # The kernel addresses memory linearly: step contiguous copies of strided params and
    # write them back after.
    work = [p if p.is_contiguous() else p.contiguous() for p in params]
    gs = [g.contiguous() for g in grads]
    table = tensor_table([work, gs], chunk=chunk)
    if table.n_chunks == 0:  # every param is empty: nothing to step, and no grid of 0
        return
    state = _state_addrs([m_q, m_scale, v_q, v_scale], device)
    launch(
        _adamw8bit_multi_kernel, table, state, *(float(h) for h in hyper),
        written=(0,), P_DTYPE=p_dtype, BLOCK_SIZE=block_size,
        num_warps=_num_warps(block_size),
    )  # fmt: skip
    for p, w in zip(params, work, strict=True):
        if w is not p:
            p.copy_(w)
