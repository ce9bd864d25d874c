/* sampler.h — choosing the next token from logits: greedy, temperature, top-k, top-p, min-p,
 * logit bias, repetition/presence/frequency penalties, seeded or not (as vLLM's sampler orders
 * them: logit bias, penalties, temperature, min-p, top-k, top-p). Runs on the host over one row of
 * logits. */
#ifndef QUILL_SAMPLER_H
#define QUILL_SAMPLER_H

#include <stdbool.h>
#include <stdint.h>

#include "io/config.h"
#include "util/qerr.h"

/* Entries of a logit bias at most (OpenAI's logit_bias: token id -> bias in [-100, 100]). */
#define SAMPLING_MAX_LOGIT_BIAS 300

typedef struct LogitBias {
    int32_t id;
    float bias;
} LogitBias;

typedef struct SamplingParams {
    float temperature;        /* 0: greedy (argmax) */
    int top_k;                /* <= 0: off */
    float top_p;              /* 1: off */
    float min_p;              /* 0: off */
    float repetition_penalty; /* 1: off; over prompt and output tokens (transformers' rule) */
    float presence_penalty;   /* 0: off; over output tokens */
    float frequency_penalty;  /* 0: off; over output tokens */
    bool has_seed;
    uint64_t seed;
    int n_logit_bias;         /* entries of logit_bias, added to the logits before anything else */
    LogitBias logit_bias[SAMPLING_MAX_LOGIT_BIAS];
} SamplingParams;

/* Greedy parameters (temperature 0, everything else off). */
SamplingParams sampling_greedy(void);
/* The defaults of a generation_config.json (greedy when do_sample is false). */
SamplingParams sampling_from_gen_config(const GenConfig *g);
/* Checks ranges (temperature >= 0, top_p in (0, 1], min_p in [0, 1], top_k >= -1,
 * repetition_penalty > 0, presence/frequency in [-2, 2], logit biases in [-100, 100] for ids in
 * [0, vocab)); err names the parameter. */
int sampling_validate(const SamplingParams *p, int vocab, QErr *err);

/* Whether p needs what only the host sampler does (penalties, a logit bias): device samplers
 * take the other parameters. */
static inline bool sampling_needs_host(const SamplingParams *p) {
    return p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f ||
           p->n_logit_bias > 0;
}

typedef struct Rng {
    uint64_t state;
} Rng;

/* Seeds from p->seed when has_seed, else from the clock and a counter. */
void rng_init(Rng *r, const SamplingParams *p);

/* The next uniform draw in [0, 1) from r (53 bits), e.g. for a device sampler. */
double rng_next(Rng *r);

/* Per-sequence sampling workspace for a vocabulary (one per concurrent sequence, or per thread). */
typedef struct Sampler Sampler;
Sampler *sampler_create(int vocab);
void sampler_free(Sampler *s);

/* Picks a token from logits[vocab] (modified in place). prompt/output are the sequence's tokens
 * so far (for penalties). Never fails: out-of-range parameters must be validated first. */
int32_t sampler_sample(Sampler *s, float *logits, const SamplingParams *p, const int32_t *prompt,
                       int n_prompt, const int32_t *output, int n_output, Rng *rng);

/* log-softmax of logits at token `id`, and optionally the n_top most likely tokens with their
 * log-probabilities (descending). Reads logits only; call before sampler_sample changes them. */
float sampler_logprob(Sampler *s, const float *logits, int32_t id, int n_top, int32_t *top_ids,
                      float *top_logprobs);

#endif
