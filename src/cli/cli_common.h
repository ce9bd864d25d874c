/* cli_common.h — what the model-running commands (run, chat, bench, eval, serve) share: opening a
 * model on a device with its tokenizer and engine, parsing sampling flags, and reading numbers
 * from arguments with errors that name the flag. */
#ifndef QUILL_CLI_COMMON_H
#define QUILL_CLI_COMMON_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include <jansson.h>

#include "engine/engine.h"
#include "text/structured.h"
#include "text/tokenizer.h"

typedef struct Runtime {
    Backend *be;
    Model *model;
    Engine *engine;
    Tok *tok;           /* NULL when the model directory has no tokenizer.json */
    EngineOptions eopt;
    StructVocab *vocab; /* structured outputs' view of tok, made on first use (runtime_vocab) */
} Runtime;

/* Options every model command accepts. */
typedef struct RuntimeArgs {
    const char *device;  /* "cpu", "cuda" or NULL (cuda when available, else cpu) */
    int threads;         /* CPU threads (0: all) */
    int max_seqs;
    int max_model_len;   /* 0: the model's limit (capped at 32768) */
    int max_step_tokens; /* 0: 512, or with serve_steps vLLM serve's default on a GPU (8192 at
                            >= 70 GiB, else 2048; runtime_open) */
    bool serve_steps;
    bool embed_resident; /* EngineOptions.embed_resident */
    bool need_tokenizer;
    size_t kv_bytes;           /* KV-cache pool budget (0: the engine's default, 1 GiB) */
    bool kv_all_seqs;          /* EngineOptions.kv_all_seqs */
    double gpu_mem_util;       /* > 0: on a GPU, the KV pool fills the device up to this fraction */
    KvDtype kv_dtype;          /* --kv-cache-dtype (EngineOptions.kv_dtype) */
    bool no_prefix_caching;    /* turn automatic prefix caching off */
    bool every_logit;          /* EngineOptions.every_logit */
    const char *random_preset; /* build this preset's random weights in memory instead of a dir */
    bool random_bf16;          /* ... left in bf16 (default: quantized to int4) */
    int spec_tokens, spec_ngram_min, spec_ngram_max; /* EngineOptions' speculative decoding */
} RuntimeArgs;

/* Loads MODEL_DIR (or, with a->random_preset, random weights made in memory; model_dir is then
 * ignored). Returns 0, or -1 with err set (nothing left allocated). */
int runtime_open(Runtime *rt, const char *model_dir, const RuntimeArgs *a, QErr *err);
void runtime_close(Runtime *rt);
/* The structured-output table of rt's tokenizer (ends: the model's EOS ids), made once; NULL with
 * err without a tokenizer or memory. */
const StructVocab *runtime_vocab(Runtime *rt, QErr *err);

/* Parses a decimal int / float in [lo, hi] for flag `name`; -1 with err naming the flag. */
int parse_int(const char *name, const char *s, long lo, long hi, int *out, QErr *err);
int parse_float(const char *name, const char *s, double lo, double hi, float *out, QErr *err);

/* If argv[*i] is a sampling flag (--temperature/--temp, --top-k, --top-p, --min-p,
 * --repetition-penalty/--repeat-penalty, --presence-penalty, --frequency-penalty, --seed,
 * --greedy), consumes it (and its value), updates p and returns 1; returns 0 if it is not one;
 * -1 with err on a bad value. */
int parse_sampling_flag(int argc, char **argv, int *i, SamplingParams *p, QErr *err);

/* Parses a byte count with an optional K/M/G/T suffix (powers of 1024), e.g. "8G"; -1 with err
 * naming the flag. */
int parse_bytes(const char *name, const char *s, size_t *out, QErr *err);

/* If argv[*i] is --device, -t/--threads, --kv-cache-dtype (vLLM's: auto, or fp8 = fp8_e4m3) or
 * --speculative-config (vLLM's: {"method": "ngram", "num_speculative_tokens": K,
 * "prompt_lookup_max": N, "prompt_lookup_min": M}), consumes it and its value into a and returns
 * 1; returns 0 if it is not one; -1 with err on a missing or bad value. */
int parse_runtime_flag(int argc, char **argv, int *i, RuntimeArgs *a, QErr *err);
/* With speculative decoding on, adds the engine's counts so far to o (spec_draft_tokens,
 * spec_accepted_tokens); nothing otherwise. */
void spec_stats_json(const Runtime *rt, json_t *o);
/* For `run` and `chat`: a sampling flag (setting *sampling_set) or a runtime flag, as the two
 * functions above (1 consumed, 0 neither, -1 with err). */
int parse_generation_flag(int argc, char **argv, int *i, SamplingParams *sp, bool *sampling_set, RuntimeArgs *ra,
                          QErr *err);
/* The same for --random-weights PRESET and --dtype int4|bf16 (what those weights are). */
int parse_random_weights_flag(int argc, char **argv, int *i, RuntimeArgs *a, QErr *err);
/* 0 when exactly one of MODEL_DIR (dir) and --random-weights is given, else -1 with err. */
int check_model_source(const char *dir, const RuntimeArgs *a, QErr *err);

/* Peak resident memory of this process in bytes (since the last peak_rss_reset). */
uint64_t peak_rss_bytes(void);
/* Restarts the peak at the current resident size (Linux), e.g. after a benchmark's own probe. */
void peak_rss_reset(void);
/* Reads all of f (to EOF) into a malloc'd, NUL-terminated buffer; its length in *len. NULL on a
 * read error or out of memory (errno tells which). */
char *read_stream(FILE *f, size_t *len);

/* Seconds on a monotonic clock. */
double now_seconds(void);

#endif
