/* Decode attention over the paged KV pool on CPU, float32: one query token per sequence, read
 * straight from the pool through the block table (no gather of the context into a padded copy).
 *
 * Built at run time by `kernels/cpu_native.py` with the machine's C compiler and loaded with
 * ctypes; no Python or torch headers, so the build takes well under a second. Layouts are those of
 * `kernels/torch_backend.py`:
 *   query, out        [T, H, D]          rows of the decode tokens given by `tokens`
 *   k_cache, v_cache  [NB, BS, HKV, D]   contiguous; slot = block * BS + offset
 *   block_table       [S, bt_stride]     int32; only the first ceil(seq_len / BS) entries are read
 *   seq_lens          [S]                int32, context length including the new token
 *   tokens            [S]                int64, row of each sequence's query in `query` / `out`
 *
 * Work item = a run of sequences, all their heads: one sequence alone, or sequences that share
 * their first blocks, worked through together so a shared block is read once (threads split
 * the items). Two passes over each context: scores, then softmax and the weighted sum of V (no
 * running rescale; the softmax's 1 / sum is applied to the output). AVX2 + FMA code where the
 * compiler targets it (eight score rows at a time, then four, a vectorized maximum and exp, each V
 * row loaded once for the two heads of a KV group that read it, else summed in two interleaved
 * chains); with AVX-512 the two heads of a KV group are also scored together, sixteen columns per
 * register, and the softmax's exp runs sixteen at a time; plain C elsewhere. The block read next
 * (the next one of this sequence, else the next sequence's first own block) is prefetched a slice
 * per head while this one is worked on. Only positions < seq_len are read, so slots past a context that
 * were never written (they may hold anything) never reach the output.
 */

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core_share.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* Eight partial sums so the compiler can keep them in one vector register (D is a multiple of 8
 * for every model pagedserve runs; the tail loop covers the rest). */
static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

/* y[0:n] += sum_i w[i] * x[i * stride : i * stride + n], the rows of one head in one block. With
 * AVX2 and n a multiple of 32: 32 columns at a time in registers, even and odd rows summed apart
 * (two independent chains of FMAs) and added at the end; else the plain loop. */
static inline void weighted_sum(float *restrict y, const float *restrict w, const float *restrict x,
                                int64_t stride, int64_t rows, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
    if (n % 32 == 0) {
        for (int64_t c = 0; c < n; c += 32) {
            __m256 t0 = _mm256_loadu_ps(y + c), t1 = _mm256_loadu_ps(y + c + 8);
            __m256 t2 = _mm256_loadu_ps(y + c + 16), t3 = _mm256_loadu_ps(y + c + 24);
            __m256 u0 = _mm256_setzero_ps(), u1 = _mm256_setzero_ps();
            __m256 u2 = _mm256_setzero_ps(), u3 = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 2 <= rows; i += 2) {
                const float *x0 = x + i * stride + c, *x1 = x0 + stride;
                const __m256 w0 = _mm256_broadcast_ss(w + i), w1 = _mm256_broadcast_ss(w + i + 1);
                t0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0), t0);
                t1 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + 8), t1);
                t2 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + 16), t2);
                t3 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + 24), t3);
                u0 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1), u0);
                u1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + 8), u1);
                u2 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + 16), u2);
                u3 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + 24), u3);
            }
            if (i < rows) {
                const float *x0 = x + i * stride + c;
                const __m256 w0 = _mm256_broadcast_ss(w + i);
                t0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0), t0);
                t1 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + 8), t1);
                t2 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + 16), t2);
                t3 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + 24), t3);
            }
            _mm256_storeu_ps(y + c, _mm256_add_ps(t0, u0));
            _mm256_storeu_ps(y + c + 8, _mm256_add_ps(t1, u1));
            _mm256_storeu_ps(y + c + 16, _mm256_add_ps(t2, u2));
            _mm256_storeu_ps(y + c + 24, _mm256_add_ps(t3, u3));
        }
        return;
    }
#endif
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < n; j++) y[j] += w[i] * x[i * stride + j];
}

/* The same for two heads that read the same rows (grouped-query attention): each row's columns
 * are loaded once for both; one chain of FMAs per head and column vector. n % 32 == 0, AVX2. */
