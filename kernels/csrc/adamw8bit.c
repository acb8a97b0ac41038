/* 8-bit AdamW on the CPU: one pass over memory per block; see kernels/_cpu_adamw8bit.py
   for the design and kernels/adamw8bit.py for the maths and quantization maps. */
#include "prelude.h"

#define MAX_BLOCK 4096

/* A block whose new m or sqrt(v) holds an inf or NaN (Note: [non-finite gradients] in
   kernels/__init__.py): codes 0 and both scales NaN, as the reference. */
static inline void nonfinite_block(int8_t *QM, uint8_t *QV, int64_t block, float *msp,
                                   float *vsp) {
    memset(QM, 0, (size_t)block);
    memset(QV, 0, (size_t)block);
    *msp = NAN;
    *vsp = NAN;
}

/* Generic block, any length <= block: gcc vectorizes it. PT is the param/grad element
   type. */
#define BLOCK_BODY(PT, LOAD, STORE)                                                     \
    {                                                                                   \
        PT *P = (PT *)p[t] + off;                                                       \
        const PT *G = (const PT *)g[t] + off;                                           \
        int8_t *QM = mq[t] + off;                                                       \
        uint8_t *QV = vq[t] + off;                                                      \
        float mmax = 0.0f, smax = 0.0f, bad = 0.0f;                                     \
        /* codes dequantized as q |q| * scale / 127^2: one multiply fewer than the ref */ \
        const float cm = ms[t][b] * (1.0f / 16129.0f), cv = vs[t][b] * (1.0f / 65025.0f); \
        _Pragma("omp simd reduction(max:mmax,smax) reduction(+:bad)")                   \
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
            mmax = MAXF(fabsf(m), mmax);                                                \
            smax = MAXF(sv, smax);                                                      \
            bad += NONFINITE(m) + NONFINITE(sv);                                        \
        }                                                                               \
        if (bad != bad) {                                                               \
            nonfinite_block(QM, QV, block, &ms[t][b], &vs[t][b]);                       \
        } else {                                                                        \
            /* padding past the param's end: zero grad and state, so zero moments */    \
            for (int64_t i = len; i < block; i++) { mbuf[i] = 0.0f; sbuf[i] = 0.0f; }   \
            const float minv = mmax > 0.0f ? 16129.0f / mmax : 0.0f;                    \
            const float sinv = smax > 0.0f ? 65025.0f / smax : 0.0f;                    \
            /* y >= 0, so truncating y + 0.5 is floor(y + 0.5), the reference's rounding */ \
            _Pragma("omp simd")                                                         \
            for (int64_t i = 0; i < block; i++) {                                       \
                float m = mbuf[i];                                                      \
                int32_t yv = (int32_t)(MINF(sqrtf(sbuf[i] * sinv), 255.0f) + 0.5f);     \
                int32_t ym = (int32_t)(MINF(sqrtf(fabsf(m) * minv), 127.0f) + 0.5f);    \
                ym = yv == 0 ? 0 : (m < 0.0f ? -ym : ym); /* guard: no m where v is 0 */ \
                QM[i] = (int8_t)ym;                                                     \
                QV[i] = (uint8_t)yv;                                                    \
            }                                                                           \
            ms[t][b] = mmax;                                                            \
            vs[t][b] = smax;                                                            \
        }                                                                               \
    }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define HAVE_AVX512 1

/* A whole block (block % 16 == 0, step_size > 0) with AVX-512. Compute-bound, not
   memory-bound, on the CPUs measured, so it is written for few vector ops per element:
   - 14-bit reciprocal / reciprocal-sqrt estimates (no Newton step) instead of sqrt and
     division: p moves by < 3e-4 of its update, a code by one level on < 0.5 % of
     elements, far below the state's own quantization error (half a level everywhere);
   - m and v kept in units of (1 - b1) and (1 - b2), step size folded into the divisor
     (so v overflows fp32 where v / (1 - b2) would, ~1000x before the reference's v:
     sqrt(v) above ~1e17, far outside any training);
   - rsqrt14(0) = +inf, so rcp14(rsqrt14(v)) = sqrt(v) and rsqrt14(rsqrt14(v)) = v^1/4
     are exact 0 at 0 with no clamp; the buffer keeps v^1/4, the v code's linear unit;
   - a non-finite block is found by classifying m and v (vfpclassps: inf or NaN) into a
     mask, since vector max and vrangeps both drop a NaN operand;
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
    int bad;
} Avx512Scales;

/* Pass 1 of a block: the AdamW update of p; new m and v^1/4 into the buffers. Returns
   the block's max |m| and max v (both in the moments' units; NaN if any m or v is inf or
   NaN) through mx, vx. */
#define DEFINE_PASS1_AVX512(NAME, PT, LOADV, STOREV)                                    \
static inline void NAME(PT *P, const PT *G, const int8_t *QM, const uint8_t *QV,        \
                        float ms_old, float vs_old, int64_t block, const Avx512Consts *k, \
                        float *mbuf, float *sbuf, float *mx, float *vx) {               \
    const __m512 kcm = _mm512_set1_ps(ms_old * (1.0f / 16129.0f) * k->b1 / k->sm);      \
    const __m512 kcv = _mm512_set1_ps(vs_old * vs_old * (1.0f / 65025.0f / 65025.0f)    \
                                      * k->b2 / k->s2);                                 \
    const __m512 kden = k->kden, keps = k->keps, kdecay = k->kdecay;                    \
    __m512 mmax = _mm512_setzero_ps(), vmax = _mm512_setzero_ps();                      \
    __mmask16 bad = 0;                                                                  \
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
        /* 0x99: QNaN, SNaN, +inf, -inf */                                              \
        bad |= _mm512_fpclass_ps_mask(m, 0x99) | _mm512_fpclass_ps_mask(v, 0x99);       \
    }                                                                                   \
    *mx = bad ? NAN : _mm512_reduce_max_ps(mmax);                                       \
    *vx = bad ? NAN : _mm512_reduce_max_ps(vmax);                                       \
}

/* Between the passes: the block's new scales (stored) and pass 2's constants. */
static inline Avx512Scales scales_avx512(float mx, float vx, const Avx512Consts *k,
                                         float *msp, float *vsp) {
    const float sx = sqrtf(vx);
    Avx512Scales s = {mx > 0.0f ? 16129.0f / mx : 0.0f,
                      sx > 0.0f ? 255.0f / sqrtf(sx) : 0.0f, !isfinite(mx) || !isfinite(vx)};
    msp[0] = s.bad ? NAN : mx * k->sm;
    vsp[0] = s.bad ? NAN : sx * k->rs2;
    return s;
}

/* Pass 2 of a block: requantize m and v^1/4 from the buffers (in L1). */
static inline void pass2_avx512(int8_t *QM, uint8_t *QV, int64_t block, Avx512Scales s,
                                const float *mbuf, const float *sbuf) {
    if (s.bad) {
        memset(QM, 0, (size_t)block);
        memset(QV, 0, (size_t)block);
        return;
    }
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
/* vcvtneps2bf16 rounds to nearest even, as torch does, and keeps NaN a NaN */
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
