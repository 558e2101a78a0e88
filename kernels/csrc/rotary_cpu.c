/* Rotary position embedding on CPU, float32, in place: x = x * cos + rotate_half(x) * sin, where
 * rotate_half(x) = [-x[D/2:], x[:D/2]] (transformers' Llama form), for every head of every token.
 *
 * One pass over x instead of the six tensor ops (two products, a negation, a concatenation, a
 * sum, and the views between them) that write a new tensor each. The bits are those ops' bits:
 * every product and the sum round separately, as they do there, so the compiler must not fuse a
 * product into the sum (the library is otherwise built with -ffp-contract=fast).
 *   x         [T, H, D]  rows of H * D floats `token_stride` apart, each head's D contiguous
 *   cos, sin  [T, D]     contiguous
 */

#include <stdint.h>

#if defined(__clang__)
#define SEPARATE_ROUNDING
#else
#define SEPARATE_ROUNDING __attribute__((optimize("fp-contract=off")))
#endif

SEPARATE_ROUNDING void pagedserve_rotary_f32(float *restrict x, int64_t token_stride, const float *restrict cos,
                                             const float *restrict sin, int64_t tokens, int64_t heads,
                                             int64_t dim) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    const int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; t++) {
        const float *restrict c = cos + t * dim;
        const float *restrict s = sin + t * dim;
        for (int64_t h = 0; h < heads; h++) {
            float *restrict v = x + t * token_stride + h * dim;
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] + (-b) * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}
