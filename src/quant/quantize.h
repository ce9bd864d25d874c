/* quantize.h — turn a bf16 Qwen3 checkpoint directory into the int4 checkpoint of
 * ../shared/spec/int4-checkpoint.md (`quill quantize`). */
#ifndef QUILL_QUANTIZE_H
#define QUILL_QUANTIZE_H

#include <stdbool.h>
#include <stdint.h>

#include "quant/q4.h"
#include "util/qerr.h"

/* Where a run stands, passed to the progress callback after every tensor written. */
typedef struct QuantizeProgress {
    const char *tensor;      /* the source tensor just finished */
    int tensors_done, tensors_total;
    uint64_t weights_done;   /* weights of the quantized matrices finished so far */
    uint64_t weights_total;  /* ... and of all matrices to quantize */
} QuantizeProgress;

typedef void (*QuantizeProgressFn)(void *ctx, const QuantizeProgress *p);

typedef struct QuantizeOptions {
    int group_size;          /* 32, 64, 128 (default) or 256 */
    Q4Algorithm algorithm;   /* Q4_HQQ (default) or Q4_MINMAX */
    bool quantize_lm_head;   /* also quantize lm_head.weight (needs an untied lm_head) */
    int n_threads;           /* <= 0: one per online CPU */
    bool force;              /* replace a non-empty destination directory */
    uint64_t max_shard_bytes; /* tensor bytes per safetensors file; 0: 5 GB */
    QuantizeProgressFn progress; /* may be NULL */
    void *progress_ctx;
} QuantizeOptions;

/* What was done. */
typedef struct QuantizeReport {
    int n_quantized;         /* matrices quantized */
    uint64_t n_weights;      /* weights in them */
    double mean_rel_err;     /* mean over the matrices of ||dequant(q) - W|| / ||W|| */
    double max_rel_err;
    char worst[256];         /* the matrix with max_rel_err */
    int n_shards;            /* safetensors files written */
    uint64_t bytes_written;  /* tensor data in them */
} QuantizeReport;

/* Defaults: group 128, HQQ, lm_head kept in bf16, all CPUs, no force, 5 GB shards. */
void quantize_options_default(QuantizeOptions *o);

/* Quantizes every 2-D BF16 `*_proj.weight` of the checkpoint in SRC_DIR (plus lm_head.weight
 * when asked) and writes DST_DIR: each such NAME.weight replaced by NAME.qweight/.scales/.zeros,
 * every other tensor copied unchanged, model.safetensors (or 5 GB shards with
 * model.safetensors.index.json), config.json with its quantization_config, and the generation
 * and tokenizer files copied when present. Tensors are processed one at a time from the mapped
 * source, and pages already used are dropped, so memory stays near one matrix's worth.
 * Everything is checked before any work starts (a source already quantized, a non-BF16 matrix,
 * a group size that does not divide a matrix's in_features — each named). DST_DIR is written
 * through a staging directory (ckpt_dir.h), so on failure nothing appears under its name.
 * report may be NULL. Returns 0, or -1 with err set. */
int quantize_checkpoint(const char *src_dir, const char *dst_dir, const QuantizeOptions *opt,
                        QuantizeReport *report, QErr *err);

#endif
