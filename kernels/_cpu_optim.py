"""One-pass C loops (``csrc/optim.c``) for AdamW with fp32 moments, SGD, LARS and LAMB on
the CPU: the "native" kernel candidates, needed by CPUs with a C compiler.

Why: torch's fused CPU kernels exist for SGD and Adam only, and need state in the param
dtype, so bf16 params with fp32 state, and LAMB and LARS at any dtype, had only chains of
foreach or per-tensor ops, each a pass over memory. Measured on the 2-core VM over 38M
params (GPT-like shapes): LAMB foreach 207 ms and LARS foreach 66 ms a step, against 19
ms for fused AdamW; SGD on bf16 params 94 ms (reference), AdamW on bf16 params 163 ms
(reference) against 15 ms here. AdamW8bit's small tensors (biases, norms) take
:func:`adamw32_step` too: one parallel region for all of them, where torch's fused kernel
opens one per tensor (~4 us each: ~0.4 ms for the ~100 small tensors of a transformer).

Built and cached by ``kernels._native`` (Note: [C kernel flags]): IEEE arithmetic, so
inf and NaN propagate as in the references (Note: [non-finite gradients]); results match
the references to fp32 rounding, not bit for bit. Params and grads are fp32 or bf16 (one
dtype per call), state fp32, everything contiguous. Work is split statically into chunks
of 16K elements over all tensors, so one huge tensor spreads over every thread.

Two-phase optimizers (Note: [two-phase per-tensor norms] in ``kernels.lamb``): the
first call returns per-tensor sums of squares, reduced deterministically (per-chunk
partial sums in double, added per tensor in chunk order after the parallel loop); the
caller forms trust ratios (and, for DTensor params, sums the shards' norms) between
the two calls.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from autoscale.errors import KernelUnavailable

from . import _native
from ._native import BoundState

__all__ = [
    "BAD_PARAMS", "adamw32_bound", "adamw32_step", "available", "lamb_phase1", "lamb_phase2",
    "load_error", "run_adamw32_bound", "sgd_apply", "sq_norms", "takes",
]  # fmt: skip

_NAME = "optim"

_lib: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        lib = _native.load(_NAME)
        if lib is None:
            return None
        i64, i32, f32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_float
        ptrs, floats = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_float)
        n64 = ctypes.POINTER(ctypes.c_int64)
        lib.sq_norms.argtypes = [i64, n64, ptrs, ptrs, i32, floats, i32]
        lib.sgd_apply.argtypes = [i64, n64, ptrs, ptrs, ptrs, i32, floats, floats, f32, f32,
                                  f32, i32, i32, i32, i32]  # fmt: skip
        lib.lamb_phase1.argtypes = [i64, n64, ptrs, ptrs, ptrs, ptrs, i32, f32, f32, f32,
                                    floats, floats, floats, floats, i32]  # fmt: skip
        lib.lamb_phase2.argtypes = [i64, n64, ptrs, ptrs, ptrs, i32, f32, floats, floats,
                                    floats, floats, i32]  # fmt: skip
        lib.adamw32_step.argtypes = [i64, n64, ptrs, ptrs, ptrs, ptrs, i32, floats, floats,
                                     floats, i32]  # fmt: skip
        for fn in (lib.sq_norms, lib.sgd_apply, lib.lamb_phase1, lib.lamb_phase2,
                   lib.adamw32_step):
            fn.restype = ctypes.c_int
        _lib = lib
    return _lib


def available() -> bool:
    """True when the C library builds and loads on this host."""
    return _load() is not None


def load_error() -> str | None:
    """Why the C library is unavailable, or None."""
    return _native.load_error(_NAME)


def takes(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
          states: Sequence[Sequence[torch.Tensor]] = ()) -> bool:  # fmt: skip
    """True if the C loops can step these: CPU, params and grads all fp32 or all bf16,
    state lists fp32, and the library loads. Layout is not checked: the loops run through
    ``kernels._dispatch.run``, which hands every path contiguous local tensors."""
    if not params or params[0].device.type != "cpu":
        return False
    dtype = params[0].dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    ok = all(t.dtype == dtype for ts in (params, grads) for t in ts)
    ok = ok and all(t.dtype == torch.float32 for ts in states for t in ts)
    return ok and available()


def _ptrs(ts: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def _floats(values: Sequence[float]) -> ctypes.Array:
    return (ctypes.c_float * len(values))(*values)


def _lib_or_raise() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise KernelUnavailable(f"the CPU optimizer C library is unavailable ({load_error()}); "
                                "install gcc, or use kernel='auto'.")
    return lib


def _common(params: Sequence[torch.Tensor]) -> tuple[ctypes.CDLL, int, ctypes.Array, int]:
    lib = _lib_or_raise()
    n = len(params)
    return lib, n, (ctypes.c_int64 * n)(*[p.numel() for p in params]), int(
        params[0].dtype == torch.bfloat16)


def _check_rc(rc: int) -> None:
    if rc != 0:
        raise MemoryError("the CPU optimizer C loop could not allocate its chunk tables.")


def sq_norms(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """(len(a), 2) fp32: per tensor, the sums of squares of ``a[t]`` and ``b[t]``
    (same sizes, same dtype; see :func:`takes`)."""
    lib, n, numel, is_bf16 = _common(a)
    out = torch.zeros(n, 2, dtype=torch.float32)
    _check_rc(lib.sq_norms(n, numel, _ptrs(a), _ptrs(b), is_bf16,
                            ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_float)),
                            torch.get_num_threads()))  # fmt: skip
    return out


def sgd_apply(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              bufs: Sequence[torch.Tensor] | None, *, wd: Sequence[float],
              scale: Sequence[float], lr: float, momentum: float, dampening: float,
              nesterov: bool, maximize: bool, first_step: bool) -> None:  # fmt: skip
    """SGD's (``scale`` = 1) or LARS's (``scale`` = trust ratios) update in place, in
    torch.optim.SGD's order of operations; ``bufs`` None when momentum is 0."""
    lib, n, numel, is_bf16 = _common(params)
    buf_arr = _ptrs(bufs) if bufs is not None else None
    _check_rc(lib.sgd_apply(n, numel, _ptrs(params), _ptrs(grads), buf_arr, is_bf16,
                             _floats(wd), _floats(scale), lr, momentum, dampening,
                             int(nesterov), int(maximize), int(first_step),
                             torch.get_num_threads()))  # fmt: skip