#if defined(__AVX2__) && defined(__FMA__)
static inline void weighted_sum_pair(float *restrict y0, float *restrict y1, const float *restrict w0,
                                     const float *restrict w1, const float *restrict x, int64_t stride,
                                     int64_t rows, int64_t n) {
    for (int64_t c = 0; c < n; c += 32) {
        __m256 s0 = _mm256_loadu_ps(y0 + c), s1 = _mm256_loadu_ps(y0 + c + 8);
        __m256 s2 = _mm256_loadu_ps(y0 + c + 16), s3 = _mm256_loadu_ps(y0 + c + 24);
        __m256 t0 = _mm256_loadu_ps(y1 + c), t1 = _mm256_loadu_ps(y1 + c + 8);
        __m256 t2 = _mm256_loadu_ps(y1 + c + 16), t3 = _mm256_loadu_ps(y1 + c + 24);
        for (int64_t i = 0; i < rows; i++) {
            const float *xr = x + i * stride + c;
            const __m256 x0 = _mm256_loadu_ps(xr), x1 = _mm256_loadu_ps(xr + 8);
            const __m256 x2 = _mm256_loadu_ps(xr + 16), x3 = _mm256_loadu_ps(xr + 24);
            const __m256 a = _mm256_broadcast_ss(w0 + i), b = _mm256_broadcast_ss(w1 + i);
            s0 = _mm256_fmadd_ps(a, x0, s0);
            s1 = _mm256_fmadd_ps(a, x1, s1);
            s2 = _mm256_fmadd_ps(a, x2, s2);
            s3 = _mm256_fmadd_ps(a, x3, s3);
            t0 = _mm256_fmadd_ps(b, x0, t0);
            t1 = _mm256_fmadd_ps(b, x1, t1);
            t2 = _mm256_fmadd_ps(b, x2, t2);
            t3 = _mm256_fmadd_ps(b, x3, t3);
        }
        _mm256_storeu_ps(y0 + c, s0);
        _mm256_storeu_ps(y0 + c + 8, s1);
        _mm256_storeu_ps(y0 + c + 16, s2);
        _mm256_storeu_ps(y0 + c + 24, s3);
        _mm256_storeu_ps(y1 + c, t0);
        _mm256_storeu_ps(y1 + c + 8, t1);
        _mm256_storeu_ps(y1 + c + 16, t2);
        _mm256_storeu_ps(y1 + c + 24, t3);
    }
}
#define HAVE_WEIGHTED_SUM_PAIR 1
#endif

/* A row of scores for one head: out[i] = scale * q . k[i * stride], i < n. With AVX2 and FMA,
 * four rows at a time (four independent accumulators, reduced together); else one by one. */
#if defined(__AVX2__) && defined(__FMA__)

/* lane r of the result: the sum of all lanes of a[r] (r < 8); for each half, rows 0-3 in g0 and
 * rows 4-7 in g1, lanes 0-3 then 4-7 */
static inline __m256 sum8(const __m256 *a) {
    const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
}

static inline void score_rows(const float *restrict q, const float *restrict k, int64_t stride, int64_t n,
                              int64_t d, float scale, float *restrict out) {
    int64_t i = 0;
    if (d % 8 == 0) {
        const __m256 vscale = _mm256_set1_ps(scale);
        for (; i + 8 <= n; i += 8) { /* eight rows: eight independent chains of FMAs */
            const float *k0 = k + i * stride;
            __m256 a[8];
            for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
            for (int64_t c = 0; c < d; c += 8) {
                const __m256 qc = _mm256_loadu_ps(q + c);
                for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + r * stride + c), a[r]);
            }
            _mm256_storeu_ps(out + i, _mm256_mul_ps(sum8(a), vscale));
        }
        for (; i + 4 <= n; i += 4) {
            const float *k0 = k + i * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            for (int64_t c = 0; c < d; c += 8) {
                const __m256 qc = _mm256_loadu_ps(q + c);
                a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + c), a0);
                a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k1 + c), a1);
                a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k2 + c), a2);
                a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k3 + c), a3);
            }
            /* lanes of hadd(hadd(a0, a1), hadd(a2, a3)): the four rows' sums of lanes 0-3, then 4-7 */
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            _mm_storeu_ps(out + i, _mm_mul_ps(sum, _mm256_castps256_ps128(vscale)));
        }
    }
    for (; i < n; i++) out[i] = dot(q, k + i * stride, d) * scale;
}

