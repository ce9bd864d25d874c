/* test_sampler.c — sampling rules on hand-made logits: greedy is argmax, seeds reproduce, top-k /
 * top-p / min-p only ever pick from the tokens they allow, penalties follow transformers' and
 * vLLM's formulas, and out-of-range parameters are refused naming the parameter. Also the exp
 * that the sampler shares with the CPU backend's softmax and SwiGLU (fast_expf). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "model/logits.h"
#include "model/sampler.h"

#define V 1000

static void fill(float *l) {
    for (int i = 0; i < V; i++) l[i] = (float)((i * 7919) % 1000) / 100.0f; /* max 9.99 at some id */
}

/* fast_expf: within 1e-6 of libm where float has range, clamped (finite) beyond; silu(g) =
 * g / (1 + exp(-g)) stays ~0 for very negative g (it went wrong below -88 before the clamp). */
static void test_fast_expf(void) {
    double worst = 0;
    for (float x = -87.0f; x <= 88.0f; x += 0.37f) worst = fmax(worst, fabs(fast_expf(x) / expf(x) - 1.0));
    CHECK(worst < 1e-6, "fast_expf relative error %.3g", worst);
    CHECK(isfinite(fast_expf(100.0f)) && fast_expf(100.0f) == fast_expf(88.0f), "fast_expf(100) = %g", fast_expf(100.0f));
    for (float g = -89.0f; g > -2000.0f; g *= 1.5f) {
        const float silu = g / (1.0f + fast_expf(-g));
        CHECK(silu <= 0.0f && silu > -1e-30f, "silu(%g) = %g", g, silu);
    }
}

