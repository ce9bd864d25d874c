/* backend.h — the seam between the model graph (written once, in src/model) and the machines it
 * runs on. A backend is a small table of coarse operations plus an opaque context (ggml's
 * backend interface, Redis's ae.c): memory, weights, and the handful of kernels a Qwen3 layer
 * needs. The CPU backend is always built; the CUDA backend when nvcc is present.
 *
 * Conventions for every op:
 *  - "device" pointers come from be->ops->alloc (on the CPU they are ordinary memory);
 *  - activations are float32, row-major, [M tokens][width];
 *  - ops are asynchronous on devices that can be (CUDA): results are visible to to_host() and to
 *    later ops, in issue order; sync() waits for everything;
 *  - ops do not fail: arguments are validated by the model graph, allocation happens at load. */
#ifndef QUILL_BACKEND_H
#define QUILL_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/safetensors.h"
#include "model/sampler.h"
#include "util/qerr.h"

typedef struct Backend Backend;
typedef struct Linear Linear;       /* a weight matrix W[N][K] in the backend's own layout */
typedef struct Embedding Embedding; /* the token embedding table [vocab][hidden] */

/* Where a linear layer's weights come from (host memory, e.g. the mmap'd checkpoint). */
typedef struct LinearSource {
    const char *name;       /* for error messages */
    int64_t n, k;           /* out_features, in_features */
    bool q4;                /* int4: codes/scales/zeros; else dense */
    const StTensor *dense;  /* BF16/F16/F32 [n][k] */
    const StTensor *qweight, *scales, *zeros; /* U8 [n][k/2], BF16 [n][k/g] x2 */
    int group_size;
} LinearSource;

/* What the KV cache stores per value. KV_AUTO: the backend's own type (kv_value_bytes: float32
 * on the CPU, bf16 on CUDA). KV_FP8: float8 e4m3 with a unit scale (vLLM's --kv-cache-dtype fp8
 * without calibrated scales), each K and V value rounded to nearest even and saturated at +-448
 * (util/fp8.h), one byte: half a bf16 cache's memory and half the bytes decode attention reads. */
typedef enum KvDtype { KV_AUTO = 0, KV_FP8 = 1 } KvDtype;

/* Shape of the paged KV cache: per layer, K and V pools of n_blocks x block_size token slots,
 * each n_kv_heads x head_dim values of type dtype. Blocks are numbered 0..n_blocks-1 and shared
 * by all layers. */
typedef struct KVShape {
    int n_layers, n_blocks, block_size, n_kv_heads, head_dim;
    KvDtype dtype;
} KVShape;

/* Per-step attention metadata (device pointers). The step's tokens form one flat batch; the
 * tokens of sequence s are rows q_start[s] .. q_start[s+1]-1, and are the last tokens of a
 * context of ctx_len[s] tokens (the earlier ones in the cache, the step's own stored there by the
 * attention op). Query at flat row t of seq s has position ctx_len[s] - (q_start[s+1] - t) and
 * attends causally to positions 0..itself. block_tables[s * max_blocks + j] is the pool block
 * holding positions j*block_size .. (j+1)*block_size-1 of sequence s. */
typedef struct AttnMeta {
    int n_seqs;
    int n_tokens;
    int max_blocks;      /* row stride of block_tables */
    int max_ctx;         /* max over ctx_len (host value, for kernel planning) */
    int max_q;           /* max tokens of one sequence in this step (host value) */
    const int32_t *q_start;      /* [n_seqs + 1] */
    const int32_t *ctx_len;      /* [n_seqs] */
    const int32_t *block_tables; /* [n_seqs][max_blocks] */
    const int32_t *positions;    /* [n_tokens] */
    const int32_t *slots;        /* [n_tokens] block * block_size + offset */
    const int32_t *logit_rows;   /* [n_logit_rows] flat rows whose logits are wanted */
    int n_logit_rows;
} AttnMeta;

/* A layer's attention heads: counts, head size, and the q / k RMSNorm (weights [head_dim] on the
 * backend, eps). */
typedef struct AttnHeads {
    int nh, nkv, hd;
    const float *q_norm, *k_norm;
    float eps;
} AttnHeads;

