"""The CPU path of 8-bit AdamW ("native"): one C loop (``csrc/adamw8bit.c``) over all
parameters, one pass over memory. Needed by CPUs with a C compiler (gcc or clang with
OpenMP): measured 0.7x of torch's fused fp32 AdamW step, where the compiled path takes 2x.

Same maths and state layout as ``autoscale.kernels.adamw8bit`` (see its module note for
the quantization maps). Per block of ``block_size`` elements, pass 1 reads p, g and the
two code bytes, does the fp32 AdamW update, writes p and keeps the new m and a root of
v (sqrt(v), or v^1/4 on the AVX-512 path) in a per-thread stack buffer while taking
their block maxima; pass 2 requantizes from that buffer (in L1) and writes the codes
and scales. DRAM traffic is therefore 16 bytes per fp32 parameter (10 read, 6 written),
against 28 for fp32 AdamW.

On the AVX-512 path the two passes are software-pipelined across blocks: pass 1 of
block b runs before pass 2 of block b - 1, so the serial chain between them (block
maxima, scale maths: ~60 cycles) overlaps independent work; 6 % fewer cycles per element
at block_size 256 on Zen 4. Pass 1 also prefetches p and g two blocks ahead with the
non-temporal hint (into L1, kept out of L2/L3): on the 2-vCPU Zen 4 host this kernel was
tuned on, the step is then ~8 % faster when DRAM is fast (2 % when it is slow), measured
against torch's fused AdamW in the same process; T0 hints at the same distance, NTA
hints farther ahead, and prefetching the code bytes too gave nothing or made it slower.

All tensors of one call share a dtype (fp32 or bf16 params, grads alike); each OpenMP
thread takes a contiguous range of each tensor's blocks (schedule(static)'s split) with
no barrier between tensors, so one call covers every parameter (the multi-tensor idea
of the Triton kernels, for the CPU).
bf16 results are rounded to nearest even, as torch's ``.to(torch.bfloat16)``. Non-finite
values follow Note: [non-finite gradients] (``kernels/__init__.py``): a block whose new
moments hold an inf or NaN gets codes 0 and NaN scales, as in the reference.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from autoscale.errors import KernelUnavailable

from ._native import BoundState, load
from ._native import load_error as _load_error

__all__ = ["MAX_BLOCK", "available", "load_error", "run_bound", "step", "step_bound"]

_NAME = "adamw8bit"
MAX_BLOCK = 4096  # csrc/adamw8bit.c's stack buffers per thread: 2 pairs of 4096 fp32 = 64 KiB

_fn = None


def _load():  # -> ctypes function | None
    global _fn
    if _fn is None:
        lib = load(_NAME)
        if lib is None:
            return None
        ptrs = ctypes.POINTER(ctypes.c_void_p)
        fn = lib.adamw8bit_step
        fn.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ptrs, ptrs, ptrs, ptrs,
                       ptrs, ptrs, ctypes.c_int32, ctypes.c_int64,
                       ctypes.POINTER(ctypes.c_float), ctypes.c_int32]  # fmt: skip
        fn.restype = None
        _fn = fn
    return _fn


def available() -> bool:
    """True when the C kernel builds and loads on this host."""
    return _load() is not None


def load_error() -> str | None:
    """Why the C kernel is unavailable, or None."""
    return _load_error(_NAME)


def step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    m_q: Sequence[torch.Tensor],
    m_scale: Sequence[torch.Tensor],
    v_q: Sequence[torch.Tensor],
    v_scale: Sequence[torch.Tensor],
    hyper: tuple[float, ...],
    block_size: int,
) -> None:
    """One 8-bit AdamW step in place over all ``params`` in one call.

    Invariants: CPU tensors; params and grads contiguous and of one dtype (fp32 or bf16),
    checked here; the state laid out as ``_adamw8bit_layout.check`` requires, which the
    caller (``adamw8bit``) checks; ``block_size <= MAX_BLOCK``. ``hyper`` is the tuple of
    ``_adamw8bit_layout.hyper``.
    """
    if params:
        bound = BoundState([p.numel() for p in params], m_q, m_scale, v_q, v_scale)
        if not step_bound(bound, params, grads, hyper, block_size):
            raise ValueError(BAD_PARAMS)


BAD_PARAMS = ("the C kernel needs contiguous CPU params and grads of one dtype (fp32 or "
              "bf16), of the sizes their state was made for.")  # fmt: skip


def step_bound(
    state: BoundState,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    hyper: tuple[float, ...],
    block_size: int,
) -> bool:
    """:func:`step` with the state bound (``BoundState(numels, m_q, m_scale, v_q, v_scale)``,
    its layout checked by the caller when binding). Returns False, having done nothing,
    if params or grads do not fit (see :meth:`BoundState.params`)."""
    arrays = state.params(params, grads)
    if arrays is None:
        return False
    run_bound(state, arrays, hyper, block_size)
    return True


def run_bound(
    state: BoundState,
    arrays: tuple[ctypes.Array, ctypes.Array, int],
    hyper: tuple[float, ...],
    block_size: int,
) -> None:
    """The kernel call of :func:`step_bound`, on ``arrays`` that ``state.params`` returned
    for these very params and grads (so a caller can check every bucket before it runs
    any)."""
    fn = _load()
    if fn is None:
        raise KernelUnavailable(f"the 8-bit AdamW C kernel is unavailable ({load_error()}); "
                                "install gcc, or use kernel='auto'.")
    if block_size > MAX_BLOCK:
        raise ValueError(f"block_size {block_size} > {MAX_BLOCK}, the C kernel's limit.")
    p_arr, g_arr, is_bf16 = arrays
    fn(len(p_arr), state.n_arr, p_arr, g_arr, *state.arrays, is_bf16, block_size,
       (ctypes.c_float * 6)(*hyper), torch.get_num_threads())  # fmt: skip