int main(void) {
    test_fast_expf();
    Sampler *s = sampler_create(V);
    float l[V], c[V];
    fill(l);
    int best = 0;
    for (int i = 1; i < V; i++)
        if (l[i] > l[best]) best = i;
    Rng rng;
    SamplingParams g = sampling_greedy();
    rng_init(&rng, &g);
    memcpy(c, l, sizeof l);
    CHECK(sampler_sample(s, c, &g, NULL, 0, NULL, 0, &rng) == best, "greedy is argmax");

    /* Same seed, same sequence of draws. */
    SamplingParams p = sampling_greedy();
    p.temperature = 1.0f;
    p.has_seed = true;
    p.seed = 42;
    int a[20], b[20];
    for (int rep = 0; rep < 2; rep++) {
        rng_init(&rng, &p);
        for (int i = 0; i < 20; i++) {
            memcpy(c, l, sizeof l);
            (rep ? b : a)[i] = sampler_sample(s, c, &p, NULL, 0, NULL, 0, &rng);
        }
    }
    CHECK(!memcmp(a, b, sizeof a), "seeded sampling repeats");

    /* top-k 3: only the three largest logits ever come out. */
    p.top_k = 3;
    float top3 = 0;
    {
        float sorted[V];
        memcpy(sorted, l, sizeof l);
        for (int i = 0; i < 3; i++)
            for (int j = i + 1; j < V; j++)
                if (sorted[j] > sorted[i]) {
                    float t = sorted[i];
                    sorted[i] = sorted[j];
                    sorted[j] = t;
                }
        top3 = sorted[2];
    }
    int bad = 0;
    for (int i = 0; i < 300; i++) {
        memcpy(c, l, sizeof l);
        int t = sampler_sample(s, c, &p, NULL, 0, NULL, 0, &rng);
        bad += l[t] < top3;
    }
    CHECK(bad == 0, "top-k 3 picked outside the top 3 %d times", bad);

    /* top-p tiny: only the argmax. min-p 1: only the argmax. */
    p.top_k = 0;
    p.top_p = 1e-6f;
    bad = 0;
    for (int i = 0; i < 100; i++) {
        memcpy(c, l, sizeof l);
        bad += sampler_sample(s, c, &p, NULL, 0, NULL, 0, &rng) != best;
    }
    CHECK(bad == 0, "top-p 1e-6 must give the argmax (%d misses)", bad);
    p.top_p = 1;
    p.min_p = 1;
    bad = 0;
    for (int i = 0; i < 100; i++) {
        memcpy(c, l, sizeof l);
        bad += sampler_sample(s, c, &p, NULL, 0, NULL, 0, &rng) != best;
    }
    CHECK(bad == 0, "min-p 1 must give the argmax (%d misses)", bad);

    /* Penalties: repetition divides positive / multiplies negative logits once per seen token;
     * presence/frequency subtract per output occurrence. Checked through greedy choices. */
    float pl[V];
    for (int i = 0; i < V; i++) pl[i] = -5;
    pl[1] = 3.0f;
    pl[2] = 2.0f;
    SamplingParams r = sampling_greedy();
    r.repetition_penalty = 2.0f; /* token 1: 3 -> 1.5 < 2 */
    int32_t prompt[] = {1, 1, 1};
    memcpy(c, pl, sizeof pl);
    CHECK(sampler_sample(s, c, &r, prompt, 3, NULL, 0, &rng) == 2, "repetition penalty demotes a seen token");
    CHECK(fabsf(c[1] - 1.5f) < 1e-6f, "penalised once, not per occurrence (%g)", c[1]);
    r = sampling_greedy();
    r.frequency_penalty = 0.4f; /* token 1 seen 3 times in output: 3 - 1.2 = 1.8 < 2 */
    memcpy(c, pl, sizeof pl);
    CHECK(sampler_sample(s, c, &r, NULL, 0, prompt, 3, &rng) == 2, "frequency penalty scales with count");
    CHECK(fabsf(c[1] - 1.8f) < 1e-6f, "frequency: %g", c[1]);
    r = sampling_greedy();
    r.presence_penalty = 0.5f; /* 3 - 0.5 = 2.5 > 2: still token 1 */
    memcpy(c, pl, sizeof pl);
    CHECK(sampler_sample(s, c, &r, NULL, 0, prompt, 3, &rng) == 1 && fabsf(c[1] - 2.5f) < 1e-6f, "presence: %g", c[1]);

    /* logprobs: log-softmax, top list descending. */
    int32_t ids[5];
    float lps[5];
    float lp = sampler_logprob(s, l, best, 5, ids, lps);
    double z = 0;
    for (int i = 0; i < V; i++) z += exp(l[i]);
    CHECK(fabs(lp - (l[best] - log(z))) < 1e-5, "logprob %g vs %g", lp, l[best] - log(z));
    CHECK(ids[0] == best && lps[0] >= lps[1] && lps[1] >= lps[4], "top logprobs sorted");

    /* Validation names the parameter. */
    QErr err;
    SamplingParams v = sampling_greedy();
    v.top_p = 0;
    CHECK(sampling_validate(&v, V, &err) == -1 && strstr(err.msg, "top_p"), "top_p 0 refused: %s", err.msg);
    v = sampling_greedy();
    v.temperature = -1;
    CHECK(sampling_validate(&v, V, &err) == -1 && strstr(err.msg, "temperature"), "negative temperature refused");
    v = sampling_greedy();
    v.presence_penalty = 3;
    CHECK(sampling_validate(&v, V, &err) == -1 && strstr(err.msg, "presence_penalty"), "presence 3 refused");
    v = sampling_greedy();
    v.n_logit_bias = 1;
    v.logit_bias[0] = (LogitBias){V, 1.0f};
    CHECK(sampling_validate(&v, V, &err) == -1 && strstr(err.msg, "logit_bias"), "bias of id V refused");
    v.logit_bias[0] = (LogitBias){0, 100.5f};
    CHECK(sampling_validate(&v, V, &err) == -1 && strstr(err.msg, "logit_bias"), "bias 100.5 refused");
    v.logit_bias[0] = (LogitBias){0, -100.0f};
    CHECK(sampling_validate(&v, V, &err) == 0, "bias -100 accepted: %s", err.msg);

    /* Logit bias: added before the penalties and the choice, greedy or sampled; the host only. */
    SamplingParams lb = sampling_greedy();
    CHECK(!sampling_needs_host(&lb), "plain greedy runs on a device sampler");
    lb.n_logit_bias = 2;
    lb.logit_bias[0] = (LogitBias){1, -4.0f}; /* 3 -> -1 */
    lb.logit_bias[1] = (LogitBias){7, 6.5f};  /* -5 -> 1.5 < 2 */
    CHECK(sampling_needs_host(&lb), "a logit bias needs the host sampler");
    memcpy(c, pl, sizeof pl);
    CHECK(sampler_sample(s, c, &lb, NULL, 0, NULL, 0, &rng) == 2, "bias demotes the argmax");
    CHECK(fabsf(c[1] + 1.0f) < 1e-6f && fabsf(c[7] - 1.5f) < 1e-6f, "biases added: %g %g", c[1], c[7]);
    lb.logit_bias[1].bias = 100.0f;
    lb.temperature = 1.0f;
    bad = 0;
    for (int i = 0; i < 100; i++) {
        memcpy(c, pl, sizeof pl);
        bad += sampler_sample(s, c, &lb, NULL, 0, NULL, 0, &rng) != 7;
    }
    CHECK(bad == 0, "a +100 bias wins every sampled draw (%d misses)", bad);
    lb = sampling_greedy();
    lb.repetition_penalty = 2.0f;
    lb.n_logit_bias = 1;
    lb.logit_bias[0] = (LogitBias){2, 1.0f}; /* 2 + 1 = 3, then penalised: 1.5; token 1 (3, unseen) wins */
    memcpy(c, pl, sizeof pl);
    int32_t seen[] = {2};
    CHECK(sampler_sample(s, c, &lb, seen, 1, NULL, 0, &rng) == 1 && fabsf(c[2] - 1.5f) < 1e-6f,
          "bias before the repetition penalty (%g)", c[2]);
    sampler_free(s);
    return test_finish();
}
