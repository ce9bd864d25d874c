/* fp8.h — conversions between float8 e4m3 (the "fn" variant: no infinities, one NaN pattern per
 * sign; 4 exponent bits, bias 7, 3 mantissa bits; largest finite 448, smallest subnormal 2^-9)
 * and float32, for the fp8 KV cache (KvDtype KV_FP8). float -> e4m3 rounds to nearest even and
 * saturates at +-448 (NaN stays NaN), which is what the GPU's cvt.rn.satfinite.e4m3x2.f32 does,
 * so the CPU backend and the tests round exactly as the CUDA kernels do. e4m3 -> float is exact. */
#ifndef QUILL_FP8_H
#define QUILL_FP8_H

#include <math.h>
#include <stdint.h>

/* Rounds f to the nearest e4m3 value, ties to even; |f| >= 448 (and infinities) give +-448. */
static inline uint8_t fp8_e4m3_from_f32(float f) {
    const uint8_t sign = signbit(f) ? 0x80 : 0x00;
    if (isnan(f)) return sign | 0x7f;
    const float a = fabsf(f);
    if (a >= 448.0f) return sign | 0x7e;
    if (a < 0x1p-6f) /* subnormal: multiples of 2^-9, the code is the multiple (8 = 2^-6, normal) */
        return sign | (uint8_t)rintf(a * 512.0f);
    int e; /* a = m 2^e, m in [0.5, 1): a's binary exponent is e - 1, its step 2^(e - 4) */
    (void)frexpf(a, &e);
    const int q = (int)rintf(ldexpf(a, 4 - e)); /* 8 .. 16; 16 carries into the next exponent */
    return sign | (uint8_t)(((e - 1 + 7) << 3) + (q - 8));
}

/* The value of e4m3 code b (exact). */
static inline float fp8_e4m3_to_f32(uint8_t b) {
    const int e = (b >> 3) & 15, m = b & 7;
    float a;
    if (e == 15 && m == 7) a = NAN;
    else if (e == 0) a = ldexpf((float)m, -9);
    else a = ldexpf((float)(8 + m), e - 10);
    return b & 0x80 ? -a : a;
}

#endif
