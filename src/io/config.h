/* config.h — the model's config.json and generation_config.json, validated.
 *
 * Accepts both transformers 4.x keys (`rope_theta`, `torch_dtype`) and 5.x keys
 * (`rope_parameters.rope_theta`, `dtype`). Only Qwen3ForCausalLM / model_type "qwen3" is
 * accepted; anything else is refused by name. A `quantization_config` (see
 * ../shared/spec/int4-checkpoint.md) is read into the quant fields. */
#ifndef QUILL_CONFIG_H
#define QUILL_CONFIG_H

#include <stdbool.h>

#include "util/qerr.h"

#define CONFIG_MAX_EOS 8

typedef struct QwenConfig {
    int vocab_size;
    int hidden_size;
    int intermediate_size;
    int num_hidden_layers;
    int num_attention_heads;
    int num_key_value_heads;
    int head_dim;
    int max_position_embeddings;
    float rms_norm_eps;
    double rope_theta;
    bool tie_word_embeddings;
    int bos_token_id;
    int eos_token_ids[CONFIG_MAX_EOS];
    int n_eos;
    char dtype[16];               /* "bfloat16", "float32", ... */
    /* quantization_config (quant_method int4_weight_only) */
    bool quantized;
    int group_size;
    char quant_algorithm[16];     /* "hqq" or "minmax" */
    bool lm_head_quantized;       /* "lm_head" absent from modules_not_quantized */
} QwenConfig;

/* Sampling defaults and stop ids from generation_config.json. Fields absent from the file keep
 * the values gen_config_defaults() sets (do_sample false, i.e. greedy; temperature 1, top_p 1,
 * top_k 0 = off, min_p 0, repetition_penalty 1, no pad id). */
typedef struct GenConfig {
    bool do_sample;
    float temperature;
    float top_p;
    int top_k;
    float min_p;
    float repetition_penalty;
    int eos_token_ids[CONFIG_MAX_EOS];
    int n_eos;
    int pad_token_id;             /* -1 when absent */
} GenConfig;

/* Reads DIR/config.json. Returns 0, or -1 with err naming the file and field. Required: vocab_size,
 * hidden_size, intermediate_size, num_hidden_layers, num_attention_heads. Defaults as
 * transformers' Qwen3Config: num_key_value_heads = heads, head_dim = hidden / heads,
 * max_position_embeddings 32768, rms_norm_eps 1e-6, rope_theta 10000, tie_word_embeddings false,
 * dtype "bfloat16"; bos_token_id -1 and n_eos 0 when absent. Refused: another model_type or
 * architecture, rope scaling other than "default", hidden_act other than silu, attention_bias,
 * use_sliding_window, a quantization_config other than int4_weight_only. */
int config_load(QwenConfig *cfg, const char *dir, QErr *err);
/* The same for a config.json at an explicit PATH. */
int config_load_file(QwenConfig *cfg, const char *path, QErr *err);
/* Writes cfg as DIR/config.json in the key layout transformers 4.x uses for Qwen3-8B
 * (architectures, model_type, rope_theta, torch_dtype "bfloat16", ...), formatted as Python's
 * json.dumps(indent=2, sort_keys=True). Quant fields are not written (see below). Returns 0, or
 * -1 with err naming the file. */
int config_save(const QwenConfig *cfg, const char *dir, QErr *err);
/* Copies SRC_DIR/config.json to DST_DIR/config.json keeping every key, adding (or replacing) the
 * "quantization_config" object of ../shared/spec/int4-checkpoint.md. group_size must be 32, 64,
 * 128 or 256 and algorithm "hqq" or "minmax". SRC_DIR and DST_DIR may be the same. */
int config_save_quantized(const char *src_dir, const char *dst_dir, int group_size,
                          const char *algorithm, bool lm_head_quantized, QErr *err);

void gen_config_defaults(GenConfig *g);
/* Reads DIR/generation_config.json if present (absent is not an error: defaults + the config's
 * eos ids). Null fields count as absent. Returns -1 with err naming the file and field on a bad
 * type or range (temperature [0, 100], top_p (0, 1], top_k >= 0, min_p [0, 1],
 * repetition_penalty (0, 100]). */
int gen_config_load(GenConfig *g, const QwenConfig *cfg, const char *dir, QErr *err);
/* Writes DIR/generation_config.json like Qwen3's: bos_token_id (from cfg, if any), do_sample,
 * eos_token_id (as a list), pad_token_id (if any), temperature, top_k, top_p, and min_p /
 * repetition_penalty only when they differ from the defaults. */
int gen_config_save(const GenConfig *g, const QwenConfig *cfg, const char *dir, QErr *err);

#endif
