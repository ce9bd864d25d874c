/* bf16.h — conversions between bfloat16 (stored as uint16_t, the top half of an IEEE float32)
 * and float32. Header-only and static inline because they sit in inner loops (embedding rows,
 * weight loading, scalar kernels). bf16 -> f32 is exact; f32 -> bf16 rounds to nearest even, the
 * rounding torch uses, so values we write match what transformers would have stored. */
#ifndef QUILL_BF16_H
#define QUILL_BF16_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Exact widening: every bf16 value (NaN and infinities included) is a float32. */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Rounds to the nearest bf16, ties to even. NaN stays NaN (made quiet, sign kept); values that
 * round past the largest finite bf16 become infinity, as in torch. */
static inline uint16_t f32_to_bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* dst[i] = bf16_to_f32(src[i]) for i < n (e.g. one embedding row). */
static inline void bf16_to_f32_row(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

#endif
