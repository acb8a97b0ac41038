"""The CPU path of 8-bit AdamW: one C loop over all parameters, one pass over memory.

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
bf16 results are rounded to nearest even, as torch's ``.to(torch.bfloat16)``.
"""

from __future__ import annotations

import ctypes
import operator
from collections.abc import Sequence

import torch

from autoscale.kernels import _native

__all__ = [
    "BoundState", "adamw32_bound", "adamw32_step", "available", "load_error", "run_adamw32_bound",
    "run_bound", "step", "step_bound",
]  # fmt: skip

_NAME = "adamw8bit_cpu"
MAX_BLOCK = 4096  # stack buffers per thread: 2 pairs of 4096 fp32 = 64 KiB

_SOURCE = _native.C_PRELUDE + r"""
#define MAX_BLOCK 4096

/* Generic block, any length <= block: gcc vectorizes it (-ffast-math gives reciprocal
   estimates refined by one Newton step). PT is the param/grad element type. */
#define BLOCK_BODY(PT, LOAD, STORE)                                                     \
    {                                                                                   \
        PT *P = (PT *)p[t] + off;                                                       \
        const PT *G = (const PT *)g[t] + off;                                           \
        int8_t *QM = mq[t] + off;                                                       \
        uint8_t *QV = vq[t] + off;                                                      \
        float mmax = 0.0f, smax = 0.0f;                                                 \
        /* codes dequantized as q |q| * scale / 127^2: one multiply fewer than the ref */ \
        const float cm = ms[t][b] * (1.0f / 16129.0f), cv = vs[t][b] * (1.0f / 65025.0f); \
        _Pragma("omp simd reduction(max:mmax,smax)")                                    \
        for (int64_t i = 0; i < len; i++) {                                             \
            float gi = LOAD(G, i), pi = LOAD(P, i);                                     \
            float fm = (float)QM[i], fv = (float)QV[i];                                 \
            float m = b1 * (fm * fabsf(fm) * cm) + (1.0f - b1) * gi;                    \
            float s = fv * fv * cv;                                                     \
            float v = b2 * (s * s) + (1.0f - b2) * gi * gi;                             \
            float sv = sqrtf(v);                                                        \
            pi = pi * decay - step_size * m / (sv * ibc2 + eps);                        \
            STORE(P, i, pi);                                                            \
            mbuf[i] = m;                                                                \
            sbuf[i] = sv;                                                               \
            mmax = fmaxf(mmax, fabsf(m));                                               \
            smax = fmaxf(smax, sv);                                                     \
        }                                                                               \
        /* padding past the param's end: zero grad and state, so zero moments */        \
        for (int64_t i = len; i < block; i++) { mbuf[i] = 0.0f; sbuf[i] = 0.0f; }       \
        const float minv = mmax > 0.0f ? 16129.0f / mmax : 0.0f;                        \
        const float sinv = smax > 0.0f ? 65025.0f / smax : 0.0f;                        \
        /* y >= 0, so truncating y + 0.5 is floor(y + 0.5), the reference's rounding */ \
        _Pragma("omp simd")                                                             \
        for (int64_t i = 0; i < block; i++) {                                           \
            float m = mbuf[i];                                                          \
            int32_t yv = (int32_t)(fminf(sqrtf(sbuf[i] * sinv), 255.0f) + 0.5f);        \
            int32_t ym = (int32_t)(fminf(sqrtf(fabsf(m) * minv), 127.0f) + 0.5f);       \
            ym = yv == 0 ? 0 : (m < 0.0f ? -ym : ym); /* guard: no m where v is 0 */    \
            QM[i] = (int8_t)ym;                                                         \
            QV[i] = (uint8_t)yv;                                                        \
        }                                                                               \
        ms[t][b] = mmax;                                                                \
        vs[t][b] = smax;                                                                \
    }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define HAVE_AVX512 1

/* A whole block (block % 16 == 0, step_size > 0) with AVX-512. Compute-bound, not
   memory-bound, on the CPUs measured, so it is written for few vector ops per element:
   - 14-bit reciprocal / reciprocal-sqrt estimates (no Newton step) instead of sqrt and
     division: p moves by < 3e-4 of its update, a code by one level on < 0.5 % of
     elements, far below the state's own quantization error (half a level everywhere);
   - m and v kept in units of (1 - b1) and (1 - b2), step size folded into the divisor;
   - rsqrt14(0) = +inf, so rcp14(rsqrt14(v)) = sqrt(v) and rsqrt14(rsqrt14(v)) = v^1/4
     are exact 0 at 0 with no clamp; the buffer keeps v^1/4, the v code's linear unit;
   - rounding by adding 1.5 * 2^23 (round to nearest, the code in the low byte) instead
     of a float-to-int conversion, which on Zen 4 shares the multiply pipes. */
/* Per-step constants of the AVX-512 path. */
typedef struct {
    float b1, b2, sm, s2, rs2;
    __m512 kden, keps, kdecay;
} Avx512Consts;

/* The new scales of one block and the constants that requantize it in pass 2. */
typedef struct {
    float kminv, kqinv;
} Avx512Scales;

/* Pass 1 of a block: the AdamW update of p; new m and v^1/4 into the buffers. Returns
   the block's max |m| and max v (both in the moments' units) through mx, vx. */
#define DEFINE_PASS1_AVX512(NAME, PT, LOADV, STOREV)                                    \
static inline void NAME(PT *P, const PT *G, const int8_t *QM, const uint8_t *QV,        \
                        float ms_old, float vs_old, int64_t block, const Avx512Consts *k, \
                        float *mbuf, float *sbuf, float *mx, float *vx) {               \
    const __m512 kcm = _mm512_set1_ps(ms_old * (1.0f / 16129.0f) * k->b1 / k->sm);      \
    const __m512 kcv = _mm512_set1_ps(vs_old * vs_old * (1.0f / 65025.0f / 65025.0f)    \
                                      * k->b2 / k->s2);                                 \
    const __m512 kden = k->kden, keps = k->keps, kdecay = k->kdecay;                    \
    __m512 mmax = _mm512_setzero_ps(), vmax = _mm512_setzero_ps();                      \
    for (int64_t i = 0; i < block; i += 16) {                                           \
        __m512 g = LOADV(G, i), p = LOADV(P, i);                                        \
        /* NTA: into L1 only, two blocks ahead (a prefetch never faults, so past the end   \
           of the tensor it is harmless); see the module note */                        \
        _mm_prefetch((const char *)(G + 2 * block + i), _MM_HINT_NTA);                  \
        _mm_prefetch((const char *)(P + 2 * block + i), _MM_HINT_NTA);                  \
        __m512 fm = _mm512_cvtepi32_ps(                                                 \
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(QM + i))));          \
        __m512 fv = _mm512_cvtepi32_ps(                                                 \
            _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(QV + i))));          \
        __m512 m = _mm512_fmadd_ps(_mm512_mul_ps(fm, _mm512_abs_ps(fm)), kcm, g);       \
        __m512 fv2 = _mm512_mul_ps(fv, fv);                                             \
        __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(fv2, fv2), kcv, _mm512_mul_ps(g, g));  \
        __m512 r = _mm512_rsqrt14_ps(v);                                                \
        __m512 rd = _mm512_rcp14_ps(_mm512_fmadd_ps(_mm512_rcp14_ps(r), kden, keps));   \
        STOREV(P, i, _mm512_fnmadd_ps(m, rd, _mm512_mul_ps(p, kdecay)));                \
        _mm512_store_ps(mbuf + i, m);                                                   \
        _mm512_store_ps(sbuf + i, _mm512_rsqrt14_ps(r));                                \
        mmax = _mm512_range_ps(mmax, m, 0x0B); /* max(|mmax|, |m|) */                   \
        vmax = _mm512_max_ps(vmax, v);                                                  \
    }                                                                                   \
    *mx = _mm512_reduce_max_ps(mmax);                                                   \
    *vx = _mm512_reduce_max_ps(vmax);                                                   \
}

/* Between the passes: the block's new scales (stored) and pass 2's constants. */
static inline Avx512Scales scales_avx512(float mx, float vx, const Avx512Consts *k,
                                         float *msp, float *vsp) {
    const float sx = sqrtf(vx);
    Avx512Scales s = {mx > 0.0f ? 16129.0f / mx : 0.0f, sx > 0.0f ? 255.0f / sqrtf(sx) : 0.0f};
    msp[0] = mx * k->sm;
    vsp[0] = sx * k->rs2;
    return s;
}

/* Pass 2 of a block: requantize m and v^1/4 from the buffers (in L1). */
static inline void pass2_avx512(int8_t *QM, uint8_t *QV, int64_t block, Avx512Scales s,
                                const float *mbuf, const float *sbuf) {
    const __m512 kminv = _mm512_set1_ps(s.kminv), kqinv = _mm512_set1_ps(s.kqinv);
    const __m512 tiny = _mm512_set1_ps(1e-30f), magic = _mm512_set1_ps(12582912.0f);
    const __m512i lowbyte = _mm512_set1_epi32(0xff);
    for (int64_t i = 0; i < block; i += 16) {
        __m512 xm = _mm512_mul_ps(_mm512_load_ps(mbuf + i), kminv);
        __m512 yv = _mm512_mul_ps(_mm512_load_ps(sbuf + i), kqinv);
        __m512 ym = _mm512_mul_ps(xm, _mm512_rsqrt14_ps(_mm512_range_ps(xm, tiny, 0x0B)));
        /* |ym| <= 127.01 and 0 <= yv <= 255.01: the low byte is the rounded code */
        __m512i im = _mm512_castps_si512(_mm512_add_ps(ym, magic));
        __m512i iv = _mm512_castps_si512(_mm512_add_ps(yv, magic));
        __mmask16 live = _mm512_test_epi32_mask(iv, lowbyte); /* no m where v is 0 */
        _mm_storeu_si128((__m128i *)(QM + i), _mm512_maskz_cvtepi32_epi8(live, im));
        _mm_storeu_si128((__m128i *)(QV + i), _mm512_cvtepi32_epi8(iv));
    }
}

/* Full blocks [lo, hi) of one tensor, software-pipelined: pass 1 of block b runs before
   pass 2 of block b - 1, so the latency of a block's max reductions and scale maths
   (~60 cycles, a serial chain) overlaps independent work instead of stalling pass 2.
   Two buffer pairs, alternating. */
#define DEFINE_RANGE_AVX512(NAME, PASS1, PT)                                            \
static void NAME(PT *P, const PT *G, int8_t *QM, uint8_t *QV, float *MS, float *VS,      \
                 int64_t block, int64_t lo, int64_t hi, const Avx512Consts *k,          \
                 float (*mbuf)[MAX_BLOCK], float (*sbuf)[MAX_BLOCK]) {                  \
    Avx512Scales sc[2];                                                                 \
    for (int64_t b = lo; b < hi; b++) {                                                 \
        const int c = (int)((b - lo) & 1);                                              \
        const int64_t off = b * block;                                                  \
        float mx, vx;                                                                   \
        PASS1(P + off, G + off, QM + off, QV + off, MS[b], VS[b], block, k,             \
              mbuf[c], sbuf[c], &mx, &vx);                                              \
        sc[c] = scales_avx512(mx, vx, k, MS + b, VS + b);                               \
        if (b > lo)                                                                     \
            pass2_avx512(QM + off - block, QV + off - block, block, sc[c ^ 1],          \
                         mbuf[c ^ 1], sbuf[c ^ 1]);                                     \
    }                                                                                   \
    if (hi > lo) {                                                                      \
        const int c = (int)((hi - 1 - lo) & 1);                                         \
        pass2_avx512(QM + (hi - 1) * block, QV + (hi - 1) * block, block, sc[c],        \
                     mbuf[c], sbuf[c]);                                                 \
    }                                                                                   \
}

#define F32_LOADV(X, i) _mm512_loadu_ps((X) + (i))
#define F32_STOREV(X, i, v) _mm512_storeu_ps((X) + (i), (v))
DEFINE_PASS1_AVX512(pass1_f32_avx512, float, F32_LOADV, F32_STOREV)
DEFINE_RANGE_AVX512(range_f32_avx512, pass1_f32_avx512, float)

#ifdef __AVX512BF16__
#define HAVE_AVX512_BF16 1
#define BF16_LOADV(X, i) _mm512_castsi512_ps(_mm512_slli_epi32(                         \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((X) + (i)))), 16))
/* vcvtneps2bf16 rounds to nearest even, as torch does */
#define BF16_STOREV(X, i, v)                                                            \
    _mm256_storeu_si256((__m256i *)((X) + (i)), (__m256i)_mm512_cvtneps_pbh(v))
DEFINE_PASS1_AVX512(pass1_bf16_avx512, uint16_t, BF16_LOADV, BF16_STOREV)
DEFINE_RANGE_AVX512(range_bf16_avx512, pass1_bf16_avx512, uint16_t)
#endif
#endif

/* hp: beta1, beta2, eps, decay (1 - lr wd), step_size (lr / bc1), 1 / sqrt(bc2). */
void adamw8bit_step(int64_t ntensors, const int64_t *numel, void **p, void **g,
                    int8_t **mq, float **ms, uint8_t **vq, float **vs,
                    int32_t is_bf16, int64_t block, const float *hp, int32_t nthreads) {
    const float b1 = hp[0], b2 = hp[1], eps = hp[2], decay = hp[3];
    const float step_size = hp[4], ibc2 = hp[5];
#ifdef HAVE_AVX512
    int avx = block % 16 == 0 && step_size > 0.0f;
#ifndef HAVE_AVX512_BF16
    avx = avx && !is_bf16;
#endif
    Avx512Consts k;
    if (avx) {
        k.b1 = b1, k.b2 = b2, k.sm = 1.0f - b1, k.s2 = 1.0f - b2, k.rs2 = sqrtf(k.s2);
        k.kden = _mm512_set1_ps(ibc2 * k.rs2 / (step_size * k.sm));
        k.keps = _mm512_set1_ps(eps / (step_size * k.sm));
        k.kdecay = _mm512_set1_ps(decay);
    }
#endif
    #pragma omp parallel num_threads(nthreads)
    {
        float mbufs[2][MAX_BLOCK] __attribute__((aligned(64)));
        float sbufs[2][MAX_BLOCK] __attribute__((aligned(64)));
        float *mbuf = mbufs[0], *sbuf = sbufs[0];
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
        for (int64_t t = 0; t < ntensors; t++) {
            const int64_t n = numel[t];
            const int64_t nb = (n + block - 1) / block;
            /* schedule(static)'s split, by hand: the AVX-512 path pipelines a range */
            const int64_t q = nb / nth, r = nb % nth;
            int64_t lo = tid * q + (tid < r ? tid : r);
            const int64_t hi = lo + q + (tid < r);
#ifdef HAVE_AVX512
            if (avx) {
                const int64_t full = hi == nb && n % block ? hi - 1 : hi;
#ifdef HAVE_AVX512_BF16
                if (is_bf16)
                    range_bf16_avx512((uint16_t *)p[t], (const uint16_t *)g[t], mq[t], vq[t],
                                      ms[t], vs[t], block, lo, full, &k, mbufs, sbufs);
                else
#endif
                    range_f32_avx512((float *)p[t], (const float *)g[t], mq[t], vq[t], ms[t],
                                     vs[t], block, lo, full, &k, mbufs, sbufs);
                lo = full > lo ? full : lo;
            }
#endif
            for (int64_t b = lo; b < hi; b++) {
                const int64_t off = b * block;
                const int64_t len = n - off < block ? n - off : block;
                if (is_bf16)
                    BLOCK_BODY(uint16_t, BF16_LOAD, BF16_STORE)
                else
                    BLOCK_BODY(float, F32_LOAD, F32_STORE)
            }
        }
    }
}

#define ADAMW32_RANGE(PT, LOAD, STORE)                                                  \
    {                                                                                   \
        PT *P = (PT *)p[t] + start;                                                     \
        const PT *G = (const PT *)g[t] + start;                                         \
        float *M = m[t] + start, *V = v[t] + start;                                     \
        const float ss = step_size[t], ib = ibc2[t];                                    \
        _Pragma("omp simd")                                                             \
        for (int64_t i = 0; i < len; i++) {                                             \
            float gi = LOAD(G, i);                                                      \
            float mi = b1 * M[i] + (1.0f - b1) * gi;                                    \
            float vi = b2 * V[i] + (1.0f - b2) * gi * gi;                               \
            STORE(P, i, LOAD(P, i) * decay - ss * mi / (sqrtf(vi) * ib + eps));         \
            M[i] = mi;                                                                  \
            V[i] = vi;                                                                  \
        }                                                                               \
    }

#define ADAMW32_CHUNK 16384

/* torch.optim.AdamW for tensors that keep fp32 moments: AdamW8bit's small tensors
   (biases, norms), and autoscale's AdamW on the CPU ("native": bf16 params have no torch
   fused kernel with fp32 moments). One parallel region for all tensors, where torch's
   fused kernel opens one per tensor (~4 us each: ~0.4 ms for the ~100 small tensors of a
   transformer). Work is split into chunks of ADAMW32_CHUNK elements over all tensors,
   statically: by tensor, one huge tensor (an embedding) ran on one thread. hp: beta1,
   beta2, eps, decay; step_size and ibc2 per tensor (their step counts may differ). */
void adamw32_step(int64_t ntensors, const int64_t *numel, void **p, void **g, float **m,
                  float **v, int32_t is_bf16, const float *hp, const float *step_size,
                  const float *ibc2, int32_t nthreads) {
    const float b1 = hp[0], b2 = hp[1], eps = hp[2], decay = hp[3];
    /* first[t]: index of tensor t's first chunk; first[ntensors]: the chunk count */
    int64_t *first = (int64_t *)malloc((size_t)(ntensors + 1) * sizeof(int64_t));
    if (first == NULL) return;
    int64_t total = 0;
    first[0] = 0;
    for (int64_t t = 0; t < ntensors; t++) {
        total += numel[t];
        first[t + 1] = first[t] + (numel[t] + ADAMW32_CHUNK - 1) / ADAMW32_CHUNK;
    }
    const int64_t nchunks = first[ntensors];
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (total > 65536)
    for (int64_t c = 0; c < nchunks; c++) {
        /* the last tensor whose first chunk is <= c (empty tensors own no chunk) */
        int64_t lo = 0, hi = ntensors;
        while (hi - lo > 1) {
            const int64_t mid = (lo + hi) / 2;
            if (first[mid] <= c) lo = mid; else hi = mid;
        }
        const int64_t t = lo;
        const int64_t start = (c - first[t]) * ADAMW32_CHUNK;
        const int64_t len = numel[t] - start < ADAMW32_CHUNK ? numel[t] - start : ADAMW32_CHUNK;
        if (is_bf16)
            ADAMW32_RANGE(uint16_t, BF16_LOAD, BF16_STORE)
        else
            ADAMW32_RANGE(float, F32_LOAD, F32_STORE)
    }
    free(first);
}
"""