typedef struct BackendOps {
    const char *name;
    int kv_value_bytes; /* bytes of one cached K or V value of dtype KV_AUTO (KV_FP8: 1) */
    void (*destroy)(Backend *be);

    /* memory */
    void *(*alloc)(Backend *be, size_t bytes); /* NULL when out of memory */
    void (*free)(Backend *be, void *p);
    void (*to_device)(Backend *be, void *dst, const void *src, size_t bytes);
    void (*to_host)(Backend *be, void *dst, const void *src, size_t bytes);
    void (*sync)(Backend *be);
    /* Device bytes in use now and at peak (weights, KV, scratch); 0 if unknown. */
    size_t (*mem_used)(Backend *be, size_t *peak);

    /* weights (loaded once; may keep pointers into the source if it outlives the backend) */
    /* One Linear from n_parts sources of equal k stacked along n (q|k|v, gate|up). */
    Linear *(*linear_load)(Backend *be, const LinearSource *parts, int n_parts, QErr *err);
    void (*linear_free)(Backend *be, Linear *w);
    /* A float32 device copy of a 1-D bf16/f16/f32 tensor of n elements (norm weights). */
    float *(*vector_load)(Backend *be, const StTensor *t, QErr *err);
    /* resident: keep a device copy of the table where the backend has one to keep and room for
     * it (CUDA, bf16 tables: vocab x hidden x 2 bytes), so that embed uploads the ids and gathers
     * on the device instead of gathering and converting rows on the host (a serving engine's
     * 8192-token prefill steps, and every decode step, wait for that host work with the GPU idle). */
    Embedding *(*embedding_load)(Backend *be, const StTensor *table, bool resident, QErr *err);
    void (*embedding_free)(Backend *be, Embedding *e);
    /* KV pool; returns an opaque handle or NULL (err set) when it does not fit. */
    void *(*kv_alloc)(Backend *be, const KVShape *shape, QErr *err);
    void (*kv_free)(Backend *be, void *kv);

    /* compute */
    /* x[m] = table[ids[m]] for m < M; ids are HOST ints (already validated < vocab). */
    void (*embed)(Backend *be, float *x, const int32_t *ids, int M, const Embedding *table);
    /* y[M][N] = x[M][K] * W^T */
    void (*matmul)(Backend *be, float *y, const float *x, int M, const Linear *w);
    /* y[M][N] += x[M][K] * W^T (a projection added to the residual stream); y and x distinct */
    void (*matmul_add)(Backend *be, float *y, const float *x, int M, const Linear *w);
    /* y[M][N] = RMSNorm(x)[M][K] * W^T, where RMSNorm(x)[m] = x[m] / rms(x[m]) * norm_w (the
     * layer's input norms feed only a matmul, so a backend may fuse the two); x is unchanged */
    void (*norm_matmul)(Backend *be, float *y, const float *x, const float *norm_w, float eps, int M,
                        const Linear *w);
    /* dst[r] = src[rows[r]] for r < n, rows of width floats (rows: device ints, ascending) */
    void (*gather_rows)(Backend *be, float *dst, const float *src, const int32_t *rows, int n, int width);
    /* y[M][N] += SwiGLU(gate_up)[M][I] * W^T, where SwiGLU(gate_up)[m][i] = silu(g[m][i]) * u[m][i]
     * and gate_up is [M][2*I] (gate first): the MLP's down projection, whose input only feeds
     * this matmul, so a backend may fuse the two; gate_up is unchanged */
    void (*swiglu_matmul_add)(Backend *be, float *y, const float *gate_up, int M, int I, const Linear *w);
    /* The whole MLP block: x[M][H] += SwiGLU(RMSNorm(x) gate_up^T) down^T, i.e. norm_matmul into
     * scratch, then swiglu_matmul_add; gate_up stacks gate over up ([2I][H]), down is [H][I].
     * scratch: [M][2I] floats the backend may use (its contents after the call are unspecified).
     * One op, so that a backend may fuse across it (CUDA: SwiGLU in the gate|up GEMM's store). */
    void (*mlp_add)(Backend *be, float *x, const float *norm_w, float eps, int M, const Linear *gate_up,
                    const Linear *down, float *scratch);
    /* cs[m][i] = cos(positions[m] * inv_freq[i]), cs[m][half + i] = sin(...), i < half, in
     * float32 as transformers computes them (angle rounded to float32 first). Once per step. */
    void (*rope_cos_sin)(Backend *be, float *cs, const int32_t *positions, int M,
                         const float *inv_freq, int half);
    /* One layer's attention for the step's M tokens, over the paged cache of `layer`. qkv
     * [M][(nh + 2*nkv) * hd] holds each token's raw q heads, then k heads, then v heads; q and k
     * get per-head RMSNorm with heads->q_norm / k_norm [hd], then rotate-half RoPE with cs from
     * rope_cos_sin; each token's K and V are stored at meta->slots; then out[M][nh*hd] =
     * softmax(q k^T / sqrt(hd)) v, GQA (head h reads kv head h / (nh/nkv)), causal as AttnMeta
     * says. One op, so that a backend may fuse the steps (CUDA: the decode kernel normalises its
     * own token). qkv is scratch: afterwards its q and k parts hold the raw or the normalised
     * values. */
    void (*attention)(Backend *be, float *out, float *qkv, const AttnHeads *heads, const float *cs, void *kv,
                      int layer, const AttnMeta *meta);
    /* The attention block after q|k|v: x[M][H] += attention(...) o^T, i.e. attention into scratch
     * ([M][nh*hd] floats, contents unspecified afterwards), then matmul_add with o ([H][nh*hd]).
     * One op, so that a backend may fuse across it (CUDA: the attention kernels store the bf16
     * that a tensor-core o projection reads, saving a conversion launch per layer). */
    void (*attn_add)(Backend *be, float *x, float *qkv, const AttnHeads *heads, const float *cs, void *kv,
                     int layer, const AttnMeta *meta, const Linear *o, float *scratch);

    /* Memory bandwidth probe for benchmarks, in GB/s: the CPU reads a large buffer with all
     * threads (bytes read); a GPU copies device to device (bytes read + written). */
    double (*probe_bandwidth)(Backend *be);

    /* ---- optional (NULL where a backend has no use for them, e.g. the CPU) ---- */

    /* The first failure of any op since the backend was created (ops cannot report one
     * themselves, e.g. a device out of memory for scratch), or NULL. After one, results are
     * undefined. NULL op: the backend's ops cannot fail. */
    const char *(*error)(Backend *be);

    /* Device bytes that can still be allocated now, and (in *total) the device's memory; for
     * sizing the KV pool by a fraction of the device (NULL op: the host's memory, not managed). */
    size_t (*mem_free)(Backend *be, size_t *total);

    /* Replay of captured op sequences (CUDA graphs). graph_replay(be, key) launches the sequence
     * captured earlier under key and returns true, or returns false when there is none; the
     * caller then issues the ops between graph_begin(be, key) and graph_end(be, key), which
     * captures, keeps and launches them. key encodes every launch shape; ops inside a capture
     * take all per-step values from device memory (the AttnMeta arrays), never from host
     * arguments (AttnMeta.max_ctx / max_q must not change what a captured op launches). */
    bool (*graph_replay)(Backend *be, uint64_t key);
    void (*graph_begin)(Backend *be, uint64_t key);
    void (*graph_end)(Backend *be, uint64_t key);

    /* Samples one token per row of logits [rows][vocab] on the device and writes the ids to
     * out_ids (HOST). params[r] is row r's sampling (no penalties: the engine samples on the
     * host when a request has any); uniform[r] in [0, 1) is row r's random draw (from the
     * request's seeded generator). Returns false, doing nothing, if it cannot handle these
     * parameters (the engine then copies the logits and samples on the host). */
    bool (*sample)(Backend *be, const float *logits, int rows, int vocab, const SamplingParams *params,
                   const float *uniform, int32_t *out_ids);
} BackendOps;

struct Backend {
    const BackendOps *ops;
};

/* Bytes of one cached K or V value of dtype on a backend with op table ops: what every KV
 * memory figure (pool sizing, bandwidth reports) multiplies by. */
static inline int kv_dtype_bytes(const BackendOps *ops, KvDtype dtype) {
    return dtype == KV_FP8 ? 1 : ops->kv_value_bytes;
}

/* The CPU backend with n_threads workers (0 = all online CPUs). Never fails except on OOM. */
Backend *cpu_backend_create(int n_threads, QErr *err);

#endif