/* exp(x) for x <= 0 (scores minus their maximum), eight at a time: Cody-Waite range reduction
 * and a degree-5 polynomial (about 1 ulp over the range); below -87 the result is taken as
 * exp(-87) ~ 1.6e-38, which vanishes next to the maximum's 1. */
#define EXP_FLOOR -87.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f /* ln 2 in two parts (Cody-Waite) */
#define EXP_LN2_LO -2.12194440e-4f
/* the polynomial's coefficients, highest degree first (the AVX-512 form below uses them too) */
static const float EXP_POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(EXP_FLOOR));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), x);
    __m256 y = _mm256_set1_ps(EXP_POLY[0]);
    for (int j = 1; j < 6; j++) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_POLY[j]));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* the largest of row[0:n] (n >= 1); four running maxima, so the loop is not one long chain */
static inline float row_max(const float *row, int64_t n) {
    int64_t i = 0;
    float max = -INFINITY;
    if (n >= 32) {
        __m256 m0 = _mm256_loadu_ps(row), m1 = _mm256_loadu_ps(row + 8);
        __m256 m2 = _mm256_loadu_ps(row + 16), m3 = _mm256_loadu_ps(row + 24);
        for (i = 32; i + 32 <= n; i += 32) {
            m0 = _mm256_max_ps(m0, _mm256_loadu_ps(row + i));
            m1 = _mm256_max_ps(m1, _mm256_loadu_ps(row + i + 8));
            m2 = _mm256_max_ps(m2, _mm256_loadu_ps(row + i + 16));
            m3 = _mm256_max_ps(m3, _mm256_loadu_ps(row + i + 24));
        }
        float buf[8];
        _mm256_storeu_ps(buf, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
        for (int j = 0; j < 8; j++) max = buf[j] > max ? buf[j] : max;
    }
    for (; i < n; i++) max = row[i] > max ? row[i] : max;
    return max;
}

/* row[i] = exp(row[i] - max); returns the sum */
static inline float exp_shifted(float *row, int64_t n, float max) {
    int64_t i = 0;
    __m256 vsum = _mm256_setzero_ps();
    const __m256 vmax = _mm256_set1_ps(max);
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + i), vmax));
        _mm256_storeu_ps(row + i, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float buf[8];
    _mm256_storeu_ps(buf, vsum);
    float sum = ((buf[0] + buf[4]) + (buf[1] + buf[5])) + ((buf[2] + buf[6]) + (buf[3] + buf[7]));
    for (; i < n; i++) {
        row[i] = expf(row[i] - max);
        sum += row[i];
    }
    return sum;
}
#else
static inline void score_rows(const float *restrict q, const float *restrict k, int64_t stride, int64_t n,
                              int64_t d, float scale, float *restrict out) {
    for (int64_t i = 0; i < n; i++) out[i] = dot(q, k + i * stride, d) * scale;
}

static inline float row_max(const float *row, int64_t n) {
    float max = -INFINITY;
    for (int64_t i = 0; i < n; i++) max = row[i] > max ? row[i] : max;
    return max;
}

static inline float exp_shifted(float *row, int64_t n, float max) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        row[i] = expf(row[i] - max);
        sum += row[i];
    }
    return sum;
}
#endif

/* AVX-512: the two heads of a KV group (h, h + 1) scored and summed together, sixteen columns per
 * register, so each K and V row is loaded once for both heads and half as many loads and FMAs are
 * issued as with AVX2. Needs head_dim % 32 == 0 and an even group; the AVX2 code runs otherwise. */
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define HAVE_PAIR512 1