_fn = None
_fn32 = None


def _load():  # -> ctypes function | None
    global _fn, _fn32
    if _fn is None:
        lib = _native.load(_NAME, _SOURCE)
        if lib is None:
            return None
        ptrs = ctypes.POINTER(ctypes.c_void_p)
        floats = ctypes.POINTER(ctypes.c_float)
        fn = lib.adamw8bit_step
        fn.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ptrs, ptrs, ptrs, ptrs,
                       ptrs, ptrs, ctypes.c_int32, ctypes.c_int64, floats,
                       ctypes.c_int32]  # fmt: skip
        fn.restype = None
        fn32 = lib.adamw32_step
        fn32.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ptrs, ptrs, ptrs, ptrs,
                         ctypes.c_int32, floats, floats, floats, ctypes.c_int32]  # fmt: skip
        fn32.restype = None
        _fn, _fn32 = fn, fn32
    return _fn


def available() -> bool:
    """True when the C kernel builds and loads on this host."""
    return _load() is not None


def load_error() -> str | None:
    """Why the C kernel is unavailable, or None."""
    return _native.load_error(_NAME)


def step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    m_q: list[torch.Tensor],
    m_scale: list[torch.Tensor],
    v_q: list[torch.Tensor],
    v_scale: list[torch.Tensor],
    hyper: tuple[float, float, float, float, float, float],
    block_size: int,
) -> None:
    """One 8-bit AdamW step in place over all ``params`` in one call.

    Invariants: CPU tensors; params and grads contiguous and of one dtype (fp32 or bf16),
    checked here; the state laid out as ``adamw8bit._check`` requires, which the caller
    (``adamw8bit``) checks; ``block_size <= MAX_BLOCK``. ``hyper`` is the tuple of
    ``adamw8bit._hyper``.
    """
    if params:
        bound = BoundState([p.numel() for p in params], m_q, m_scale, v_q, v_scale)
        if not step_bound(bound, params, grads, hyper, block_size):
            raise ValueError(_BAD_PARAMS)


