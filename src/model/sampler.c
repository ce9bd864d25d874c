/* sampler.c — next-token choice on the host. The vocabulary is large (151936), so everything
 * avoids a full sort: greedy is one argmax pass; top-k selects with a bounded heap; top-p looks
 * at the best few hundred candidates first and widens only if they do not cover the mass. */
#include "model/sampler.h"

#include "model/logits.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct Sampler {
    int vocab;
    int32_t *idx;    /* candidate ids */
    int32_t *count;  /* per-token occurrence counts, zero between calls */
    float *prob;     /* candidate probabilities */
};

SamplingParams sampling_greedy(void) {
    return (SamplingParams){.temperature = 0, .top_k = 0, .top_p = 1, .min_p = 0, .repetition_penalty = 1};
}

SamplingParams sampling_from_gen_config(const GenConfig *g) {
    SamplingParams p = sampling_greedy();
    if (g->do_sample) {
        p.temperature = g->temperature;
        p.top_k = g->top_k;
        p.top_p = g->top_p;
        p.min_p = g->min_p;
    }
    p.repetition_penalty = g->repetition_penalty;
    return p;
}

int sampling_validate(const SamplingParams *p, int vocab, QErr *err) {
    if (!(p->temperature >= 0) || !isfinite(p->temperature))
        return qerr_set(err, "temperature must be a number >= 0 (got %g)", p->temperature);
    if (!(p->top_p > 0 && p->top_p <= 1)) return qerr_set(err, "top_p must be in (0, 1] (got %g)", p->top_p);
    if (!(p->min_p >= 0 && p->min_p <= 1)) return qerr_set(err, "min_p must be in [0, 1] (got %g)", p->min_p);
    if (p->top_k < -1) return qerr_set(err, "top_k must be -1, 0 (off) or a positive count (got %d)", p->top_k);
    if (!(p->repetition_penalty > 0) || !isfinite(p->repetition_penalty))
        return qerr_set(err, "repetition_penalty must be > 0 (got %g)", p->repetition_penalty);
    if (!(p->presence_penalty >= -2 && p->presence_penalty <= 2))
        return qerr_set(err, "presence_penalty must be in [-2, 2] (got %g)", p->presence_penalty);
    if (!(p->frequency_penalty >= -2 && p->frequency_penalty <= 2))
        return qerr_set(err, "frequency_penalty must be in [-2, 2] (got %g)", p->frequency_penalty);
    if (p->n_logit_bias < 0 || p->n_logit_bias > SAMPLING_MAX_LOGIT_BIAS)
        return qerr_set(err, "logit_bias has %d entries (at most %d)", p->n_logit_bias, SAMPLING_MAX_LOGIT_BIAS);
    for (int i = 0; i < p->n_logit_bias; i++) {
        const LogitBias *b = &p->logit_bias[i];
        if (b->id < 0 || b->id >= vocab)
            return qerr_set(err, "logit_bias: token id %d is outside the vocabulary [0, %d)", b->id, vocab);
        if (!(b->bias >= -100 && b->bias <= 100))
            return qerr_set(err, "logit_bias: the bias of token %d must be in [-100, 100] (got %g)", b->id, b->bias);
    }
    return 0;
}

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void rng_init(Rng *r, const SamplingParams *p) {
    static uint64_t counter;
    if (p->has_seed) {
        r->state = p->seed;
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        r->state = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 32) ^
                   (__atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED) * 0xD1B54A32D192ED03ull);
    }
}

double rng_next(Rng *r) { return (double)(splitmix64(&r->state) >> 11) * 0x1.0p-53; }

Sampler *sampler_create(int vocab) {
    Sampler *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->vocab = vocab;
    s->idx = malloc((size_t)vocab * sizeof *s->idx);
    s->count = calloc((size_t)vocab, sizeof *s->count);
    s->prob = malloc((size_t)vocab * sizeof *s->prob);
    if (!s->idx || !s->count || !s->prob) {
        sampler_free(s);
        return NULL;
    }
    return s;
}

void sampler_free(Sampler *s) {
    if (!s) return;
    free(s->idx);
    free(s->count);
    free(s->prob);
    free(s);
}

static int32_t argmax(const float *x, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static void apply_penalties(Sampler *s, float *logits, const SamplingParams *p, const int32_t *prompt,
                            int n_prompt, const int32_t *output, int n_output) {
    if (p->repetition_penalty != 1.0f) {
        /* transformers' rule: every token seen once in prompt or output is penalised once. */
        for (int pass = 0; pass < 2; pass++) {
            const int32_t *ids = pass ? output : prompt;
            int n = pass ? n_output : n_prompt;
            for (int i = 0; i < n; i++) {
                int32_t t = ids[i];
                if (s->count[t]) continue;
                s->count[t] = 1;
                logits[t] = logits[t] > 0 ? logits[t] / p->repetition_penalty : logits[t] * p->repetition_penalty;
            }
        }
        for (int pass = 0; pass < 2; pass++) {
            const int32_t *ids = pass ? output : prompt;
            int n = pass ? n_output : n_prompt;
            for (int i = 0; i < n; i++) s->count[ids[i]] = 0;
        }
    }
    if (p->presence_penalty != 0 || p->frequency_penalty != 0) {
        for (int i = 0; i < n_output; i++) s->count[output[i]]++;
        for (int i = 0; i < n_output; i++) {
            int32_t t = output[i];
            if (!s->count[t]) continue;
            logits[t] -= p->frequency_penalty * (float)s->count[t] + p->presence_penalty;
            s->count[t] = 0;
        }
    }
}

/* Moves the k largest logits (by value) to idx[0..k-1], sorted descending: quickselect over
 * indices, then a sort of the k winners. */
static int cmp_desc(const void *a, const void *b, void *base) {
    const float *v = base;
    float x = v[*(const int32_t *)a], y = v[*(const int32_t *)b];
    return (x < y) - (x > y);
}

static void select_top(int32_t *idx, int n, int k, const float *v) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = v[idx[(lo + hi) / 2]];
        int i = lo, j = hi;
        while (i <= j) {
            while (v[idx[i]] > pivot) i++;
            while (v[idx[j]] < pivot) j--;
            if (i <= j) {
                int32_t t = idx[i];
                idx[i] = idx[j];
                idx[j] = t;
                i++;
                j--;
            }
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            break;
    }
    qsort_r(idx, (size_t)k, sizeof *idx, cmp_desc, (void *)v);
}