/* the upper 256 bits of v added to the lower (AVX512F only: no AVX512DQ extract) */
static inline __m256 fold512(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* out0[i] = scale * q0 . k[i * stride], out1[i] = scale * q1 . k[i * stride], i < n; d % 16 == 0.
 * Eight rows at a time (sixteen independent chains), then one row at a time. */
static inline void score_rows_pair512(const float *restrict q0, const float *restrict q1, const float *restrict k,
                                      int64_t stride, int64_t n, int64_t d, float scale, float *restrict out0,
                                      float *restrict out1) {
    const __m256 vscale = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const float *k0 = k + i * stride;
        __m512 a[8], b[8];
        for (int r = 0; r < 8; r++) a[r] = b[r] = _mm512_setzero_ps();
        for (int64_t c = 0; c < d; c += 16) {
            const __m512 x = _mm512_loadu_ps(q0 + c), y = _mm512_loadu_ps(q1 + c);
            for (int r = 0; r < 8; r++) {
                const __m512 kr = _mm512_loadu_ps(k0 + r * stride + c);
                a[r] = _mm512_fmadd_ps(x, kr, a[r]);
                b[r] = _mm512_fmadd_ps(y, kr, b[r]);
            }
        }
        __m256 fa[8], fb[8];
        for (int r = 0; r < 8; r++) {
            fa[r] = fold512(a[r]);
            fb[r] = fold512(b[r]);
        }
        _mm256_storeu_ps(out0 + i, _mm256_mul_ps(sum8(fa), vscale));
        _mm256_storeu_ps(out1 + i, _mm256_mul_ps(sum8(fb), vscale));
    }
    for (; i < n; i++) {
        const float *kr = k + i * stride;
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
        for (int64_t c = 0; c < d; c += 16) {
            const __m512 x = _mm512_loadu_ps(kr + c);
            a = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + c), x, a);
            b = _mm512_fmadd_ps(_mm512_loadu_ps(q1 + c), x, b);
        }
        out0[i] = _mm512_reduce_add_ps(a) * scale;
        out1[i] = _mm512_reduce_add_ps(b) * scale;
    }
}

/* y0 += sum_i w0[i] * x[i * stride], y1 likewise with w1, over n columns (n % 32 == 0): 32 columns
 * at a time, even and odd rows in separate accumulators (eight chains), added at the end. */
static inline void weighted_sum_pair512(float *restrict y0, float *restrict y1, const float *restrict w0,
                                        const float *restrict w1, const float *restrict x, int64_t stride,
                                        int64_t rows, int64_t n) {
    for (int64_t c = 0; c < n; c += 32) {
        __m512 s0 = _mm512_loadu_ps(y0 + c), s1 = _mm512_loadu_ps(y0 + c + 16);
        __m512 t0 = _mm512_loadu_ps(y1 + c), t1 = _mm512_loadu_ps(y1 + c + 16);
        __m512 u0 = _mm512_setzero_ps(), u1 = _mm512_setzero_ps();
        __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 2 <= rows; i += 2) {
            const float *xa = x + i * stride + c, *xb = xa + stride;
            const __m512 xa0 = _mm512_loadu_ps(xa), xa1 = _mm512_loadu_ps(xa + 16);
            const __m512 xb0 = _mm512_loadu_ps(xb), xb1 = _mm512_loadu_ps(xb + 16);
            const __m512 pa = _mm512_set1_ps(w0[i]), qa = _mm512_set1_ps(w1[i]);
            const __m512 pb = _mm512_set1_ps(w0[i + 1]), qb = _mm512_set1_ps(w1[i + 1]);
            s0 = _mm512_fmadd_ps(pa, xa0, s0);
            s1 = _mm512_fmadd_ps(pa, xa1, s1);
            t0 = _mm512_fmadd_ps(qa, xa0, t0);
            t1 = _mm512_fmadd_ps(qa, xa1, t1);
            u0 = _mm512_fmadd_ps(pb, xb0, u0);
            u1 = _mm512_fmadd_ps(pb, xb1, u1);
            v0 = _mm512_fmadd_ps(qb, xb0, v0);
            v1 = _mm512_fmadd_ps(qb, xb1, v1);
        }
        if (i < rows) {
            const float *xa = x + i * stride + c;
            const __m512 xa0 = _mm512_loadu_ps(xa), xa1 = _mm512_loadu_ps(xa + 16);
            const __m512 pa = _mm512_set1_ps(w0[i]), qa = _mm512_set1_ps(w1[i]);
            s0 = _mm512_fmadd_ps(pa, xa0, s0);
            s1 = _mm512_fmadd_ps(pa, xa1, s1);
            t0 = _mm512_fmadd_ps(qa, xa0, t0);
            t1 = _mm512_fmadd_ps(qa, xa1, t1);
        }
        _mm512_storeu_ps(y0 + c, _mm512_add_ps(s0, u0));
        _mm512_storeu_ps(y0 + c + 16, _mm512_add_ps(s1, u1));
        _mm512_storeu_ps(y1 + c, _mm512_add_ps(t0, v0));
        _mm512_storeu_ps(y1 + c + 16, _mm512_add_ps(t1, v1));
    }
}