def adamw32_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """torch.optim.AdamW's step, in place, for tensors that keep fp32 moments, in one call.

    For AdamW8bit's small tensors, and autoscale's AdamW on the CPU ("native"): one parallel
    region for all tensors (torch's fused kernel opens one per tensor). ``steps`` are the
    1-based counts after this step.
    Params and grads: CPU, contiguous, all fp32 or all bf16; moments: contiguous fp32.
    Matches torch.optim.AdamW to fp32 rounding (another op order), not bit for bit.
    """
    for p, m, v in zip(params, exp_avgs, exp_avg_sqs, strict=True):
        if (m.dtype != torch.float32 or v.dtype != torch.float32 or not m.is_contiguous()
                or not v.is_contiguous() or not (m.numel() == v.numel() == p.numel())):  # fmt: skip
            raise ValueError("adamw32_step needs contiguous fp32 moments of the params' sizes.")
    if params:
        bound = BoundState([p.numel() for p in params], exp_avgs, exp_avg_sqs)
        if not adamw32_bound(bound, params, grads, steps, lr=lr, beta1=beta1, beta2=beta2,
                             eps=eps, weight_decay=weight_decay):  # fmt: skip
            raise ValueError(_BAD_PARAMS)


class BoundState:
    """A bucket's optimizer state bound to the C kernels: the pointer and size arrays
    that do not change from step to step, built once.

    Marshalling 136 tensors' pointers, sizes and layout checks into ctypes arrays costs
    ~0.5 ms a step once the kernel has streamed the caches out (4 % of a 50M-parameter
    step); with the state bound, a step marshals only params and grads. Invariant: it
    is used only while :meth:`same` holds, i.e. the state tensors are the very objects it
    was built from (it holds them, so their memory stays valid); the caller validates
    the layout before binding.
    """

    def __init__(self, numels: Sequence[int], *states: Sequence[torch.Tensor]) -> None:
        self.states = tuple(tuple(x) for x in states)
        self.numels = tuple(numels)
        n = len(self.numels)
        self.n_arr = (ctypes.c_int64 * n)(*self.numels)
        self.arrays = [(ctypes.c_void_p * n)(*[t.data_ptr() for t in x]) for x in self.states]

    def same(self, *states: Sequence[torch.Tensor]) -> bool:
        """True if ``states`` are, list by list, exactly the bound tensor objects."""
        return len(states) == len(self.states) and all(
            len(a) == len(b) and all(map(operator.is_, a, b))
            for a, b in zip(self.states, states, strict=True)
        )

    def params(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
               ) -> tuple[ctypes.Array, ctypes.Array, int] | None:  # fmt: skip
        """Pointer arrays of ``params`` and ``grads`` and the bf16 flag; None unless they
        are contiguous, of one dtype (fp32 or bf16) and of the bound sizes. (CPU: the
        state was made on the params' device and binding takes CPU state only.)"""
        dtype = params[0].dtype
        if dtype not in (torch.float32, torch.bfloat16) or len(params) != len(self.numels):
            return None
        for p, g, n in zip(params, grads, self.numels, strict=True):
            if (p.dtype != dtype or g.dtype != dtype or p.numel() != n or g.numel() != n
                    or not p.is_contiguous() or not g.is_contiguous()):  # fmt: skip
                return None
        arr = ctypes.c_void_p * len(params)
        return (arr(*[p.data_ptr() for p in params]), arr(*[g.data_ptr() for g in grads]),
                int(dtype == torch.bfloat16))  # fmt: skip


