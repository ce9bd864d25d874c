/* logits.h — reductions over a row of logits (151936 wide for Qwen3): max, log-sum-exp, and the
 * KL divergence between two rows. These run once per scored token in eval and once per sampled
 * token, so they use a vectorisable exp (relative error < 2e-7) instead of libm's. */
#ifndef QUILL_LOGITS_H
#define QUILL_LOGITS_H

/* exp(x), clamped to [exp(-87), exp(88)] (above 88 the exponent field would overflow into the
 * sign: SwiGLU's silu(g) = g / (1 + exp(-g)) then went wrong for g < -88); auto-vectorises. */
static inline float fast_expf(float x) {
    if (x < -87.0f) x = -87.0f;
    if (x > 88.0f) x = 88.0f;
    /* n = nearest integer to x / ln 2, by the 1.5 * 2^23 trick (exact for |n| < 2^22; no libm) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f;                 /* ln 2, split for accuracy */
    r -= n * 1.428606765330187e-06f;
    /* exp(r) on [-ln2/2, ln2/2]: degree-6 Taylor/minimax polynomial */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union {
        float f;
        int i;
    } s = {.i = ((int)n + 127) << 23};
    return p * s.f;
}

/* max_i x[i] */
float logits_max(const float *x, int n);
/* log(sum_i exp(x[i])), computed stably around the maximum. */
float logits_logsumexp(const float *x, int n);
/* KL(P || Q) = sum p (log p - log q) for P = softmax(p_logits), Q = softmax(q_logits). */
double logits_kl(const float *p_logits, const float *q_logits, int n);

#endif