/* exp(x) for x <= 0, sixteen at a time: exp_nonpositive's arithmetic, lane for lane */
static inline __m512 exp_nonpositive512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(EXP_FLOOR));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(EXP_LOG2E), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), x);
    __m512 y = _mm512_set1_ps(EXP_POLY[0]);
    for (int j = 1; j < 6; j++) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(EXP_POLY[j]));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

/* row[i] = exp(row[i] - max(row)), i < n (n >= 1); returns the sum. Sixteen at a time, the tail
 * masked (the maximum's and the sum's lanes are reduced at the end). */
static inline float softmax_exp512(float *row, int64_t n) {
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(row + i));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(row + i + 16));
    }
    for (; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        m0 = _mm512_max_ps(m0, _mm512_mask_loadu_ps(m1, k, row + i));
    }
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)));
    __m512 vsum = _mm512_setzero_ps();
    for (i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 e = exp_nonpositive512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row + i), vmax));
        _mm512_mask_storeu_ps(row + i, k, e);
        vsum = _mm512_mask_add_ps(vsum, k, vsum, e);
    }
    return _mm512_reduce_add_ps(vsum);
}
#endif

/* Part `part` of `parts` of the cache lines of a block (`floats` long; NULL: none). The next block is
 * requested a slice at a time while this one is worked on: requested at once, its lines take every
 * miss the core can have outstanding and the prefetches themselves stall (a tenth of the kernel's
 * time when they were issued in one burst per block). */
static inline void prefetch_part(const float *block, int64_t floats, int64_t part, int64_t parts) {
    if (block == NULL) return;
    const int64_t lines = floats / 16, end = lines * (part + 1) / parts;
    for (int64_t l = lines * part / parts; l < end; l++) __builtin_prefetch(block + l * 16, 0, 3);
}

/* Sequences that share their first blocks (a common prompt prefix: prefix caching or parallel
 * samples map them to the same physical blocks) are worked through together: each shared block
 * is read once from memory and used for every sequence of the group while it sits in cache,
 * instead of once per sequence. Each sequence's arithmetic is unchanged (the same score rows, the
 * same block order in its V sum), so its output is the same bit for bit as when it runs alone.
 * Blocks are shared only as a prefix (a block's identity depends on every token before it), so
 * sequences with the same first block form a group and share its leading run. */
typedef struct {
    int32_t first; /* the sequence's first block id, or -1 for an empty context */
    int32_t seq;
} seq_key;

static int by_first_block(const void *a, const void *b) {
    const seq_key *x = a, *y = b;
    if (x->first != y->first) return x->first < y->first ? -1 : 1;
    return (x->seq > y->seq) - (x->seq < y->seq);
}

typedef struct {
    int64_t start, count; /* a run of `order` */
    int64_t shared;       /* leading blocks the run's sequences all map to the same ids */
} work_item;

typedef struct {
    const float *query, *k_cache, *v_cache;
    float *out;
    int64_t q_tok_stride, q_head_stride, out_tok_stride, out_head_stride;
    const int32_t *block_table, *seq_lens;
    const int64_t *tokens;
    int64_t bt_stride, num_heads, group, head_dim, block_size, tok_stride, blk_stride;
    float scale;
} decode_args;

/* whether heads h, h + 1 (h even) read the same KV head, in a layout the pair code takes */
static inline int paired_heads(const decode_args *a) {
    return a->group % 2 == 0 && a->head_dim % 32 == 0;
}

static inline int64_t num_blocks_of(const decode_args *a, int64_t s) {
    return (a->seq_lens[s] + a->block_size - 1) / a->block_size;
}

/* K rows of block `b` (its id `id`) for sequence `s`: its scores for every head; `next` (or NULL)
 * is prefetched a slice per head */
