/* logits.c — see logits.h. Sums are kept in float lanes (vectorised) then reduced in double. */
#include "model/logits.h"

#include <math.h>

float logits_max(const float *x, int n) {
    float m = x[0];
    for (int i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

float logits_logsumexp(const float *x, int n) {
    float m = logits_max(x, n);
    if (!isfinite(m)) return m;
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += fast_expf(x[i + j] - m);
    double s = 0;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < n; i++) s += fast_expf(x[i] - m);
    return m + (float)log(s);
}

double logits_kl(const float *p_logits, const float *q_logits, int n) {
    float lp = logits_logsumexp(p_logits, n), lq = logits_logsumexp(q_logits, n);
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) {
            float a = p_logits[i + j] - lp, b = q_logits[i + j] - lq;
            acc[j] += fast_expf(a) * (a - b);
        }
    double s = 0;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < n; i++) {
        float a = p_logits[i] - lp, b = q_logits[i] - lq;
        s += fast_expf(a) * (a - b);
    }
    return s;
}
