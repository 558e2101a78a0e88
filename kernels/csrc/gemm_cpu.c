/* C = A @ W^T for float32 on one core, with W packed once into panels of 16 columns.
 *
 * The executor's linears multiply a few rows (a decode step's tokens) by each weight. MKL's
 * packed GEMM (kernels/packed_gemm.py) is fast where MKL takes its AVX-512 path, which it does on
 * Intel CPUs only; on an AVX-512 AMD CPU it runs its AVX2 code at about 85 GFLOP/s a core where
 * AVX-512 gives 105-115. This is the small kernel for that case: packed W is
 * [ceil(n / 16)][k][16] (panel p holds columns 16p .. 16p + 15 side by side for every inner index,
 * zero past n), and each output element is one FMA chain over the inner index in order
 * 0 .. k - 1. So a row's result does not depend on how many rows are multiplied with it, nor on
 * which column slice holds a column (the property packed_gemm's probe looks for).
 *
 * `pagedserve_gemm_compute` has the signature of MKL's cblas_sgemm_compute (row-major, A not
 * transposed, B packed, beta 0: the only form packed_gemm calls), so core_share.c's column-slice
 * sharing calls either one. */
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define PANEL 16
#define ROWS 8 /* rows of A per block: 8 rows x 2 panels = 16 accumulators of 32 registers */

int64_t pagedserve_gemm_pack_size(int n, int k) { return (int64_t)((n + PANEL - 1) / PANEL) * PANEL * k; }

/* w is n x k (row stride ldw); dst gets pagedserve_gemm_pack_size(n, k) floats. */
void pagedserve_gemm_pack(const float *w, int n, int k, int ldw, float *dst) {
    const int panels = (n + PANEL - 1) / PANEL;
    for (int p = 0; p < panels; p++) {
        float *out = dst + (int64_t)p * k * PANEL;
        for (int kk = 0; kk < k; kk++)
            for (int j = 0; j < PANEL; j++) {
                const int col = p * PANEL + j;
                out[(int64_t)kk * PANEL + j] = col < n ? w[(int64_t)col * ldw + kk] : 0.0f;
            }
    }
}

#ifdef __AVX512F__
/* R rows (1 .. ROWS) x NP panels (1 or 2) of C; `cols` valid columns in the last panel. */
static inline __attribute__((always_inline)) void block(const int R, const int NP, const float *a, int lda,
                                                        const float *b, int k, float *c, int ldc, int cols) {
    __m512 acc[ROWS][2];
    for (int r = 0; r < R; r++)
        for (int q = 0; q < NP; q++) acc[r][q] = _mm512_setzero_ps();
    const float *b1 = b + (int64_t)k * PANEL;
    for (int kk = 0; kk < k; kk++) {
        const __m512 w0 = _mm512_loadu_ps(b + (int64_t)kk * PANEL);
        const __m512 w1 = NP > 1 ? _mm512_loadu_ps(b1 + (int64_t)kk * PANEL) : w0;
        for (int r = 0; r < R; r++) {
            const __m512 x = _mm512_set1_ps(a[(int64_t)r * lda + kk]);
            acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
            if (NP > 1) acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
        }
    }
    const __mmask16 last = cols >= PANEL ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1u);
    for (int r = 0; r < R; r++) {
        float *row = c + (int64_t)r * ldc;
        if (NP > 1) {
            _mm512_storeu_ps(row, acc[r][0]);
            _mm512_mask_storeu_ps(row + PANEL, last, acc[r][1]);
        } else {
            _mm512_mask_storeu_ps(row, last, acc[r][0]);
        }
    }
}

#define ROW_CASES(NP)                                                  \
    switch (rows) {                                                    \
    case 8: block(8, NP, ap, lda, bp, k, cp, ldc, cols); break;        \
    case 7: block(7, NP, ap, lda, bp, k, cp, ldc, cols); break;        \
    case 6: block(6, NP, ap, lda, bp, k, cp, ldc, cols); break;        \
    case 5: block(5, NP, ap, lda, bp, k, cp, ldc, cols); break;        \
    case 4: block(4, NP, ap, lda, bp, k, cp, ldc, cols); break;        \
    case 3: block(3, NP, ap, lda, bp, k, cp, ldc, cols); break;        \
    case 2: block(2, NP, ap, lda, bp, k, cp, ldc, cols); break;        \
    default: block(1, NP, ap, lda, bp, k, cp, ldc, cols); break;       \
    }

int pagedserve_gemm_avx512(void) { return 1; }
#else
int pagedserve_gemm_avx512(void) { return 0; }
#endif

void pagedserve_gemm_compute(int layout, int transa, int transb, int m, int n, int k, const float *a, int lda,
                             const float *b, int ldb, float beta, float *c, int ldc) {
    (void)layout, (void)transa, (void)transb, (void)ldb, (void)beta;
    const int panels = (n + PANEL - 1) / PANEL;
#ifdef __AVX512F__
    /* two panels at a time; all row blocks of A against them while they are in cache */
    for (int p = 0; p < panels; p += 2) {
        const int np = p + 1 < panels ? 2 : 1;
        const int cols = n - (p + np - 1) * PANEL; /* valid columns of the last panel (>= 1) */
        const float *bp = b + (int64_t)p * k * PANEL;
        for (int r0 = 0; r0 < m; r0 += ROWS) {
            const int rows = m - r0 < ROWS ? m - r0 : ROWS;
            const float *ap = a + (int64_t)r0 * lda;
            float *cp = c + (int64_t)r0 * ldc + p * PANEL;
            if (np == 2) {
                ROW_CASES(2)
            } else {
                ROW_CASES(1)
            }
        }
    }
#else
    /* portable: the same FMA chain per element, left to the compiler to vectorize */
    float acc[PANEL];
    for (int p = 0; p < panels; p++) {
        const float *bp = b + (int64_t)p * k * PANEL;
        const int cols = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
        for (int r = 0; r < m; r++) {
            const float *row = a + (int64_t)r * lda;
            memset(acc, 0, sizeof(acc));
            for (int kk = 0; kk < k; kk++)
                for (int j = 0; j < PANEL; j++) acc[j] = __builtin_fmaf(row[kk], bp[(int64_t)kk * PANEL + j], acc[j]);
            memcpy(c + (int64_t)r * ldc + p * PANEL, acc, (size_t)cols * sizeof(float));
        }
    }
#endif
}