static inline void score_block(const decode_args *a, int64_t s, float *scores, int64_t b, int32_t id,
                               const float *next) {
    const int64_t len = a->seq_lens[s];
    const float *q = a->query + a->tokens[s] * a->q_tok_stride;
    const float *kb = a->k_cache + (int64_t)id * a->blk_stride;
    const int64_t p0 = b * a->block_size;
    const int64_t n = len - p0 < a->block_size ? len - p0 : a->block_size;
#ifdef HAVE_PAIR512
    if (paired_heads(a)) {
        for (int64_t h = 0; h < a->num_heads; h += 2) {
            prefetch_part(next, a->blk_stride, h, a->num_heads);
            score_rows_pair512(q + h * a->q_head_stride, q + (h + 1) * a->q_head_stride,
                               kb + (h / a->group) * a->head_dim, a->tok_stride, n, a->head_dim, a->scale,
                               scores + h * len + p0, scores + (h + 1) * len + p0);
            prefetch_part(next, a->blk_stride, h + 1, a->num_heads);
        }
        return;
    }
#endif
    for (int64_t h = 0; h < a->num_heads; h++) {
        prefetch_part(next, a->blk_stride, h, a->num_heads);
        score_rows(q + h * a->q_head_stride, kb + (h / a->group) * a->head_dim, a->tok_stride, n, a->head_dim,
                   a->scale, scores + h * len + p0);
    }
}

/* row[i] = exp(row[i] - max(row)), i < n; returns the sum */
static inline float softmax_exp(float *row, int64_t n) {
#ifdef HAVE_PAIR512
    return softmax_exp512(row, n);
#else
    return exp_shifted(row, n, row_max(row, n));
#endif
}

/* V rows of block `b` into sequence `s`'s accumulators, weighted by its softmaxed scores; `next`
 * (or NULL) is prefetched a slice per head */
static inline void sum_block(const decode_args *a, int64_t s, const float *scores, float *acc, int64_t b, int32_t id,
                             const float *next) {
    const int64_t len = a->seq_lens[s];
    const float *vb = a->v_cache + (int64_t)id * a->blk_stride;
    const int64_t p0 = b * a->block_size;
    const int64_t n = len - p0 < a->block_size ? len - p0 : a->block_size;
#ifdef HAVE_PAIR512
    if (paired_heads(a)) {
        for (int64_t h = 0; h < a->num_heads; h += 2) {
            prefetch_part(next, a->blk_stride, h, a->num_heads);
            weighted_sum_pair512(acc + h * a->head_dim, acc + (h + 1) * a->head_dim, scores + h * len + p0,
                                 scores + (h + 1) * len + p0, vb + (h / a->group) * a->head_dim, a->tok_stride, n,
                                 a->head_dim);
            prefetch_part(next, a->blk_stride, h + 1, a->num_heads);
        }
        return;
    }
#endif
#ifdef HAVE_WEIGHTED_SUM_PAIR
    if (paired_heads(a)) {
        for (int64_t h = 0; h < a->num_heads; h += 2) {
            prefetch_part(next, a->blk_stride, h, a->num_heads);
            weighted_sum_pair(acc + h * a->head_dim, acc + (h + 1) * a->head_dim, scores + h * len + p0,
                              scores + (h + 1) * len + p0, vb + (h / a->group) * a->head_dim, a->tok_stride, n, a->head_dim);
            prefetch_part(next, a->blk_stride, h + 1, a->num_heads);
        }
        return;
    }
#endif
    for (int64_t h = 0; h < a->num_heads; h++) {
        prefetch_part(next, a->blk_stride, h, a->num_heads);
        weighted_sum(acc + h * a->head_dim, scores + h * len + p0, vb + (h / a->group) * a->head_dim, a->tok_stride,
                     n, a->head_dim);
    }
}

/* The block read after sequence seqs[i]'s block `b` in attend_item's order (the shared blocks,
 * then each sequence's own blocks in turn), in `cache`; NULL after the last */
static inline const float *block_after(const decode_args *a, const float *cache, const int32_t *seqs, int64_t count,
                                       int64_t shared, int64_t i, int64_t b) {
    for (;;) {
        const int64_t s = seqs[i];
        if (b + 1 < num_blocks_of(a, s)) return cache + (int64_t)a->block_table[s * a->bt_stride + b + 1] * a->blk_stride;
        if (++i == count) return NULL;
        b = shared - 1; /* the next sequence's first own block, if it has one */
    }
}

