/* cli_common.c — shared plumbing of the model-running commands; see cli_common.h. */
#include "cli/cli_common.h"

#include "io/assets.h"
#include "model/random_weights.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#ifdef QUILL_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

static Backend *open_backend(const RuntimeArgs *a, QErr *err) {
    const char *dev = a->device;
#ifdef QUILL_HAVE_CUDA
    if (!dev) dev = cuda_backend_available() ? "cuda" : "cpu";
    if (!strcmp(dev, "cuda")) return cuda_backend_create(0, err);
#else
    if (!dev) dev = "cpu";
    if (!strcmp(dev, "cuda")) {
        qerr_set(err, "--device cuda: this quill was built without the CUDA backend");
        return NULL;
    }
#endif
    if (!strcmp(dev, "cpu")) return cpu_backend_create(a->threads, err);
    qerr_set(err, "--device must be cpu or cuda (got '%s')", dev);
    return NULL;
}

/* vLLM serve's default step budget (max_num_batched_tokens) on a device whose backend reports
 * its memory (a GPU): a large one gets large prefill chunks (H100, qwen3-8b int4, 512 in / 256
 * out at concurrency 256: 8192 tokens per step 6234 output tok/s, 2048 4905 in an earlier run;
 * bench/RESULTS.md). The CPU keeps the engine's default, already a long step there. */
static int serve_step_tokens(Backend *be) {
    size_t total = 0;
    be->ops->mem_free(be, &total);
    return total >= (size_t)70 << 30 ? 8192 : 2048;
}

int runtime_open(Runtime *rt, const char *model_dir, const RuntimeArgs *a, QErr *err) {
    memset(rt, 0, sizeof *rt);
    QwenConfig cfg;
    GenConfig gen;
    StModel *random = NULL;
    if (a->random_preset) {
        if (!(random = random_weights_build(a->random_preset, !a->random_bf16, &cfg, &gen, err))) return -1;
        model_dir = NULL;
    } else if (config_load(&cfg, model_dir, err)) {
        return -1;
    }
    EngineOptions eo = engine_default_options(&cfg);
    if (a->max_seqs > 0) eo.max_seqs = a->max_seqs;
    if (a->max_step_tokens > 0) eo.max_step_tokens = a->max_step_tokens;
    eo.kv_bytes = a->kv_bytes;
    eo.kv_all_seqs = a->kv_all_seqs;
    eo.kv_mem_fraction = a->gpu_mem_util;
    eo.every_logit = a->every_logit;
    eo.prefix_caching = !a->no_prefix_caching;
    eo.embed_resident = a->embed_resident;
    eo.spec_tokens = a->spec_tokens;
    eo.spec_ngram_min = a->spec_ngram_min;
    eo.spec_ngram_max = a->spec_ngram_max;
    if (a->max_model_len > 0) {
        if (a->max_model_len > cfg.max_position_embeddings)
        {
            st_close(random);
            return qerr_set(err, "--max-model-len %d exceeds the model's max_position_embeddings %d", a->max_model_len,
                            cfg.max_position_embeddings);
        }
        eo.max_model_len = a->max_model_len;
    }
    if (!(rt->be = open_backend(a, err))) {
        st_close(random);
        return -1;
    }
    eo.kv_dtype = a->kv_dtype;
    if (a->max_step_tokens <= 0 && a->serve_steps && rt->be->ops->mem_free)
        eo.max_step_tokens = serve_step_tokens(rt->be);
    ModelOptions mo = engine_model_options(&eo, &cfg, rt->be->ops);
    rt->model = random ? model_create(&cfg, &gen, random, rt->be, &mo, a->random_preset, err)
                       : model_load(model_dir, rt->be, &mo, err);
    if (!rt->model) goto fail;
    if (!(rt->engine = engine_create(rt->model, &eo, err))) goto fail;
    /* The model's own tokenizer.json; for a Qwen3-vocabulary model without one (e.g. weights
     * only), the Qwen3 tokenizer that quill ships. */
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir ? model_dir : "");
    if (access(path, F_OK) != 0 && cfg.vocab_size == 151936 && assets_tokenizer_dir(path, sizeof path, err) == 0)
        strncat(path, "/tokenizer.json", sizeof path - strlen(path) - 1);
    if (access(path, F_OK) == 0 || a->need_tokenizer) {
        if (!(rt->tok = tok_load(path, err))) goto fail;
    }
    rt->eopt = eo;
    return 0;