def lamb_phase1(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                beta1: float, beta2: float, eps: float, bc1: Sequence[float],
                bc2: Sequence[float], wd: Sequence[float]) -> torch.Tensor:  # fmt: skip
    """LAMB's moment update in place; returns (len(params), 2) fp32 sums of p^2 and u^2."""
    lib, n, numel, is_bf16 = _common(params)
    out = torch.zeros(n, 2, dtype=torch.float32)
    _check_rc(lib.lamb_phase1(n, numel, _ptrs(params), _ptrs(grads), _ptrs(exp_avgs),
                               _ptrs(exp_avg_sqs), is_bf16, beta1, beta2, eps, _floats(bc1),
                               _floats(bc2), _floats(wd),
                               ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_float)),
                               torch.get_num_threads()))  # fmt: skip
    return out


def lamb_phase2(params: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                exp_avg_sqs: Sequence[torch.Tensor], *, eps: float, bc1: Sequence[float],
                bc2: Sequence[float], wd: Sequence[float],
                scale: Sequence[float]) -> None:  # fmt: skip
    """LAMB's update p -= scale[t] * u, u recomputed from the stored moments."""
    lib, n, numel, is_bf16 = _common(params)
    _check_rc(lib.lamb_phase2(n, numel, _ptrs(params), _ptrs(exp_avgs), _ptrs(exp_avg_sqs),
                               is_bf16, eps, _floats(bc1), _floats(bc2), _floats(wd),
                               _floats(scale), torch.get_num_threads()))  # fmt: skip


def adamw32_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """torch.optim.AdamW's step, in place, for tensors that keep fp32 moments, in one call
    (AdamW's "native" path and AdamW8bit's small tensors). ``steps`` are the 1-based
    counts after this step.

    Params and grads: CPU, contiguous, all fp32 or all bf16; moments: contiguous fp32.
    Matches ``kernels.adamw.adamw_reference`` to fp32 rounding (another op order), not bit
    for bit.
    """
    for p, m, v in zip(params, exp_avgs, exp_avg_sqs, strict=True):
        if (m.dtype != torch.float32 or v.dtype != torch.float32 or not m.is_contiguous()
                or not v.is_contiguous() or not (m.numel() == v.numel() == p.numel())):  # fmt: skip
            raise ValueError("adamw32_step needs contiguous fp32 moments of the params' sizes.")
    if params:
        bound = BoundState([p.numel() for p in params], exp_avgs, exp_avg_sqs)
        if not adamw32_bound(bound, params, grads, steps, lr=lr, beta1=beta1, beta2=beta2,
                             eps=eps, weight_decay=weight_decay):  # fmt: skip
            raise ValueError(BAD_PARAMS)


BAD_PARAMS = ("the C loop needs contiguous CPU params and grads of one dtype (fp32 or bf16), "
              "of the sizes their state was made for.")  # fmt: skip


def adamw32_bound(
    state: BoundState,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> bool:
    """:func:`adamw32_step` with the state bound (``BoundState(numels, exp_avgs,
    exp_avg_sqs)``, contiguous fp32 moments of the params' sizes, checked when binding).
    Returns False, having done nothing, if params or grads do not fit."""
    arrays = state.params(params, grads)
    if arrays is None:
        return False
    run_adamw32_bound(state, arrays, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay)  # fmt: skip
    return True


def run_adamw32_bound(
    state: BoundState,
    arrays: tuple[ctypes.Array, ctypes.Array, int],
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The kernel call of :func:`adamw32_bound`, on ``arrays`` from ``state.params``."""
    lib = _lib_or_raise()
    p_arr, g_arr, is_bf16 = arrays
    floats = ctypes.c_float * len(p_arr)
    _check_rc(lib.adamw32_step(
        len(p_arr), state.n_arr, p_arr, g_arr, *state.arrays, is_bf16,
        (ctypes.c_float * 4)(beta1, beta2, eps, 1.0 - lr * weight_decay),
        floats(*[lr / (1.0 - beta1**t) for t in steps]),
        floats(*[(1.0 - beta2**t) ** -0.5 for t in steps]), torch.get_num_threads(),
    ))  # fmt: skip
