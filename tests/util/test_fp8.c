/* test_fp8.c — util/fp8.h, the e4m3 rounding the fp8 KV cache stores with (and must share with
 * the GPU's cvt.rn.satfinite): every code decodes to its value and back (bar the two NaNs);
 * hand-computed ties to even in the subnormal, boundary and normal ranges; saturation at +-448;
 * NaN, zeros and signs; and a sweep of float32 values against a brute-force nearest-code search
 * (ties to the even code, at or beyond 448 the largest finite code), the midpoints between
 * neighbouring codes and the floats either side of each included. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../test_util.h"
#include "util/fp8.h"

/* The code nearest a >= 0 among the finite positive codes 0..0x7e, ties to the even code,
 * a >= 448 (or infinite) saturating to 0x7e; by search, not by formula. */
static uint8_t nearest_code(float a) {
    if (a >= 448.0f) return 0x7e;
    int best = 0;
    double best_d = INFINITY;
    for (int c = 0; c <= 0x7e; c++) {
        double d = fabs((double)fp8_e4m3_to_f32((uint8_t)c) - a);
        if (d < best_d || (d == best_d && c % 2 == 0)) best = c, best_d = d;
    }
    return (uint8_t)best;
}

static void check_sweep(float a) {
    uint8_t want = nearest_code(a), got = fp8_e4m3_from_f32(a), got_neg = fp8_e4m3_from_f32(-a);
    CHECK(got == want, "%.9g -> 0x%02x, want 0x%02x", a, got, want);
    CHECK(got_neg == (want | 0x80), "%.9g -> 0x%02x, want 0x%02x", -a, got_neg, want | 0x80);
}