fail:
    runtime_close(rt);
    return -1;
}

const StructVocab *runtime_vocab(Runtime *rt, QErr *err) {
    if (rt->vocab) return rt->vocab;
    if (!rt->tok) {
        qerr_set(err, "structured output (--json-object, --json-schema, --choice) needs the model's tokenizer.json");
        return NULL;
    }
    int32_t eos[2 * CONFIG_MAX_EOS];
    const int n = model_eos_ids(rt->model, eos);
    if (!(rt->vocab = struct_vocab_new(rt->tok, rt->model->cfg.vocab_size, eos, n))) qerr_set(err, "out of memory");
    return rt->vocab;
}

void runtime_close(Runtime *rt) {
    struct_vocab_free(rt->vocab);
    engine_free(rt->engine);
    model_free(rt->model);
    if (rt->be) rt->be->ops->destroy(rt->be);
    tok_free(rt->tok);
    memset(rt, 0, sizeof *rt);
}

int parse_int(const char *name, const char *s, long lo, long hi, int *out, QErr *err) {
    if (!s) return qerr_set(err, "%s needs a value", name);
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return qerr_set(err, "%s must be an integer in [%ld, %ld] (got '%s')", name, lo, hi, s);
    *out = (int)v;
    return 0;
}

int parse_float(const char *name, const char *s, double lo, double hi, float *out, QErr *err) {
    if (!s) return qerr_set(err, "%s needs a value", name);
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi)
        return qerr_set(err, "%s must be a number in [%g, %g] (got '%s')", name, lo, hi, s);
    *out = (float)v;
    return 0;
}

/* --logit-bias ID=BIAS, or llama.cpp's ID+BIAS / ID-BIAS: one more entry of p's logit bias (the
 * id's range is checked with the model's vocabulary when the request is added). */
static int parse_logit_bias(const char *name, const char *s, SamplingParams *p, QErr *err) {
    if (!s) return qerr_set(err, "%s needs a value such as 1000=-100", name);
    char *end;
    errno = 0;
    const long id = strtol(s, &end, 10);
    if (errno || end == s || id < 0 || id > INT32_MAX || (*end != '=' && *end != '+' && *end != '-'))
        return qerr_set(err, "%s must be TOKEN_ID=BIAS, e.g. 1000=-100 (got '%s')", name, s);
    float bias;
    if (parse_float(name, *end == '=' ? end + 1 : end, -100, 100, &bias, err)) return -1;
    if (p->n_logit_bias == SAMPLING_MAX_LOGIT_BIAS)
        return qerr_set(err, "%s: at most %d tokens", name, SAMPLING_MAX_LOGIT_BIAS);
    p->logit_bias[p->n_logit_bias++] = (LogitBias){(int32_t)id, bias};
    return 0;
}