/* One work item: `count` sequences (ids in `seqs`) whose first `shared` blocks are the same.
 * Two passes over each context: scores, then softmax and the weighted sum of V (no running
 * rescale). Returns 1 when scratch memory could not be allocated (nothing written). */
static int attend_item(const decode_args *a, const int32_t *seqs, int64_t count, int64_t shared) {
    const int64_t hd = a->num_heads * a->head_dim;
    size_t floats = (size_t)(count * a->num_heads);
    for (int64_t i = 0; i < count; i++) floats += (size_t)(a->num_heads * a->seq_lens[seqs[i]] + hd);
    /* per sequence: scores [num_heads][len], then its output accumulators [num_heads][head_dim];
     * after them, each sequence's 1 / softmax sum per head [count][num_heads] */
    float *scratch = malloc(sizeof(float) * floats);
    float **scores = malloc(sizeof(float *) * (size_t)count);
    if (scratch == NULL || scores == NULL) {
        free(scratch);
        free(scores);
        return 1;
    }
    int64_t off = 0;
    for (int64_t i = 0; i < count; i++) {
        scores[i] = scratch + off;
        off += a->num_heads * a->seq_lens[seqs[i]] + hd;
    }
    float *inv = scratch + off;
    const int32_t *lead = a->block_table + (int64_t)seqs[0] * a->bt_stride;

    /* K: the shared blocks once for the whole item, then each sequence's own blocks. Blocks are
     * scattered in the pool, so the next one is prefetched while this one is worked on; head by
     * head within a block, so each head's query stays in registers across the block's rows. */
    for (int64_t b = 0; b < shared; b++) {
        const float *next = block_after(a, a->k_cache, seqs, count, shared, 0, b);
        for (int64_t i = 0; i < count; i++) {
            prefetch_part(next, a->blk_stride, i, count);
            score_block(a, seqs[i], scores[i], b, lead[b], NULL);
        }
    }
    for (int64_t i = 0; i < count; i++) {
        const int64_t s = seqs[i], nb = num_blocks_of(a, s);
        const int32_t *table = a->block_table + s * a->bt_stride;
        for (int64_t b = shared; b < nb; b++)
            score_block(a, s, scores[i], b, table[b], block_after(a, a->k_cache, seqs, count, shared, i, b));
    }

    /* exp(score - max) in place; each head's 1 / sum is applied to its output at the end (one
     * multiply per output column instead of one per score). */
    for (int64_t i = 0; i < count; i++) {
        const int64_t len = a->seq_lens[seqs[i]];
        for (int64_t h = 0; h < a->num_heads; h++) {
            float *row = scores[i] + h * len;
            inv[i * a->num_heads + h] = 1.0f / softmax_exp(row, len);
        }
        memset(scores[i] + a->num_heads * len, 0, sizeof(float) * (size_t)hd);
    }

    /* V: the same order of blocks as K, each sequence's sum block by block as when alone */
    for (int64_t b = 0; b < shared; b++) {
        const float *next = block_after(a, a->v_cache, seqs, count, shared, 0, b);
        for (int64_t i = 0; i < count; i++) {
            const int64_t len = a->seq_lens[seqs[i]];
            prefetch_part(next, a->blk_stride, i, count);
            sum_block(a, seqs[i], scores[i], scores[i] + a->num_heads * len, b, lead[b], NULL);
        }
    }
    for (int64_t i = 0; i < count; i++) {
        const int64_t s = seqs[i], nb = num_blocks_of(a, s), len = a->seq_lens[s];
        const int32_t *table = a->block_table + s * a->bt_stride;
        float *acc = scores[i] + a->num_heads * len;
        for (int64_t b = shared; b < nb; b++)
            sum_block(a, s, scores[i], acc, b, table[b], block_after(a, a->v_cache, seqs, count, shared, i, b));
        for (int64_t h = 0; h < a->num_heads; h++) {
            float *dst = a->out + a->tokens[s] * a->out_tok_stride + h * a->out_head_stride;
            const float *src = acc + h * a->head_dim, w = inv[i * a->num_heads + h];
            for (int64_t c = 0; c < a->head_dim; c++) dst[c] = src[c] * w;
        }
    }
    free(scores);
    free(scratch);
    return 0;
}

