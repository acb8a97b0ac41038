"""One-pass C loops for SGD, LARS and LAMB on the CPU ("native" kernel candidates).

Why: torch's fused CPU kernels exist for SGD and Adam only, and need state in the param
dtype, so bf16 params with fp32 momentum, and LAMB and LARS at any dtype, were left to
chains of foreach or per-tensor ops, each a pass over memory. Measured on the 2-core VM
over 38M params (GPT-like shapes): LAMB foreach 207 ms and LARS foreach 66 ms a step,
against 19 ms for fused AdamW; SGD on bf16 params 94 ms (reference).

Same build and cache as ``_cpu_adamw8bit`` (``kernels._native``, ``-ffast-math``): results
match the references to fp32 rounding, not bit for bit. Params and grads are fp32 or bf16
(one dtype per call), state fp32, everything contiguous. Work is split statically into
chunks of 16K elements over all tensors, so one huge tensor spreads over every thread.

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

from autoscale.kernels import _native

__all__ = ["available", "lamb_phase1", "lamb_phase2", "load_error", "sgd_apply", "sq_norms"]

_NAME = "optim_cpu"

_SOURCE = _native.C_PRELUDE + r"""
#define CHUNK 16384

/* first[t]: index of tensor t's first chunk; first[n]: the chunk count. NULL if out of
   memory (callers then do nothing and report it). */
static int64_t *chunk_index(int64_t n, const int64_t *numel, int64_t *total) {
    int64_t *first = (int64_t *)malloc((size_t)(n + 1) * sizeof(int64_t));
    if (first == NULL) return NULL;
    *total = 0;
    first[0] = 0;
    for (int64_t t = 0; t < n; t++) {
        *total += numel[t];
        first[t + 1] = first[t] + (numel[t] + CHUNK - 1) / CHUNK;
    }
    return first;
}

/* The tensor owning chunk c: the last t with first[t] <= c (empty tensors own none). */
static inline int64_t owner(const int64_t *first, int64_t n, int64_t c) {
    int64_t lo = 0, hi = n;
    while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (first[mid] <= c) lo = mid; else hi = mid;
    }
    return lo;
}

#define FOR_CHUNKS(BODY)                                                                \
    int64_t total;                                                                      \
    int64_t *first = chunk_index(n, numel, &total);                                     \
    if (first == NULL) return -1;                                                       \
    const int64_t nchunks = first[n];                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (total > 65536)") \
    for (int64_t c = 0; c < nchunks; c++) {                                             \
        const int64_t t = owner(first, n, c);                                           \
        const int64_t start = (c - first[t]) * CHUNK;                                   \
        const int64_t len = numel[t] - start < CHUNK ? numel[t] - start : CHUNK;        \
        BODY                                                                            \
    }

/* Room for two partial sums (double) per chunk; NULL if out of memory. */
static double *alloc_parts(int64_t n, const int64_t *numel) {
    int64_t total;
    int64_t *first = chunk_index(n, numel, &total);
    if (first == NULL) return NULL;
    double *part = (double *)malloc((size_t)(first[n] * 2 + 1) * sizeof(double));
    free(first);
    return part;
}

/* Per-chunk partial sums (double) into part[2 * c], then per tensor in chunk order. */
static void sum_parts(int64_t n, const int64_t *first, const double *part, float *out) {
    for (int64_t t = 0; t < n; t++) {
        double a = 0.0, b = 0.0;
        for (int64_t c = first[t]; c < first[t + 1]; c++) {
            a += part[2 * c];
            b += part[2 * c + 1];
        }
        out[2 * t] = (float)a;
        out[2 * t + 1] = (float)b;
    }
}

/* out[t] = (sum a_t^2, sum b_t^2): LARS's norms of p and g. Returns 0, or -1 (no memory). */
#define SQ_BODY(PT, LOAD)                                                               \
    {                                                                                   \
        const PT *A = (const PT *)a[t] + start, *B = (const PT *)b[t] + start;          \
        float sa = 0.0f, sb = 0.0f;                                                     \
        _Pragma("omp simd reduction(+:sa,sb)")                                          \
        for (int64_t i = 0; i < len; i++) {                                             \
            const float x = LOAD(A, i), y = LOAD(B, i);                                 \
            sa += x * x;                                                                \
            sb += y * y;                                                                \
        }                                                                               \
        part[2 * c] = sa;                                                               \
        part[2 * c + 1] = sb;                                                           \
    }