int parse_sampling_flag(int argc, char **argv, int *i, SamplingParams *p, QErr *err) {
    const char *f = argv[*i];
    const char *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    int rc;
    if (!strcmp(f, "--greedy")) {
        *p = sampling_greedy();
        return 1;
    }
    if (!strcmp(f, "--temperature") || !strcmp(f, "--temp"))
        rc = parse_float(f, v, 0, 100, &p->temperature, err);
    else if (!strcmp(f, "--top-k"))
        rc = parse_int(f, v, -1, 1 << 30, &p->top_k, err);
    else if (!strcmp(f, "--top-p"))
        rc = parse_float(f, v, 1e-9, 1, &p->top_p, err);
    else if (!strcmp(f, "--min-p"))
        rc = parse_float(f, v, 0, 1, &p->min_p, err);
    else if (!strcmp(f, "--repetition-penalty") || !strcmp(f, "--repeat-penalty"))
        rc = parse_float(f, v, 1e-6, 100, &p->repetition_penalty, err);
    else if (!strcmp(f, "--presence-penalty"))
        rc = parse_float(f, v, -2, 2, &p->presence_penalty, err);
    else if (!strcmp(f, "--frequency-penalty"))
        rc = parse_float(f, v, -2, 2, &p->frequency_penalty, err);
    else if (!strcmp(f, "--logit-bias"))
        rc = parse_logit_bias(f, v, p, err);
    else if (!strcmp(f, "--seed")) {
        int s = 0;
        rc = parse_int(f, v, 0, 2147483647L, &s, err);
        p->seed = (uint64_t)s;
        p->has_seed = true;
    } else
        return 0;
    if (rc) return -1;
    (*i)++;
    return 1;
}

int parse_bytes(const char *name, const char *s, size_t *out, QErr *err) {
    if (!s) return qerr_set(err, "%s needs a value", name);
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    double mult = 1;
    switch (*end) {
    case 'K': case 'k': mult = 1024.0, end++; break;
    case 'M': case 'm': mult = 1024.0 * 1024, end++; break;
    case 'G': case 'g': mult = 1024.0 * 1024 * 1024, end++; break;
    case 'T': case 't': mult = 1024.0 * 1024 * 1024 * 1024, end++; break;
    default: break;
    }
    if (*end == 'i' || *end == 'B') end += *end == 'i' ? (end[1] == 'B' ? 2 : 1) : 1;
    if (errno || end == s || *end || !(v > 0) || v * mult > 1e15)
        return qerr_set(err, "%s must be a positive byte count such as 2147483648 or 8G (got '%s')", name, s);
    *out = (size_t)(v * mult);
    return 0;
}

int parse_generation_flag(int argc, char **argv, int *i, SamplingParams *sp, bool *sampling_set, RuntimeArgs *ra,
                          QErr *err) {
    int r = parse_sampling_flag(argc, argv, i, sp, err);
    if (r > 0) *sampling_set = true;
    return r ? r : parse_runtime_flag(argc, argv, i, ra, err);
}

/* --speculative-config's JSON into a's spec_* (N defaults to 4, M to 2, or N when only N is
 * given); -1 with err naming the key on anything else. */
static int parse_spec_config(const char *json, RuntimeArgs *a, QErr *err) {
    json_error_t je;
    json_t *c = json ? json_loads(json, 0, &je) : NULL;
    if (!json_is_object(c)) {
        json_decref(c);
        return qerr_set(err, "--speculative-config must be a JSON object, e.g. "
                             "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'");
    }
    int tokens = -1, n_max = 0, n_min = 0, rc = 0;
    const char *key;
    json_t *v;
    json_object_foreach(c, key, v) {
        int *dst = !strcmp(key, "num_speculative_tokens") ? &tokens
                   : !strcmp(key, "prompt_lookup_max")    ? &n_max
                   : !strcmp(key, "prompt_lookup_min")    ? &n_min
                                                          : NULL;
        if (!strcmp(key, "method")) {
            if (!json_is_string(v) || strcmp(json_string_value(v), "ngram"))
                rc = qerr_set(err, "--speculative-config: method must be \"ngram\" (drafts looked up in the text; "
                                   "draft models are not supported)");
        } else if (!dst) {
            rc = qerr_set(err, "--speculative-config: unknown key '%s' (method, num_speculative_tokens, "
                               "prompt_lookup_max, prompt_lookup_min)", key);
        } else if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 1024) {
            rc = qerr_set(err, "--speculative-config: %s must be a positive integer", key);
        } else {
            *dst = (int)json_integer_value(v);
        }
        if (rc) break;
    }
    const bool has_method = json_object_get(c, "method") != NULL;
    json_decref(c);
    if (rc) return rc;
    if (!has_method) return qerr_set(err, "--speculative-config needs \"method\": \"ngram\"");
    if (tokens < 1 || tokens > ENGINE_MAX_SPEC_TOKENS)
        return qerr_set(err, "--speculative-config: num_speculative_tokens must be 1..%d", ENGINE_MAX_SPEC_TOKENS);
    if (!n_max) n_max = n_min > 4 ? n_min : 4;
    if (!n_min) n_min = n_max < 2 ? n_max : 2;
    if (n_min > n_max)
        return qerr_set(err, "--speculative-config: prompt_lookup_min (%d) exceeds prompt_lookup_max (%d)", n_min, n_max);
    a->spec_tokens = tokens;
    a->spec_ngram_min = n_min;
    a->spec_ngram_max = n_max;
    return 0;
}

