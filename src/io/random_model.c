/* random_model.c — the random-weights spec, made fast enough to write Qwen3-8B at disk speed.
 *
 * The spec draws each element from outputs of a counter-based splitmix64 stream, so element i
 * depends only on (stream, i) and any piece of any tensor can be made on its own: the thread pool
 * composes the file's 8 MiB blocks independently and the writer sends them out with O_DIRECT
 * (page-cache writes of 16 GB ran at half the disk's speed here). The inner loop is written with GCC/Clang vector
 * extensions (8 lanes where AVX-512 exists, else 4) because the project builds at -O2, where
 * plain loops are not vectorised; that is ~4x faster than scalar code. The price is a second
 * formulation of the arithmetic: the normal draw is summed in integers (exact, as the spec's
 * double sums of 24-bit fractions are) before one conversion, while rm_element() follows the
 * spec's formula literally and serves as the oracle that tests hold the fast path to.
 *
 * The norm formula 1 + 0.1x must be two roundings, never one fused multiply-add. It is written
 * as two statements: clang's default contracts only within one expression, and GCC contracts
 * across statements only in GNU mode (-ffp-contract=fast), not in the ISO C11 mode this project
 * builds in. */
#include "io/random_model.h"

#include <assert.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define RM_GOLDEN 0x9E3779B97F4A7C15ULL
#define RM_CHUNK ((uint64_t)1 << 20) /* elements per work item */
#define RM_OUTLIER_BELOW 16777u      /* (output >> 40) below this: an outlier (x8) */

/* ------------------------------------------------------------------------------------------ */
/* Generator                                                                                   */

uint64_t rm_fnv1a64(const char *s) {
    uint64_t h = 0xCBF29CE484222325ULL;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        h ^= *p;
        h *= 0x100000001B3ULL;
    }
    return h;
}

uint64_t rm_stream(const char *name, uint64_t seed) { return rm_fnv1a64(name) ^ seed; }

int rm_kind_of(const char *name, RmKind *kind) {
    size_t n = strlen(name);
    if (n >= 11 && !strcmp(name + n - 11, "norm.weight")) {
        *kind = RM_NORM;
    } else if (!strcmp(name, "model.embed_tokens.weight") || !strcmp(name, "lm_head.weight")) {
        *kind = RM_EMBED;
    } else if (n >= 12 && !strcmp(name + n - 12, "_proj.weight")) {
        *kind = RM_LINEAR;
    } else {
        return -1;
    }
    return 0;
}

