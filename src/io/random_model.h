/* random_model.h — bit-exact random-weight Qwen3 checkpoints (../shared/spec/random-weights.md).
 *
 * Every value is a pure function of (tensor name, model seed, element index), so any range of
 * any tensor can be produced independently: files are written by many threads at once, and a
 * GPU path can build the same weights in memory without touching disk. */
#ifndef QUILL_RANDOM_MODEL_H
#define QUILL_RANDOM_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "io/config.h"
#include "io/safetensors.h"
#include "util/qerr.h"
#include "util/threadpool.h"

/* How a tensor's values are drawn (see the spec): norm 1 + 0.1x, embed 0.02x, linear 0.02x with
 * ~0.1% of values multiplied by 8. */
typedef enum RmKind { RM_NORM, RM_EMBED, RM_LINEAR } RmKind;

/* FNV-1a 64 of a NUL-terminated string. */
uint64_t rm_fnv1a64(const char *s);
/* The stream of a tensor: rm_fnv1a64(name) ^ seed. */
uint64_t rm_stream(const char *name, uint64_t seed);
/* Kind of a tensor from its name (`*norm.weight`, `*_proj.weight`, `model.embed_tokens.weight`,
 * `lm_head.weight`). Returns 0, or -1 when the name is none of those. */
int rm_kind_of(const char *name, RmKind *kind);

/* Element i (row-major) of a tensor of n elements as bf16 bits, computed one at a time by the
 * spec's formulas: the slow reference that rm_fill_range must match. */
uint16_t rm_element(uint64_t stream, RmKind kind, uint64_t n, uint64_t i);
/* Writes elements [begin, end) of a tensor of n elements to out[0 .. end-begin) as bf16 bits.
 * Requires begin <= end <= n. Never fails; safe to call from many threads on disjoint ranges. */
void rm_fill_range(uint16_t *out, uint64_t stream, RmKind kind, uint64_t n, uint64_t begin,
                   uint64_t end);
/* Fills a whole tensor NAME of the given shape (the caller's buffer holds prod(shape) bf16
 * values), exactly as rm_write_safetensors would write it, on the threads of pool (NULL: on the
 * calling thread only). Returns 0, or -1 with err set when the name has no known kind or the
 * shape is invalid. */
int rm_fill_tensor(uint16_t *out, const char *name, int ndim, const int64_t *shape, uint64_t seed,
                   ThreadPool *pool, QErr *err);

/* The architecture and seed of a preset: "tiny-qwen3" (seed 1), "small-qwen3" (seed 2),
 * "qwen3-0.6b" (seed 3), "qwen3-8b" (seed 4). seed may be NULL. Returns 0, or -1 with err
 * listing the preset names. */
int rm_preset(const char *name, QwenConfig *cfg, uint64_t *seed, QErr *err);
/* The preset names, comma-separated, for usage messages. */
const char *rm_preset_names(void);

/* The tensors of a Qwen3ForCausalLM with cfg's shapes, named as transformers names them
 * (lm_head.weight only when the embeddings are untied), all BF16, in no particular order.
 * Returns a malloc'd array of *n specs whose names are malloc'd too (free with
 * rm_specs_free), or NULL with err set. */
StSpec *rm_tensor_specs(const QwenConfig *cfg, size_t *n, QErr *err);
void rm_specs_free(StSpec *specs, size_t n);

/* Qwen3's generation_config.json defaults: do_sample, temperature 0.6, top_k 20, top_p 0.95,
 * eos [151645, 151643], pad 151643. */
void rm_gen_config(GenConfig *g);

/* Called from the calling thread of rm_write_safetensors after every batch of blocks (about every
 * 256 MB of file per two threads) with the bytes of tensor data written so far, and at the end
 * with done == total. */
typedef void (*RmProgress)(void *ctx, uint64_t done_bytes, uint64_t total_bytes);

/* Writes the random model of cfg and seed as the safetensors file PATH (metadata format=pt),
 * generating it with n_threads threads (<= 0: two per online CPU), writing with O_DIRECT where
 * the filesystem allows, and fsync'ing it. progress may be NULL. Returns 0, or -1 with err set
 * (the file is then removed; a full disk is reported before any data is written). */
int rm_write_safetensors(const char *path, const QwenConfig *cfg, uint64_t seed, int n_threads,
                         RmProgress progress, void *ctx, QErr *err);

#endif