int32_t sampler_sample(Sampler *s, float *logits, const SamplingParams *p, const int32_t *prompt, int n_prompt,
                       const int32_t *output, int n_output, Rng *rng) {
    int V = s->vocab;
    for (int i = 0; i < p->n_logit_bias; i++) logits[p->logit_bias[i].id] += p->logit_bias[i].bias;
    apply_penalties(s, logits, p, prompt, n_prompt, output, n_output);
    if (p->temperature == 0 || p->top_k == 1) return argmax(logits, V);

    /* Candidates: all tokens, narrowed by top-k; softmax at the temperature. */
    int n = V;
    for (int i = 0; i < V; i++) s->idx[i] = i;
    int k = p->top_k > 0 && p->top_k < V ? p->top_k : 0;
    bool need_sorted = k > 0 || p->top_p < 1;
    if (need_sorted) {
        /* For top-p alone, a few hundred best tokens usually hold the mass; widen if not. */
        int want = k ? k : (V < 512 ? V : 512);
        for (;;) {
            select_top(s->idx, V, want, logits);
            if (k || want == V) break;
            float mx = logits[s->idx[0]], inv_t = 1.0f / p->temperature;
            double z = 0, top = 0;
            for (int i = 0; i < V; i++) z += fast_expf((logits[i] - mx) * inv_t);
            for (int i = 0; i < want; i++) top += fast_expf((logits[s->idx[i]] - mx) * inv_t);
            if (top / z >= p->top_p) break;
            want = want * 4 < V ? want * 4 : V;
        }
        n = want;
    }
    float mx = logits[need_sorted ? s->idx[0] : argmax(logits, V)];
    double z = 0;
    if (need_sorted && !k) {
        for (int i = 0; i < V; i++) z += fast_expf((logits[i] - mx) / p->temperature);
    } else {
        for (int i = 0; i < n; i++) z += fast_expf((logits[s->idx[i]] - mx) / p->temperature);
    }
    for (int i = 0; i < n; i++) s->prob[i] = (float)(fast_expf((logits[s->idx[i]] - mx) / p->temperature) / z);

    /* min-p: drop tokens below min_p x the top probability (the ratio is the same whether
     * probabilities are normalised over the candidates or the whole vocabulary). */
    float top_prob = 0;
    for (int i = 0; i < n; i++)
        if (s->prob[i] > top_prob) top_prob = s->prob[i];
    if (p->min_p > 0) {
        int w = 0;
        for (int i = 0; i < n; i++)
            if (s->prob[i] >= p->min_p * top_prob) s->idx[w] = s->idx[i], s->prob[w++] = s->prob[i];
        n = w;
    }
    /* top-p over the (sorted) candidates: keep the smallest prefix whose mass reaches top_p of
     * every surviving token's mass. Without top-k the candidates are only a window of the best
     * tokens, so the survivors' mass is summed over the whole vocabulary. */
    if (p->top_p < 1) {
        double total = 0, cum = 0;
        if (!k) {
            float thr = p->min_p * top_prob;
            for (int i = 0; i < V; i++) {
                float pi = (float)(fast_expf((logits[i] - mx) / p->temperature) / z);
                if (pi >= thr) total += pi;
            }
        } else {
            for (int i = 0; i < n; i++) total += s->prob[i];
        }
        int keep = n;
        for (int i = 0; i < n; i++) {
            cum += s->prob[i];
            if (cum >= p->top_p * total) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
    }
    double total = 0;
    for (int i = 0; i < n; i++) total += s->prob[i];
    double r = rng_next(rng) * total, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += s->prob[i];
        if (r < acc) return s->idx[i];
    }
    return s->idx[n - 1];
}

float sampler_logprob(Sampler *s, const float *logits, int32_t id, int n_top, int32_t *top_ids, float *top_logprobs) {
    int V = s->vocab;
    float lse = logits_logsumexp(logits, V);
    if (n_top > 0) {
        if (n_top > V) n_top = V;
        for (int i = 0; i < V; i++) s->idx[i] = i;
        select_top(s->idx, V, n_top, logits);
        for (int i = 0; i < n_top; i++) {
            top_ids[i] = s->idx[i];
            top_logprobs[i] = logits[s->idx[i]] - lse;
        }
    }
    return logits[id] - lse;
}