/* Groups the sequences by their first block and splits them into work items (a group larger than
 * a thread's share is split, so every thread gets work); returns the number of items, or -1 when
 * memory could not be allocated. `order` [num_seqs] and `items` [num_seqs] are the caller's. */
static int64_t plan_items(const decode_args *a, int64_t num_seqs, int num_threads, int32_t *order, work_item *items) {
    seq_key *keys = malloc(sizeof(seq_key) * (size_t)num_seqs);
    if (keys == NULL) return -1;
    for (int64_t s = 0; s < num_seqs; s++) {
        keys[s].first = a->seq_lens[s] > 0 ? a->block_table[s * a->bt_stride] : -1;
        keys[s].seq = (int32_t)s;
    }
    qsort(keys, (size_t)num_seqs, sizeof(seq_key), by_first_block);
    for (int64_t s = 0; s < num_seqs; s++) order[s] = keys[s].seq;
    const int64_t most = num_threads > 1 ? (num_seqs + num_threads - 1) / num_threads : num_seqs;
    int64_t num_items = 0;
    for (int64_t g = 0; g < num_seqs;) {
        int64_t end = g + 1;
        while (end < num_seqs && keys[end].first == keys[g].first && keys[g].first >= 0) end++;
        for (int64_t start = g; start < end; start += most) {
            const int64_t count = end - start < most ? end - start : most;
            int64_t shared = 0;
            if (count > 1) {
                const int32_t *lead = a->block_table + (int64_t)order[start] * a->bt_stride;
                shared = num_blocks_of(a, order[start]);
                for (int64_t i = start + 1; i < start + count; i++) {
                    const int32_t *table = a->block_table + (int64_t)order[i] * a->bt_stride;
                    const int64_t nb = num_blocks_of(a, order[i]);
                    int64_t same = 0;
                    while (same < shared && same < nb && table[same] == lead[same]) same++;
                    shared = same;
                }
            }
            items[num_items++] = (work_item){start, count, shared};
        }
        g = end;
    }
    free(keys);
    return num_items;
}

typedef struct {
    const decode_args *a;
    const int32_t *order;
    const work_item *items;
    _Atomic int failed;
} shared_items;

static void attend_shared_item(void *ctx, int64_t w) {
    shared_items *j = ctx;
    if (attend_item(j->a, j->order + j->items[w].start, j->items[w].count, j->items[w].shared))
        atomic_store(&j->failed, 1);
}

/* Returns 0, or 1 when scratch memory could not be allocated (the caller raises). The items run on
 * `num_threads` OpenMP threads, or, with `pool`, shared with its helpers (`num_threads` is then the
 * number of workers to plan for: the caller and the helpers). */
int pagedserve_decode_attention_f32(
    const float *query, int64_t q_tok_stride, int64_t q_head_stride,
    const float *k_cache, const float *v_cache,
    float *out, int64_t out_tok_stride, int64_t out_head_stride,
    const int32_t *block_table, int64_t bt_stride,
    const int32_t *seq_lens, const int64_t *tokens, int64_t num_seqs,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    float scale, int num_threads, helper_pool *pool) {
    if (num_seqs <= 0) return 0;
    const decode_args a = {
        query, k_cache, v_cache, out, q_tok_stride, q_head_stride, out_tok_stride, out_head_stride,
        block_table, seq_lens, tokens, bt_stride, num_heads, num_heads / num_kv_heads, head_dim, block_size,
        num_kv_heads * head_dim, block_size * num_kv_heads * head_dim, scale,
    };
    int32_t *order = malloc(sizeof(int32_t) * (size_t)num_seqs);
    work_item *items = malloc(sizeof(work_item) * (size_t)num_seqs);
    const int64_t num_items = order && items ? plan_items(&a, num_seqs, num_threads, order, items) : -1;
    int failed = num_items < 0;
    if (!failed && pool != NULL) {
        shared_items job = {&a, order, items, 0};
        pagedserve_share(pool, attend_shared_item, &job, num_items);
        failed = atomic_load(&job.failed);
    } else if (!failed) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_threads > 1) reduction(| : failed)
        for (int64_t w = 0; w < num_items; w++)
            failed |= attend_item(&a, order + items[w].start, items[w].count, items[w].shared);
    }
    free(order);
    free(items);
    return failed;
}