_BAD_PARAMS = ("the C kernel needs contiguous CPU params and grads of one dtype (fp32 or "
               "bf16), of the sizes their state was made for.")  # fmt: skip


def step_bound(
    state: BoundState,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    hyper: tuple[float, float, float, float, float, float],
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
    hyper: tuple[float, float, float, float, float, float],
    block_size: int,
) -> None:
    """The kernel call of :func:`step_bound`, on ``arrays`` that ``state.params`` returned
    for these very params and grads (so a caller can check every bucket before it runs
    any)."""
    if _load() is None:
        raise RuntimeError(f"the 8-bit AdamW C kernel is unavailable: {load_error()}")
    if block_size > MAX_BLOCK:
        raise ValueError(f"block_size {block_size} > {MAX_BLOCK}, the C kernel's limit.")
    p_arr, g_arr, is_bf16 = arrays
    _fn(len(p_arr), state.n_arr, p_arr, g_arr, *state.arrays, is_bf16, block_size,
        (ctypes.c_float * 6)(*hyper), torch.get_num_threads())  # fmt: skip


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
    if _load() is None:
        raise RuntimeError(f"the 8-bit AdamW C kernel is unavailable: {load_error()}")
    p_arr, g_arr, is_bf16 = arrays
    floats = ctypes.c_float * len(p_arr)
    _fn32(
        len(p_arr), state.n_arr, p_arr, g_arr, *state.arrays, is_bf16,
        (ctypes.c_float * 4)(beta1, beta2, eps, 1.0 - lr * weight_decay),
        floats(*[lr / (1.0 - beta1**t) for t in steps]),
        floats(*[(1.0 - beta2**t) ** -0.5 for t in steps]), torch.get_num_threads(),
    )  # fmt: skip
