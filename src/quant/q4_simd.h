/* q4_simd.h — vector helpers shared by the int4 quantizers (private to src/quant).
 *
 * Header-only and static inline because they sit in the quantizers' inner loops. Each helper has
 * the exact float semantics of the scalar code beside it (IEEE single operations, round half to
 * even), so the vector and scalar paths of a quantizer produce identical bits; the AVX2 versions
 * are compiled when the target has AVX2 (QUILL_NATIVE on x86), the scalar ones always. */
#ifndef QUILL_Q4_SIMD_H
#define QUILL_Q4_SIMD_H

#include <stdint.h>

#include "util/bf16.h"

#if defined(__AVX2__)
#include <immintrin.h>
#define Q4_AVX2 1

/* 8 bf16 values widened to float32. */
static inline __m256 q4v_load_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Rounds 8 floats to bf16 precision (nearest, ties to even), as f32_to_bf16_rne then
 * bf16_to_f32 do for every value but NaN (the callers never have NaNs). */
static inline __m256 q4v_round_bf16(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}

/* round-half-even then clamp to [0, 15]: torch.round(t).clamp(0, 15) */
static inline __m256 q4v_round_clamp(__m256 t) {
    __m256 q = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_min_ps(_mm256_max_ps(q, _mm256_setzero_ps()), _mm256_set1_ps(15.0f));
}

/* Packs 8 codes (floats holding 0..15) into 4 bytes: low nibble = even column. */
static inline void q4v_store_codes(uint8_t *dst, __m256 q) {
    __m256i qi = _mm256_cvtps_epi32(q);
    /* byte 0 of each 64-bit lane = even | odd << 4 */
    __m256i pair = _mm256_or_si256(qi, _mm256_srli_epi64(qi, 28));
    const __m256i pick = _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          -1, -1, -1, -1);
    __m256i b = _mm256_shuffle_epi8(pair, pick);
    uint32_t v = (uint32_t)_mm256_extract_epi16(b, 0) |
                 ((uint32_t)_mm256_extract_epi16(b, 8) << 16);
    dst[0] = (uint8_t)v;
    dst[1] = (uint8_t)(v >> 8);
    dst[2] = (uint8_t)(v >> 16);
    dst[3] = (uint8_t)(v >> 24);
}

/* The 8 codes of 4 packed bytes as floats 0..15. */
static inline __m256 q4v_load_codes(const uint8_t *src) {
    int32_t v = (int32_t)((uint32_t)src[0] | (uint32_t)src[1] << 8 | (uint32_t)src[2] << 16 |
                          (uint32_t)src[3] << 24);
    __m128i b = _mm_cvtsi32_si128(v);
    __m256i dup = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)); /* b0 b0 b1 b1 ... */
    __m256i q = _mm256_srlv_epi32(dup, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
    return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15)));
}
#endif

/* Min and max of a group of n bf16 weights (n a multiple of 32). Returns -1 when all are finite,
 * else the index of the first infinity or NaN (mn and mx are then unspecified). */
static inline int q4_group_minmax(const uint16_t *w, int n, float *mn, float *mx) {
#if defined(Q4_AVX2)
    const __m256i expo = _mm256_set1_epi16(0x7f80);
    __m256i bad = _mm256_setzero_si256();
    __m256 lo = q4v_load_bf16(w), hi = lo;
    for (int i = 0; i < n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(w + i));
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi16(_mm256_and_si256(h, expo), expo));
        __m256 a = q4v_load_bf16(w + i), b = q4v_load_bf16(w + i + 8);
        lo = _mm256_min_ps(lo, _mm256_min_ps(a, b));
        hi = _mm256_max_ps(hi, _mm256_max_ps(a, b));
    }
    if (!_mm256_testz_si256(bad, bad)) {
        for (int i = 0; i < n; i++)
            if ((w[i] & 0x7f80) == 0x7f80) return i;
    }
    float l[8], h[8];
    _mm256_storeu_ps(l, lo);
    _mm256_storeu_ps(h, hi);
    float a = l[0], b = h[0];
    for (int k = 1; k < 8; k++) {
        a = l[k] < a ? l[k] : a;
        b = h[k] > b ? h[k] : b;
    }
    *mn = a;
    *mx = b;
    return -1;
#else
    float a = bf16_to_f32(w[0]), b = a;
    for (int i = 0; i < n; i++) {
        if ((w[i] & 0x7f80) == 0x7f80) return i;
        float x = bf16_to_f32(w[i]);
        a = x < a ? x : a;
        b = x > b ? x : b;
    }
    *mn = a;
    *mx = b;
    return -1;
#endif
}

#endif
