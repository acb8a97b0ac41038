/* One-pass loops for AdamW (fp32 moments), SGD, LARS and LAMB on the CPU; see
   kernels/_cpu_optim.py. Every loop splits its work in CHUNK-element chunks over all
   tensors of the call, statically (by tensor, one huge tensor ran on one thread). */
#include "prelude.h"

#define FOR_CHUNKS(BODY)                                                                \
    int64_t total;                                                                      \
    int64_t *first = chunk_index(n, numel, &total);                                     \
    if (first == NULL) return -1;                                                       \
    const int64_t nchunks = first[n];                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (total > 65536)") \
    for (int64_t c = 0; c < nchunks; c++) {                                             \
        const int64_t t = chunk_owner(first, n, c);                                     \
        const int64_t start = (c - first[t]) * CHUNK;                                   \
        const int64_t len = numel[t] - start < CHUNK ? numel[t] - start : CHUNK;        \
        BODY                                                                            \
    }

/* torch.optim.AdamW for tensors that keep fp32 moments:
     p = p * decay - step_size[t] * m / (sqrt(v) * ibc2[t] + eps)
   hp: beta1, beta2, eps, decay (1 - lr wd); step_size and ibc2 (1 / sqrt(bc2)) per tensor
   (their step counts may differ). */
#define ADAMW32_BODY(PT, LOAD, STORE)                                                   \
    {                                                                                   \
        PT *P = (PT *)p[t] + start;                                                     \
        const PT *G = (const PT *)g[t] + start;                                         \
        float *M = m[t] + start, *V = v[t] + start;                                     \
        const float ss = step_size[t], ib = ibc2[t];                                    \
        _Pragma("omp simd")                                                             \
        for (int64_t i = 0; i < len; i++) {                                             \
            const float gi = LOAD(G, i);                                                \
            const float mi = b1 * M[i] + (1.0f - b1) * gi;                              \
            const float vi = b2 * V[i] + (1.0f - b2) * gi * gi;                         \
            STORE(P, i, LOAD(P, i) * decay - ss * mi / (sqrtf(vi) * ib + eps));         \
            M[i] = mi;                                                                  \
            V[i] = vi;                                                                  \
        }                                                                               \
    }

int adamw32_step(int64_t n, const int64_t *numel, void **p, void **g, float **m, float **v,
                 int32_t is_bf16, const float *hp, const float *step_size, const float *ibc2,
                 int32_t nthreads) {
    const float b1 = hp[0], b2 = hp[1], eps = hp[2], decay = hp[3];
    FOR_CHUNKS(if (is_bf16) ADAMW32_BODY(uint16_t, BF16_LOAD, BF16_STORE)
               else ADAMW32_BODY(float, F32_LOAD, F32_STORE))
    free(first);
    return 0;
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

/* Per-chunk partial sums (double) in part[2 * c], added per tensor in chunk order. */
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
                const float mi = momentum * M[i] + (1.0f - dampening) * d;              \
                M[i] = mi;                                                              \
                STORE(P, i, pi - lr * (nesterov ? d + momentum * mi : mi));             \
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
