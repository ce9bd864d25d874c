/* qwen3.h — the Qwen3 dense transformer: weights and the forward pass over one engine step.
 *
 * The graph is written once here against backend ops (src/backend/backend.h); backends differ
 * only in kernels and weight layouts. A step is a flat batch of tokens from several sequences
 * (prompt chunks and single decode tokens mixed), each with its own block table into the paged
 * KV cache that the model owns. Activations and scratch are allocated once at load for the
 * largest step, so the forward pass never allocates. */
#ifndef QUILL_QWEN3_H
#define QUILL_QWEN3_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "io/config.h"
#include "io/safetensors.h"

typedef struct LayerWeights {
    float *attn_norm;   /* [hidden] */
    Linear *qkv;        /* [(nh + 2*nkv) * hd][hidden] q|k|v stacked */
    float *q_norm;      /* [hd] */
    float *k_norm;      /* [hd] */
    Linear *o;          /* [hidden][nh * hd] */
    float *mlp_norm;    /* [hidden] */
    Linear *gate_up;    /* [2 * inter][hidden] gate|up stacked */
    Linear *down;       /* [hidden][inter] */
} LayerWeights;

typedef struct ModelOptions {
    int max_step_tokens;  /* largest number of tokens in one step (prompt chunk size) */
    int max_seqs;         /* largest number of sequences in one step */
    int max_logit_rows;   /* most rows of logits one step returns (0: max_step_tokens; the
                             model's copy holds the resolved value) */
    int max_ctx;          /* longest context (<= max_position_embeddings) */
    int kv_blocks;        /* KV pool size in blocks; 0: enough for max_seqs x max_ctx */
    double kv_mem_fraction; /* > 0, on a backend with mem_free: instead of kv_blocks, the pool takes
                               the device memory left after the weights and scratch up to this
                               fraction of the device (vLLM's --gpu-memory-utilization), at most
                               max_seqs x max_ctx */
    int block_size;       /* tokens per KV block (16) */
    KvDtype kv_dtype;     /* what the KV cache stores (KV_AUTO: the backend's own type) */
    bool embed_resident;  /* the embedding table in device memory (BackendOps.embedding_load) */
} ModelOptions;

typedef struct Model {
    QwenConfig cfg;
    GenConfig gen;
    Backend *be;          /* not owned */
    StModel *st;          /* the mmap'd checkpoint (weights may point into it) */
    Embedding *embed;
    Linear *lm_head;      /* tied: built from the embedding tensor */
    float *final_norm;
    LayerWeights *layers; /* [num_hidden_layers] */
    float *inv_freq;      /* [head_dim / 2] */
    ModelOptions opt;
    KVShape kv_shape;
    void *kv;
    /* scratch (device), sized for opt.max_step_tokens rows (logits: opt.max_logit_rows) */
    float *x, *xb, *qkv, *attn, *gate_up, *cs, *logits;
    int32_t *d_meta;      /* device copy of the step's metadata arrays */
    int32_t *h_meta;      /* host staging of the same */
} Model;

/* Loads DIR (config.json, generation_config.json, safetensors; bf16 or int4 checkpoint) onto
 * backend be. Validates every tensor's presence, dtype and shape against the config (missing or
 * extra tensors are errors naming them). Returns NULL with err set. */
Model *model_load(const char *dir, Backend *be, const ModelOptions *opt, QErr *err);
/* Builds a model from a checkpoint already open (files, or tensors made in memory such as
 * random weights for benchmarks). Takes ownership of st (closed on failure too); `name` is used
 * in error messages (the directory, or e.g. "random qwen3-8b"). */
Model *model_create(const QwenConfig *cfg, const GenConfig *gen, StModel *st, Backend *be, const ModelOptions *opt,
                    const char *name, QErr *err);
void model_free(Model *m);

/* Default options for a config: step of 512 tokens, 1 sequence, context = min(4096, max pos). */
ModelOptions model_default_options(const QwenConfig *cfg);

/* The ids that end generation, generation_config's then config.json's (duplicates possible), into
 * out; returns their count. Ids outside the vocabulary are left out (a small model with Qwen3's
 * generation_config has them): they can never be generated. */
int model_eos_ids(const Model *m, int32_t out[2 * CONFIG_MAX_EOS]);

/* Weight bytes one decode step must read: every tensor of the checkpoint except the embedding
 * table (only M rows of it are read), with the tied lm_head counted once. */
size_t model_weight_bytes_per_step(const Model *m);

/* One sequence's part of a step. */
typedef struct StepSeq {
    int n_tokens;                /* tokens of this sequence in the step (>= 1) */
    int ctx_len;                 /* tokens in its context after the step (>= n_tokens) */
    const int32_t *block_table;  /* host; ceil(ctx_len / block_size) entries used */
    bool all_logits;             /* logits for every token of the step (else only the last) */
    bool no_logits;              /* no logits at all (a prompt chunk that is not the last) */
} StepSeq;

typedef struct Step {
    int n_seqs;
    const StepSeq *seqs;
    const int32_t *tokens;       /* host, sum of n_tokens, in sequence order */
} Step;

/* Runs the step: writes its K/V to the cache and returns the device pointer to logits
 * [*n_rows][vocab] (rows in sequence order: every token of all_logits sequences, the last token
 * of the others, none for no_logits ones). The caller guarantees the step fits the options
 * (tokens <= max_step_tokens, seqs <= max_seqs, logit rows <= max_logit_rows, block tables
 * valid). */
float *model_forward(Model *m, const Step *step, int *n_rows);

#endif
