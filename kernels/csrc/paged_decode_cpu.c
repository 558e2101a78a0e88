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
 * Work item = (sequence, KV head): the H / HKV query heads that share the KV head are done
 * together, so each K and V row is read once per item. Two passes over the context: scores, then
 * softmax and the weighted sum of V (no running rescale). Only positions < seq_len are read, so
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
         * are scattered in the pool, so the next one is prefetched while this one is worked on. K:
         * row by row, every head of a row at once (a sequential read). V: head by head, so each
         * head's accumulators stay in registers across the block's rows. */
        const int64_t num_blocks = (len + block_size - 1) / block_size;
        for (int64_t b = 0; b < num_blocks; b++) {
            const float *kb = k_cache + (int64_t)table[b] * blk_stride;
            if (b + 1 < num_blocks) prefetch_block(k_cache + (int64_t)table[b + 1] * blk_stride, blk_stride);
            const int64_t p0 = b * block_size;
            const int64_t n = len - p0 < block_size ? len - p0 : block_size;
            for (int64_t i = 0; i < n; i++, kb += tok_stride)
                for (int64_t h = 0; h < num_heads; h++)
                    scores[h * len + p0 + i] = dot(q + h * q_head_stride, kb + (h / group) * head_dim, head_dim) * scale;
        }

        for (int64_t h = 0; h < num_heads; h++) {
            float *row = scores + h * len;
            float max = -INFINITY;
            for (int64_t i = 0; i < len; i++) max = row[i] > max ? row[i] : max;
            float sum = 0.0f;
            for (int64_t i = 0; i < len; i++) {
                row[i] = expf(row[i] - max);
                sum += row[i];
            }
            const float inv = 1.0f / sum;
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