void spec_stats_json(const Runtime *rt, json_t *o) {
    if (!rt->eopt.spec_tokens) return;
    const EngineStats st = engine_stats(rt->engine);
    json_object_set_new(o, "spec_draft_tokens", json_integer((json_int_t)st.spec_draft_tokens));
    json_object_set_new(o, "spec_accepted_tokens", json_integer((json_int_t)st.spec_accepted_tokens));
}

int parse_runtime_flag(int argc, char **argv, int *i, RuntimeArgs *a, QErr *err) {
    const char *f = argv[*i], *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    if (!strcmp(f, "--speculative-config")) {
        if (parse_spec_config(v, a, err)) return -1;
    } else if (!strcmp(f, "--device")) {
        if (!v) return qerr_set(err, "--device needs a value (cpu or cuda)");
        a->device = v;
    } else if (!strcmp(f, "-t") || !strcmp(f, "--threads")) {
        if (parse_int(f, v, 0, 4096, &a->threads, err)) return -1;
    } else if (!strcmp(f, "--kv-cache-dtype")) {
        if (!v || (strcmp(v, "auto") && strcmp(v, "fp8") && strcmp(v, "fp8_e4m3")))
            return qerr_set(err, "--kv-cache-dtype must be auto, fp8 or fp8_e4m3 (got '%s')", v ? v : "nothing");
        a->kv_dtype = strcmp(v, "auto") ? KV_FP8 : KV_AUTO;
    } else {
        return 0;
    }
    (*i)++;
    return 1;
}

int parse_random_weights_flag(int argc, char **argv, int *i, RuntimeArgs *a, QErr *err) {
    const char *f = argv[*i], *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    if (!strcmp(f, "--random-weights")) {
        if (!v) return qerr_set(err, "--random-weights needs a preset name");
        a->random_preset = v;
    } else if (!strcmp(f, "--dtype")) {
        if (!v || (strcmp(v, "int4") && strcmp(v, "bf16")))
            return qerr_set(err, "--dtype must be int4 or bf16 (got '%s')", v ? v : "nothing");
        a->random_bf16 = !strcmp(v, "bf16");
    } else {
        return 0;
    }
    (*i)++;
    return 1;
}

int check_model_source(const char *dir, const RuntimeArgs *a, QErr *err) {
    if (!dir == !a->random_preset) return qerr_set(err, "give MODEL_DIR or --random-weights PRESET");
    return 0;
}

uint64_t peak_rss_bytes(void) {
    /* VmHWM honours peak_rss_reset(); getrusage is the fallback where /proc is missing. */
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    unsigned long long kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %llu kB", &kb) == 1) break;
    if (f) fclose(f);
    if (kb) return kb * 1024;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (uint64_t)ru.ru_maxrss * 1024;
}

void peak_rss_reset(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return;
    fputs("5", f);
    fclose(f);
}

char *read_stream(FILE *f, size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n + 1 >= cap) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) break;
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - 1 - n, f);
        n += got;
        if (got == 0) {
            if (ferror(f)) break;
            buf[n] = '\0';
            *len = n;
            return buf;
        }
    }
    free(buf);
    return NULL;
}

double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}