int sq_norms(int64_t n, const int64_t *numel, void **a, void **b, int32_t is_bf16,
             float *out, int32_t nthreads) {
    double *part = alloc_parts(n, numel);
    if (part == NULL) return -1;
    FOR_CHUNKS(if (is_bf16) SQ_BODY(uint16_t, BF16_LOAD) else SQ_BODY(float, F32_LOAD))
    sum_parts(n, first, part, out);
    free(part);
    free(first);
    return 0;
}

/* SGD and LARS's update, torch.optim.SGD's order of operations:
     d = (+-g + wd[t] * p) * scale[t]
     buf = d (first step) or momentum * buf + (1 - dampening) * d
     d = d + momentum * buf (nesterov) or buf
     p = p - lr * d
   scale[t] is LARS's trust ratio (1 for SGD). buf is NULL when momentum == 0. */
#define SGD_BODY(PT, LOAD, STORE)                                                       \
    {                                                                                   \
        PT *P = (PT *)p[t] + start;                                                     \
        const PT *G = (const PT *)g[t] + start;                                         \
        float *M = has_buf ? buf[t] + start : NULL;                                     \
        const float w = wd[t], s = scale[t];                                            \
        if (M == NULL) {                                                                \
            _Pragma("omp simd")                                                         \
            for (int64_t i = 0; i < len; i++) {                                         \
                const float pi = LOAD(P, i);                                            \
                const float d = (sign * LOAD(G, i) + w * pi) * s;                       \
                STORE(P, i, pi - lr * d);                                               \
            }                                                                           \
        } else if (first_step) {                                                        \
            _Pragma("omp simd")                                                         \
            for (int64_t i = 0; i < len; i++) {                                         \
                const float pi = LOAD(P, i);                                            \
                const float d = (sign * LOAD(G, i) + w * pi) * s;                       \
                M[i] = d;                                                               \
                STORE(P, i, pi - lr * (nesterov ? d + momentum * d : d));               \
            }                                                                           \
        } else {                                                                        \
            _Pragma("omp simd")                                                         \
            for (int64_t i = 0; i < len; i++) {                                         \
                const float pi = LOAD(P, i);                                            \
                const float d = (sign * LOAD(G, i) + w * pi) * s;                       \
                const float m = momentum * M[i] + (1.0f - dampening) * d;               \
                M[i] = m;                                                               \
                STORE(P, i, pi - lr * (nesterov ? d + momentum * m : m));               \
            }                                                                           \
        }                                                                               \
    }

int sgd_apply(int64_t n, const int64_t *numel, void **p, void **g, float **buf,
              int32_t is_bf16, const float *wd, const float *scale, float lr, float momentum,
              float dampening, int32_t nesterov, int32_t maximize, int32_t first_step,
              int32_t nthreads) {
    const int has_buf = buf != NULL;
    const float sign = maximize ? -1.0f : 1.0f;
    FOR_CHUNKS(if (is_bf16) SGD_BODY(uint16_t, BF16_LOAD, BF16_STORE)
               else SGD_BODY(float, F32_LOAD, F32_STORE))
    free(first);
    return 0;
}

/* LAMB phase 1: m, v updated in place; out[t] = (sum p^2, sum u^2) with
   u = (m / bc1) / (sqrt(v / bc2) + eps) + wd[t] * p. */
#define LAMB1_BODY(PT, LOAD)                                                            \
    {                                                                                   \
        const PT *P = (const PT *)p[t] + start, *G = (const PT *)g[t] + start;          \
        float *M = m[t] + start, *V = v[t] + start;                                     \
        const float i1 = 1.0f / bc1[t], i2 = 1.0f / bc2[t], w = wd[t];                  \
        float sp = 0.0f, su = 0.0f;                                                     \
        _Pragma("omp simd reduction(+:sp,su)")                                          \
        for (int64_t i = 0; i < len; i++) {                                             \
            const float gi = LOAD(G, i), pi = LOAD(P, i);                               \
            const float mi = b1 * M[i] + (1.0f - b1) * gi;                              \
            const float vi = b2 * V[i] + (1.0f - b2) * gi * gi;                         \
            M[i] = mi;                                                                  \
            V[i] = vi;                                                                  \
            const float u = (mi * i1) / (sqrtf(vi * i2) + eps) + w * pi;                \
            sp += pi * pi;                                                              \
            su += u * u;                                                                \
        }                                                                               \
        part[2 * c] = sp;                                                               \
        part[2 * c + 1] = su;                                                           \
    }

int lamb_phase1(int64_t n, const int64_t *numel, void **p, void **g, float **m, float **v,
                int32_t is_bf16, float b1, float b2, float eps, const float *bc1,
                const float *bc2, const float *wd, float *out, int32_t nthreads) {
    double *part = alloc_parts(n, numel);
    if (part == NULL) return -1;
    FOR_CHUNKS(if (is_bf16) LAMB1_BODY(uint16_t, BF16_LOAD) else LAMB1_BODY(float, F32_LOAD))
    sum_parts(n, first, part, out);
    free(part);
    free(first);
    return 0;
}

