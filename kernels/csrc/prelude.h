/* What every kernel source starts with: headers, and fp32/bf16 element access (PT is the
   param element type: float, or uint16_t holding bf16). bf16 stores round to nearest
   even, as torch's .to(torch.bfloat16), and keep NaN a NaN. */
#ifndef AUTOSCALE_PRELUDE_H
#define AUTOSCALE_PRELUDE_H

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_load(const uint16_t *x, int64_t i) {
    uint32_t u = (uint32_t)x[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even; inf stays inf */
    return (uint16_t)(u >> 16);
}

#define F32_LOAD(X, i) ((X)[i])
#define F32_STORE(X, i, v) ((X)[i] = (v))
#define BF16_LOAD(X, i) bf16_load((X), (i))
#define BF16_STORE(X, i, v) ((X)[i] = bf16_round(v))

/* Branch-free max and min that vectorize without -ffinite-math-only (fmaxf/fminf must
   return the non-NaN operand, which x86 vector max/min do not). They drop a NaN in `a`'s
   place: callers that must see non-finite values track them separately (NONFINITE). */
#define MAXF(a, b) ((a) > (b) ? (a) : (b))
#define MINF(a, b) ((a) < (b) ? (a) : (b))

/* 0 for finite x, NaN for inf or NaN: summed over a block, a NaN total flags it. */
#define NONFINITE(x) ((x) * 0.0f)

/* Work split over all tensors of a call in chunks of CHUNK elements: first[t] is tensor
   t's first chunk, first[n] the chunk count. NULL if out of memory. */
#define CHUNK 16384

static inline int64_t *chunk_index(int64_t n, const int64_t *numel, int64_t *total) {
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
static inline int64_t chunk_owner(const int64_t *first, int64_t n, int64_t c) {
    int64_t lo = 0, hi = n;
    while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (first[mid] <= c) lo = mid; else hi = mid;
    }
    return lo;
}

#endif