int main(void) {
    /* every code: exact value, decoded and rounded back; finite codes strictly increasing */
    for (int b = 0; b < 256; b++) {
        float f = fp8_e4m3_to_f32((uint8_t)b);
        if ((b & 0x7f) == 0x7f) {
            CHECK(isnan(f), "code 0x%02x is NaN, got %g", b, f);
            continue;
        }
        CHECK(fp8_e4m3_from_f32(f) == b, "code 0x%02x = %g rounds back to 0x%02x", b, f, fp8_e4m3_from_f32(f));
        CHECK(!!signbit(f) == !!(b & 0x80), "code 0x%02x: sign of %g", b, f);
        if ((b & 0x7f) > 0)
            CHECK(fabsf(f) > fabsf(fp8_e4m3_to_f32((uint8_t)(b - 1))), "code 0x%02x above its predecessor", b);
    }
    /* values by the format: 1.0 = 0x38, largest finite 448 = 0x7e, smallest normal 2^-6 = 0x08,
     * largest subnormal 7 x 2^-9 = 0x07, smallest subnormal 2^-9 = 0x01 */
    const struct {
        uint8_t code;
        float value;
    } fixed[] = {{0x38, 1.0f}, {0x7e, 448.0f}, {0x08, 0x1p-6f}, {0x07, 7 * 0x1p-9f}, {0x01, 0x1p-9f},
                 {0x40, 2.0f}, {0x3c, 1.5f},   {0x00, 0.0f},   {0xb8, -1.0f},     {0xfe, -448.0f}};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        CHECK(fp8_e4m3_to_f32(fixed[i].code) == fixed[i].value, "code 0x%02x = %g, want %g", fixed[i].code,
              fp8_e4m3_to_f32(fixed[i].code), fixed[i].value);

    /* ties to even, worked by hand (step 2 in [16, 32), 2^-9 below 2^-5, 32 in [256, 448]) */
    const struct {
        float in, out;
    } ties[] = {
        {17.0f, 16.0f},                   /* 16 (mantissa 0) and 18 (1): even is 16 */
        {19.0f, 20.0f},                   /* 18 (1) and 20 (2) */
        {1.5f * 0x1p-9f, 2 * 0x1p-9f},    /* subnormals 1 and 2 x 2^-9 */
        {2.5f * 0x1p-9f, 2 * 0x1p-9f},    /* subnormals 2 and 3 x 2^-9 */
        {0.5f * 0x1p-9f, 0.0f},           /* half the smallest subnormal: to zero */
        {7.5f * 0x1p-9f, 0x1p-6f},        /* largest subnormal and smallest normal: to the normal */
        {8.5f * 0x1p-9f, 0x1p-6f},        /* 2^-6 (mantissa 0) and 9 x 2^-9 (1) */
        {9.5f * 0x1p-9f, 10 * 0x1p-9f},   /* 9 x 2^-9 (1) and 10 x 2^-9 (2) */
        {1.0625f, 1.0f},                  /* 1 and 1.125 */
        {1.1875f, 1.25f},                 /* 1.125 and 1.25 */
        {15.5f, 16.0f},                   /* 15 (mantissa 7) and 16: carries into the exponent */
        {432.0f, 448.0f},                 /* 416 (5) and 448 (6) */
        {400.0f, 384.0f},                 /* 384 (4) and 416 (5) */
    };
    for (size_t i = 0; i < sizeof ties / sizeof ties[0]; i++) {
        float got = fp8_e4m3_to_f32(fp8_e4m3_from_f32(ties[i].in));
        CHECK(got == ties[i].out, "%.9g -> %.9g, want %.9g", ties[i].in, got, ties[i].out);
        got = fp8_e4m3_to_f32(fp8_e4m3_from_f32(-ties[i].in));
        CHECK(got == -ties[i].out, "%.9g -> %.9g, want %.9g", -ties[i].in, got, -ties[i].out);
    }
    /* just past a tie goes to the far side; just past half the smallest subnormal is not zero */
    CHECK(fp8_e4m3_to_f32(fp8_e4m3_from_f32(nextafterf(17.0f, 18.0f))) == 18.0f, "17+ -> 18");
    CHECK(fp8_e4m3_from_f32(nextafterf(0x1p-10f, 1.0f)) == 0x01, "2^-10+ -> the smallest subnormal");
    CHECK(fp8_e4m3_from_f32(nextafterf(0x1p-10f, 0.0f)) == 0x00, "2^-10- -> 0");

    /* saturation: 448 and everything above, infinities included, give the largest finite value */
    const float big[] = {448.0f, 449.0f, 463.9f, 464.0f, 480.0f, 1e6f, 3e38f, INFINITY};
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++) {
        CHECK(fp8_e4m3_from_f32(big[i]) == 0x7e, "%g -> 0x%02x, want 0x7e", big[i], fp8_e4m3_from_f32(big[i]));
        CHECK(fp8_e4m3_from_f32(-big[i]) == 0xfe, "%g -> 0x%02x, want 0xfe", -big[i], fp8_e4m3_from_f32(-big[i]));
    }

    /* NaN stays NaN (with its sign); zeros keep theirs, and so do values that round to zero */
    CHECK(fp8_e4m3_from_f32(NAN) == 0x7f, "NaN -> 0x%02x", fp8_e4m3_from_f32(NAN));
    CHECK(fp8_e4m3_from_f32(-NAN) == 0xff, "-NaN -> 0x%02x", fp8_e4m3_from_f32(-NAN));
    CHECK(fp8_e4m3_from_f32(0.0f) == 0x00, "0 -> 0x%02x", fp8_e4m3_from_f32(0.0f));
    CHECK(fp8_e4m3_from_f32(-0.0f) == 0x80, "-0 -> 0x%02x", fp8_e4m3_from_f32(-0.0f));
    CHECK(fp8_e4m3_from_f32(-1e-30f) == 0x80, "-1e-30 -> 0x%02x", fp8_e4m3_from_f32(-1e-30f));
    CHECK(fp8_e4m3_to_f32(0x80) == 0.0f && signbit(fp8_e4m3_to_f32(0x80)), "0x80 is -0");

    /* the sweep: every midpoint between neighbouring codes and the floats either side of it,
     * every code's value, and float32 bit patterns from 0 to past 448 at an odd stride (down to
     * float32's own subnormals) */
    for (int c = 0; c < 0x7e; c++) {
        float lo = fp8_e4m3_to_f32((uint8_t)c), hi = fp8_e4m3_to_f32((uint8_t)(c + 1)), mid = (lo + hi) / 2;
        check_sweep(lo);
        check_sweep(mid);
        check_sweep(nextafterf(mid, 0.0f));
        check_sweep(nextafterf(mid, INFINITY));
    }
    int before = test_failed;
    for (uint32_t u = 0; u < 0x44000000u; u += 4099) {
        float a;
        memcpy(&a, &u, sizeof a);
        check_sweep(a);
        if (test_failed > before + 10) break; /* enough said */
    }
    return test_finish();
}