/* LAMB phase 2: u recomputed from the stored m, v; p = p - scale[t] * u. */
#define LAMB2_BODY(PT, LOAD, STORE)                                                     \
    {                                                                                   \
        PT *P = (PT *)p[t] + start;                                                     \
        const float *M = m[t] + start, *V = v[t] + start;                               \
        const float i1 = 1.0f / bc1[t], i2 = 1.0f / bc2[t], w = wd[t], s = scale[t];    \
        _Pragma("omp simd")                                                             \
        for (int64_t i = 0; i < len; i++) {                                             \
            const float pi = LOAD(P, i);                                                \
            const float u = (M[i] * i1) / (sqrtf(V[i] * i2) + eps) + w * pi;            \
            STORE(P, i, pi - s * u);                                                    \
        }                                                                               \
    }

int lamb_phase2(int64_t n, const int64_t *numel, void **p, float **m, float **v,
                int32_t is_bf16, float eps, const float *bc1, const float *bc2,
                const float *wd, const float *scale, int32_t nthreads) {
    FOR_CHUNKS(if (is_bf16) LAMB2_BODY(uint16_t, BF16_LOAD, BF16_STORE)
               else LAMB2_BODY(float, F32_LOAD, F32_STORE))
    free(first);
    return 0;
}
"""

_lib: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        lib = _native.load(_NAME, _SOURCE)
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
        for fn in (lib.sq_norms, lib.sgd_apply, lib.lamb_phase1, lib.lamb_phase2):
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


def _common(params: Sequence[torch.Tensor]) -> tuple[int, ctypes.Array, int]:
    if _load() is None:
        raise RuntimeError(f"the CPU optimizer C library is unavailable: {load_error()}")
    n = len(params)
    return n, (ctypes.c_int64 * n)(*[p.numel() for p in params]), int(
        params[0].dtype == torch.bfloat16)


def _check_rc(rc: int) -> None:
    if rc != 0:
        raise MemoryError("the CPU optimizer C loop could not allocate its chunk tables.")


def sq_norms(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """(len(a), 2) fp32: per tensor, the sums of squares of ``a[t]`` and ``b[t]``
    (same sizes, same dtype; see :func:`takes`)."""
    n, numel, is_bf16 = _common(a)
    out = torch.zeros(n, 2, dtype=torch.float32)
    _check_rc(_lib.sq_norms(n, numel, _ptrs(a), _ptrs(b), is_bf16,
                            ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_float)),
                            torch.get_num_threads()))  # fmt: skip
    return out


def sgd_apply(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              bufs: Sequence[torch.Tensor] | None, *, wd: Sequence[float],
              scale: Sequence[float], lr: float, momentum: float, dampening: float,
              nesterov: bool, maximize: bool, first_step: bool) -> None:  # fmt: skip
    """SGD's (``scale`` = 1) or LARS's (``scale`` = trust ratios) update in place, in
    torch.optim.SGD's order of operations; ``bufs`` None when momentum is 0."""
    n, numel, is_bf16 = _common(params)
    buf_arr = _ptrs(bufs) if bufs is not None else None
    _check_rc(_lib.sgd_apply(n, numel, _ptrs(params), _ptrs(grads), buf_arr, is_bf16,
                             _floats(wd), _floats(scale), lr, momentum, dampening,
                             int(nesterov), int(maximize), int(first_step),
                             torch.get_num_threads()))  # fmt: skip


def lamb_phase1(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
                beta1: float, beta2: float, eps: float, bc1: Sequence[float],
                bc2: Sequence[float], wd: Sequence[float]) -> torch.Tensor:  # fmt: skip
    """LAMB's moment update in place; returns (len(params), 2) fp32 sums of p^2 and u^2."""
    n, numel, is_bf16 = _common(params)
    out = torch.zeros(n, 2, dtype=torch.float32)
    _check_rc(_lib.lamb_phase1(n, numel, _ptrs(params), _ptrs(grads), _ptrs(exp_avgs),
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
    n, numel, is_bf16 = _common(params)
    _check_rc(_lib.lamb_phase2(n, numel, _ptrs(params), _ptrs(exp_avgs), _ptrs(exp_avg_sqs),
                               is_bf16, eps, _floats(bc1), _floats(bc2), _floats(wd),
                               _floats(scale), torch.get_num_threads()))  # fmt: skip
