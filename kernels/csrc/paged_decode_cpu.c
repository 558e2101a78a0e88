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
 * Work item = one sequence, all its heads (threads split the sequences). Two passes over the
 * context: scores, then softmax and the weighted sum of V (no running rescale). AVX2 + FMA code
 * where the compiler targets it (four score rows at a time, a vectorized exp), plain C elsewhere. Only positions < seq_len are read, so
 * slots past a context that were never written (they may hold anything) never reach the output.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* y[0:n] += sum_i w[i] * x[i * stride : i * stride + n], the rows of one head in one block; the
 * common head sizes get a copy with the size fixed, so y stays in registers across the rows. */
#define WEIGHTED_SUM_FIXED(N)                                                                        \
    static inline void weighted_sum_##N(float *restrict y, const float *restrict w,                 \
                                        const float *restrict x, int64_t stride, int64_t rows) {    \
        float t[N];                                                                                  \
        for (int j = 0; j < N; j++) t[j] = y[j];                                                     \
        for (int64_t i = 0; i < rows; i++)                                                           \
            for (int j = 0; j < N; j++) t[j] += w[i] * x[i * stride + j];                            \
        for (int j = 0; j < N; j++) y[j] = t[j];                                                     \
    }
WEIGHTED_SUM_FIXED(32)
WEIGHTED_SUM_FIXED(64)
WEIGHTED_SUM_FIXED(128)

static inline void weighted_sum(float *restrict y, const float *restrict w, const float *restrict x,
                                int64_t stride, int64_t rows, int64_t n) {
    if (n == 32) return weighted_sum_32(y, w, x, stride, rows);
    if (n == 64) return weighted_sum_64(y, w, x, stride, rows);
    if (n == 128) return weighted_sum_128(y, w, x, stride, rows);
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < n; j++) y[j] += w[i] * x[i * stride + j];
}

/* A row of scores for one head: out[i] = scale * q . k[i * stride], i < n. With AVX2 and FMA,
 * four rows at a time (four independent accumulators, reduced together); else one by one. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline void score_rows(const float *restrict q, const float *restrict k, int64_t stride, int64_t n,
                              int64_t d, float scale, float *restrict out) {
    int64_t i = 0;
    if (d % 8 == 0) {
        const __m256 vscale = _mm256_set1_ps(scale);
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
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
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

static inline float exp_shifted(float *row, int64_t n, float max) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        row[i] = expf(row[i] - max);
        sum += row[i];
    }
    return sum;
}
#endif

static inline void prefetch_block(const float *block, int64_t floats) {
    for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(block + i, 0, 3);
}

/* Returns 0, or 1 when scratch memory could not be allocated (nothing is written then for the
 * sequence that failed; the caller raises). */
int pagedserve_decode_attention_f32(
    const float *query, int64_t q_tok_stride, int64_t q_head_stride,
    const float *k_cache, const float *v_cache,
    float *out, int64_t out_tok_stride, int64_t out_head_stride,
    const int32_t *block_table, int64_t bt_stride,
    const int32_t *seq_lens, const int64_t *tokens, int64_t num_seqs,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
    float scale, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t tok_stride = num_kv_heads * head_dim;
    const int64_t blk_stride = block_size * tok_stride;
    int failed = 0;

    /* One sequence per work item, all its heads at once: a block's K (and V) rows for every KV
     * head sit back to back in the pool, so each block is read as one contiguous stream. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_threads > 1) reduction(| : failed)
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t len = seq_lens[s];
        const int64_t tok = tokens[s];
        const int32_t *table = block_table + s * bt_stride;
        /* scores [num_heads][len], then the output accumulators [num_heads][head_dim] */
        float *scores = malloc(sizeof(float) * (size_t)(num_heads * len + num_heads * head_dim));
        if (scores == NULL) {
            failed |= 1;
            continue;
        }
        float *acc = scores + num_heads * len;
        const float *q = query + tok * q_tok_stride;

        /* Block by block (a block holds block_size rows of every KV head, back to back). Blocks
         * are scattered in the pool, so the next one is prefetched while this one is worked on.
         * Head by head within a block, so each head's query (K pass) or accumulators (V pass) stay
         * in registers across the block's rows. */
        const int64_t num_blocks = (len + block_size - 1) / block_size;
        for (int64_t b = 0; b < num_blocks; b++) {
            const float *kb = k_cache + (int64_t)table[b] * blk_stride;
            if (b + 1 < num_blocks) prefetch_block(k_cache + (int64_t)table[b + 1] * blk_stride, blk_stride);
            const int64_t p0 = b * block_size;
            const int64_t n = len - p0 < block_size ? len - p0 : block_size;
            for (int64_t h = 0; h < num_heads; h++)
                score_rows(q + h * q_head_stride, kb + (h / group) * head_dim, tok_stride, n, head_dim, scale,
                           scores + h * len + p0);
        }

        for (int64_t h = 0; h < num_heads; h++) {
            float *row = scores + h * len;
            float max = -INFINITY;
            for (int64_t i = 0; i < len; i++) max = row[i] > max ? row[i] : max;
            const float inv = 1.0f / exp_shifted(row, len, max);
            for (int64_t i = 0; i < len; i++) row[i] *= inv;
        }

        memset(acc, 0, sizeof(float) * (size_t)(num_heads * head_dim));
        for (int64_t b = 0; b < num_blocks; b++) {
            const float *vb = v_cache + (int64_t)table[b] * blk_stride;
            if (b + 1 < num_blocks) prefetch_block(v_cache + (int64_t)table[b + 1] * blk_stride, blk_stride);
            const int64_t p0 = b * block_size;
            const int64_t n = len - p0 < block_size ? len - p0 : block_size;
            for (int64_t h = 0; h < num_heads; h++)
                weighted_sum(acc + h * head_dim, scores + h * len + p0, vb + (h / group) * head_dim, tok_stride, n, head_dim);
        }

        for (int64_t h = 0; h < num_heads; h++)
            memcpy(out + tok * out_tok_stride + h * out_head_stride, acc + h * head_dim, sizeof(float) * (size_t)head_dim);
        free(scores);
    }
    return failed;
}