/* Output k (k >= 1) of the splitmix64 stream started at s. */
static uint64_t splitmix64(uint64_t s, uint64_t k) {
    uint64_t z = s + k * RM_GOLDEN;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* float32 -> bfloat16, round to nearest even (inputs here are always finite). */
static uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

uint16_t rm_element(uint64_t stream, RmKind kind, uint64_t n, uint64_t i) {
    double u[4];
    for (int j = 0; j < 4; j++)
        u[j] = (double)(splitmix64(stream, 4 * i + 1 + (uint64_t)j) >> 40) / 16777216.0;
    double x = ((u[0] + u[1]) + (u[2] + u[3]) - 2.0) * 1.7320508075688772;
    double v;
    switch (kind) {
    case RM_NORM:
        v = 0.1 * x; /* two statements: no fused multiply-add (see the top of the file) */
        v = 1.0 + v;
        break;
    case RM_EMBED:
        v = 0.02 * x;
        break;
    default:
        v = 0.02 * x;
        if ((splitmix64(stream, 4 * n + 1 + i) >> 40) < RM_OUTLIER_BELOW) v *= 8.0;
        break;
    }
    return bf16_rne((float)v);
}

#if defined(__AVX512F__)
#define RM_LANES 8
#else
#define RM_LANES 4
#endif
typedef uint64_t u64v __attribute__((vector_size(8 * RM_LANES)));
typedef int64_t i64v __attribute__((vector_size(8 * RM_LANES)));
typedef double f64v __attribute__((vector_size(8 * RM_LANES)));
typedef float f32v __attribute__((vector_size(4 * RM_LANES)));
typedef uint32_t u32v __attribute__((vector_size(4 * RM_LANES)));
typedef uint16_t u16v __attribute__((vector_size(2 * RM_LANES)));

/* splitmix64's finaliser on a vector of counters (a macro: vector arguments would change the
 * calling convention between builds with and without AVX). */
#define RM_MIX(out, zin)                                  \
    do {                                                  \
        u64v z_ = (zin);                                  \
        z_ = (z_ ^ (z_ >> 30)) * 0xBF58476D1CE4E5B9ULL;   \
        z_ = (z_ ^ (z_ >> 27)) * 0x94D049BB133111EBULL;   \
        (out) = z_ ^ (z_ >> 31);                          \
    } while (0)

void rm_fill_range(uint16_t *out, uint64_t stream, RmKind kind, uint64_t n, uint64_t begin,
                   uint64_t end) {
    uint64_t count = end - begin, i = 0;
    u64v lane;
    for (int j = 0; j < RM_LANES; j++) lane[j] = (uint64_t)j;
    /* z: the counter s + k*G of output 4i (so outputs 4i+1..4i+4 are z+G..z+4G);
     * zo: the counter of the outlier output 4n+1+i. */
    u64v z = (uint64_t)(stream + (4 * begin) * RM_GOLDEN) + lane * (uint64_t)(4 * RM_GOLDEN);
    u64v zo = (uint64_t)(stream + (4 * n + 1 + begin) * RM_GOLDEN) + lane * (uint64_t)RM_GOLDEN;
    const uint64_t step4 = (uint64_t)(4 * RM_LANES) * RM_GOLDEN, step1 = RM_LANES * RM_GOLDEN;
    const u64v one = (u64v){0} + 0x3FF0000000000000ULL, eight = (u64v){0} + 0x4020000000000000ULL;
    for (; i + RM_LANES <= count; i += RM_LANES) {
        u64v o1, o2, o3, o4;
        RM_MIX(o1, z + RM_GOLDEN);
        RM_MIX(o2, z + 2 * RM_GOLDEN);
        RM_MIX(o3, z + 3 * RM_GOLDEN);
        RM_MIX(o4, z + 4 * RM_GOLDEN);
        /* (u1+u2)+(u3+u4)-2 in units of 2^-24, exactly. */
        i64v a = (i64v)(((o1 >> 40) + (o2 >> 40)) + ((o3 >> 40) + (o4 >> 40))) - (1 << 25);
        f64v x = __builtin_convertvector(a, f64v) * 0x1p-24 * 1.7320508075688772;
        f64v v;
        if (kind == RM_NORM) {
            v = 0.1 * x;
            v = 1.0 + v;
        } else {
            v = 0.02 * x;
            if (kind == RM_LINEAR) {
                u64v oo;
                RM_MIX(oo, zo);
                u64v outlier = (u64v)((oo >> 40) < RM_OUTLIER_BELOW); /* all ones or zero */
                v *= (f64v)(one ^ (outlier & (one ^ eight)));          /* 8.0 or 1.0 */
            }
        }
        u32v b = (u32v)__builtin_convertvector(v, f32v);
        b += 0x7FFFu + ((b >> 16) & 1u);
        u16v h = __builtin_convertvector(b >> 16, u16v);
        memcpy(out + i, &h, sizeof h);
        z += step4;
        zo += step1;
    }
    for (; i < count; i++) out[i] = rm_element(stream, kind, n, begin + i);
}

/* ------------------------------------------------------------------------------------------ */
/* Parallel fills                                                                              */

/* rm_fill_tensor: task t fills elements [t*RM_CHUNK, (t+1)*RM_CHUNK) of one tensor. */
typedef struct RmTensorFill {
    uint16_t *out;
    uint64_t stream, n;
    RmKind kind;
} RmTensorFill;

static void tensor_task(void *ctx, int task, int thread) {
    (void)thread;
    const RmTensorFill *f = ctx;
    uint64_t b = (uint64_t)task * RM_CHUNK, e = f->n - b < RM_CHUNK ? f->n : b + RM_CHUNK;
    rm_fill_range(f->out + b, f->stream, f->kind, f->n, b, e);
}

static int numel_of(int ndim, const int64_t *shape, uint64_t *n) {
    *n = 1;
    if (ndim < 0 || ndim > ST_MAX_DIMS) return -1;
    for (int d = 0; d < ndim; d++)
        if (shape[d] < 0 || __builtin_mul_overflow(*n, (uint64_t)shape[d], n)) return -1;
    return *n > SIZE_MAX / 2 ? -1 : 0;
}

int rm_fill_tensor(uint16_t *out, const char *name, int ndim, const int64_t *shape, uint64_t seed,
                   ThreadPool *pool, QErr *err) {
    RmKind kind;
    uint64_t n;
    if (rm_kind_of(name, &kind))
        return qerr_set(err, "tensor '%s': not a Qwen3 weight name (no random-weights rule)", name);
    if (numel_of(ndim, shape, &n)) return qerr_set(err, "tensor '%s': invalid shape", name);
    if ((n + RM_CHUNK - 1) / RM_CHUNK > INT_MAX)
        return qerr_set(err, "tensor '%s': too large", name);
    RmTensorFill f = {out, rm_stream(name, seed), n, kind};
    int n_tasks = (int)((n + RM_CHUNK - 1) / RM_CHUNK);
    if (pool)
        tp_run(pool, n_tasks, tensor_task, &f);
    else
        for (int t = 0; t < n_tasks; t++) tensor_task(&f, t, 0);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Presets and the tensor list                                                                 */

static const struct {
    const char *name;
    uint64_t seed;
    int vocab, hidden, inter, layers, heads, kv_heads, head_dim;
    bool tied;
} PRESETS[] = {
    {"tiny-qwen3", 1, 151936, 128, 384, 2, 2, 1, 128, true},
    {"small-qwen3", 2, 4096, 512, 1536, 3, 8, 2, 128, false},
    {"qwen3-0.6b", 3, 151936, 1024, 3072, 28, 16, 8, 128, true},
    {"qwen3-8b", 4, 151936, 4096, 12288, 36, 32, 8, 128, false},
};
#define N_PRESETS (sizeof PRESETS / sizeof PRESETS[0])

const char *rm_preset_names(void) { return "tiny-qwen3, small-qwen3, qwen3-0.6b, qwen3-8b"; }

int rm_preset(const char *name, QwenConfig *cfg, uint64_t *seed, QErr *err) {
    for (size_t i = 0; i < N_PRESETS; i++) {
        if (strcmp(name, PRESETS[i].name)) continue;
        memset(cfg, 0, sizeof *cfg);
        cfg->vocab_size = PRESETS[i].vocab;
        cfg->hidden_size = PRESETS[i].hidden;
        cfg->intermediate_size = PRESETS[i].inter;
        cfg->num_hidden_layers = PRESETS[i].layers;
        cfg->num_attention_heads = PRESETS[i].heads;
        cfg->num_key_value_heads = PRESETS[i].kv_heads;
        cfg->head_dim = PRESETS[i].head_dim;
        cfg->max_position_embeddings = 40960;
        cfg->rms_norm_eps = 1e-6f;
        cfg->rope_theta = 1000000.0;
        cfg->tie_word_embeddings = PRESETS[i].tied;
        cfg->bos_token_id = 151643;
        cfg->eos_token_ids[0] = 151645;
        cfg->n_eos = 1;
        snprintf(cfg->dtype, sizeof cfg->dtype, "bfloat16");
        if (seed) *seed = PRESETS[i].seed;
        return 0;
    }
    return qerr_set(err, "unknown preset '%s' (known: %s)", name, rm_preset_names());
}

void rm_specs_free(StSpec *specs, size_t n) {
    if (!specs) return;
    for (size_t i = 0; i < n; i++) free((char *)specs[i].name);
    free(specs);
}

StSpec *rm_tensor_specs(const QwenConfig *cfg, size_t *n_out, QErr *err) {
    int L = cfg->num_hidden_layers;
    int64_t H = cfg->hidden_size, I = cfg->intermediate_size, V = cfg->vocab_size;
    int64_t D = cfg->head_dim, Q = (int64_t)cfg->num_attention_heads * D,
            KV = (int64_t)cfg->num_key_value_heads * D;
    if (L < 1 || H < 1 || I < 1 || V < 1 || D < 1 || Q < 1 || KV < 1) {
        qerr_set(err, "model config has a non-positive size");
        return NULL;
    }
    static const char *const per_layer[] = {
        "input_layernorm",   "post_attention_layernorm", "self_attn.q_proj",
        "self_attn.k_proj",  "self_attn.v_proj",         "self_attn.o_proj",
        "self_attn.q_norm",  "self_attn.k_norm",         "mlp.gate_proj",
        "mlp.up_proj",       "mlp.down_proj",
    };
    const int64_t shapes[][2] = {{H, 0}, {H, 0}, {Q, H}, {KV, H}, {KV, H}, {H, Q},
                                 {D, 0}, {D, 0}, {I, H}, {I, H}, {H, I}};
    size_t per = sizeof per_layer / sizeof per_layer[0];
    size_t cap = (size_t)L * per + 3, n = 0;
    StSpec *specs = calloc(cap, sizeof *specs);
    if (!specs) goto oom;
#define ADD(dims, d0, d1, ...)                                              \
    do {                                                                    \
        StSpec *s_ = &specs[n];                                             \
        char buf_[128];                                                     \
        snprintf(buf_, sizeof buf_, __VA_ARGS__);                           \
        if (!(s_->name = strdup(buf_))) goto oom;                           \
        n++;                                                                \
        s_->dtype = DT_BF16;                                                \
        s_->ndim = (dims);                                                  \
        s_->shape[0] = (d0);                                                \
        s_->shape[1] = (d1);                                                \
    } while (0)
    ADD(2, V, H, "model.embed_tokens.weight");
    for (int l = 0; l < L; l++)
        for (size_t t = 0; t < per; t++)
            ADD(shapes[t][1] ? 2 : 1, shapes[t][0], shapes[t][1], "model.layers.%d.%s.weight", l,
                per_layer[t]);
    ADD(1, H, 0, "model.norm.weight");
    if (!cfg->tie_word_embeddings) ADD(2, V, H, "lm_head.weight");
#undef ADD
    *n_out = n;
    return specs;
oom:
    rm_specs_free(specs, n);
    qerr_set(err, "out of memory listing tensors");
    return NULL;
}

void rm_gen_config(GenConfig *g) {
    gen_config_defaults(g);
    g->do_sample = true;
    g->temperature = 0.6f;
    g->top_k = 20;
    g->top_p = 0.95f;
    g->eos_token_ids[0] = 151645;
    g->eos_token_ids[1] = 151643;
    g->n_eos = 2;
    g->pad_token_id = 151643;
}

/* ------------------------------------------------------------------------------------------ */
/* Writing a checkpoint file                                                                   */

/* rm_write_safetensors: task t writes block first + t of the file, composing it in its
 * thread's scratch buffer from the tensors' streams. */
typedef struct RmFileFill {
    StWriter *w;
    uint64_t *streams;  /* per tensor, in the writer's order */
    RmKind *kinds;
    uint8_t **scratch;  /* per thread */
    QErr *errs;         /* per thread */
    int *failed;        /* per thread */
    atomic_int stop;
    size_t first;       /* block of task 0 */
} RmFileFill;

static void produce(void *ctx, size_t i, size_t off, void *dst, size_t n) {
    const RmFileFill *f = ctx;
    const StTensor *t = st_writer_tensor(f->w, i);
    rm_fill_range(dst, f->streams[i], f->kinds[i], t->nbytes / 2, off / 2, (off + n) / 2);
}

static void block_task(void *ctx, int task, int thread) {
    RmFileFill *f = ctx;
    if (atomic_load(&f->stop)) return;
    if (st_writer_write_block(f->w, f->first + (size_t)task, produce, f, f->scratch[thread],
                              &f->errs[thread])) {
        f->failed[thread] = 1;
        atomic_store(&f->stop, 1);
    }
}

int rm_write_safetensors(const char *path, const QwenConfig *cfg, uint64_t seed, int n_threads,
                         RmProgress progress, void *ctx, QErr *err) {
    size_t n;
    StSpec *specs = rm_tensor_specs(cfg, &n, err);
    if (!specs) return -1;
    static const char *const meta[] = {"format", "pt"};
    StWriter *w = st_writer_create(path, specs, n, meta, 1, err);
    rm_specs_free(specs, n);
    if (!w) return -1;
    /* By default two threads per CPU, so one thread's block is generated while another's is
     * being written. */
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (n_threads <= 0) n_threads = cpus > 0 && cpus < 128 ? 2 * (int)cpus : 2;
    ThreadPool *pool = tp_create(n_threads, err);
    if (!pool) {
        st_writer_abort(w);
        return -1;
    }
    int threads = tp_size(pool), rc = 0;
    RmFileFill f = {.w = w};
    atomic_init(&f.stop, 0);
    f.streams = malloc(n * sizeof *f.streams);
    f.kinds = malloc(n * sizeof *f.kinds);
    f.scratch = calloc((size_t)threads, sizeof *f.scratch);
    f.errs = calloc((size_t)threads, sizeof *f.errs);
    f.failed = calloc((size_t)threads, sizeof *f.failed);
    if (!f.streams || !f.kinds || !f.scratch || !f.errs || !f.failed) {
        rc = qerr_set(err, "%s: out of memory", path);
        goto done;
    }
    for (int t = 0; t < threads; t++)
        if (posix_memalign((void **)&f.scratch[t], ST_WRITER_ALIGN, ST_WRITER_BLOCK)) {
            f.scratch[t] = NULL;
            rc = qerr_set(err, "%s: out of memory for write buffers", path);
            goto done;
        }
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        const StTensor *t = st_writer_tensor(w, i);
        int known = rm_kind_of(t->name, &f.kinds[i]);
        assert(known == 0); /* rm_tensor_specs only makes names with a rule */
        (void)known;
        f.streams[i] = rm_stream(t->name, seed);
        total += t->nbytes;
    }
    /* Batches of blocks, so that progress can be reported between them. */
    size_t n_blocks = st_writer_block_count(w), batch = 16 * (size_t)threads;
    for (f.first = 0; f.first < n_blocks && !atomic_load(&f.stop); f.first += batch) {
        size_t k = n_blocks - f.first < batch ? n_blocks - f.first : batch;
        tp_run(pool, (int)k, block_task, &f);
        uint64_t done = (uint64_t)(f.first + k) * ST_WRITER_BLOCK;
        if (progress) progress(ctx, done < total ? done : total, total);
    }
    for (int t = 0; t < threads; t++)
        if (f.failed[t]) {
            if (err) *err = f.errs[t];
            rc = -1;
            break;
        }
done:
    for (int t = 0; f.scratch && t < threads; t++) free(f.scratch[t]);
    free(f.scratch);
    free(f.errs);
    free(f.failed);
    free(f.streams);
    free(f.kinds);
    tp_free(pool);
    if (rc) {
        st_writer_abort(w);
        return -1;
    }
    return st_writer_finish(w, err);
}
