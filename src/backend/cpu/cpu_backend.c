/* cpu_backend.c — the CPU backend: the reference for every other backend, and fast enough to
 * serve small models. Activations and the KV cache are float32 (the references in
 * ../shared/reference are float32 runs, and we match them to 1e-4), or with KVShape.dtype KV_FP8
 * the cache holds e4m3 codes (util/fp8.h, rounded as the GPU rounds them): attention decodes each
 * K and V row it reads through a 256-entry table into a row of floats and then runs the float
 * loops, so both cache types share one attention and the float32 one pays a branch per row. The
 * fp8 cache is the oracle for the CUDA backend's (and saves memory), not a way to speed up the
 * CPU. Weights stay where the loader mapped them (bf16 or int4 in the checkpoint's mmap), so a
 * model costs no more resident memory than the pages its matmuls touch; only norm vectors are
 * copied (to float32).
 *
 * Parallelism: matmuls split output rows across the thread pool (matmul.c); attention splits
 * over (sequence, head); the small elementwise ops run on the calling thread, they are a rounding
 * error next to the weight reads. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "backend/cpu/matmul.h"
#include "model/logits.h"
#include "util/bf16.h"
#include "util/fp8.h"
#include "util/threadpool.h"

typedef struct CpuBackend {
    Backend base;
    ThreadPool *pool;
    size_t used, peak;
    float *scratch;      /* grows to the largest need; reused by every step */
    size_t scratch_n;
    float *staged;       /* the intermediate of matmul_add / norm_matmul (they call cpu_matmul, */
    size_t staged_n;     /* which uses scratch) */
    float *swiglu;       /* the SwiGLU of swiglu_matmul_add (which calls cpu_matmul_add) */
    size_t swiglu_n;
} CpuBackend;

/* A buffer of at least n floats in *buf (kept between calls, so the forward pass does not
 * allocate once warmed up). */
static float *grow(float **buf, size_t *cap, size_t n) {
    if (n > *cap) {
        free(*buf);
        *buf = malloc(n * sizeof(float));
        *cap = *buf ? n : 0;
    }
    return *buf;
}

static float *scratch(CpuBackend *c, size_t n) { return grow(&c->scratch, &c->scratch_n, n); }

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalise */
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while (!(man & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    } else {
        u = sign;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static CpuBackend *cpu(Backend *be) { return (CpuBackend *)be; }

/* ---- memory ------------------------------------------------------------------------------ */

/* Allocations carry their size in a header so mem_used can account for them. */
static void *cpu_alloc(Backend *be, size_t bytes) {
    size_t *p = malloc(bytes + 64);
    if (!p) return NULL;
    p[0] = bytes;
    CpuBackend *c = cpu(be);
    c->used += bytes;
    if (c->used > c->peak) c->peak = c->used;
    return (char *)p + 64;
}

static void cpu_free(Backend *be, void *ptr) {
    if (!ptr) return;
    size_t *p = (size_t *)((char *)ptr - 64);
    cpu(be)->used -= p[0];
    free(p);
}

static void cpu_copy(Backend *be, void *dst, const void *src, size_t bytes) {
    (void)be;
    if (bytes) memcpy(dst, src, bytes);
}

static void cpu_sync(Backend *be) { (void)be; }

static size_t cpu_mem_used(Backend *be, size_t *peak) {
    if (peak) *peak = cpu(be)->peak;
    return cpu(be)->used;
}

/* ---- weights ----------------------------------------------------------------------------- */

#define MAX_PARTS 3

/* A Linear is up to three stacked parts (q|k|v); each is a view of the checkpoint's bytes. */
struct Linear {
    int n_parts;
    int64_t n, k;
    struct {
        int64_t n;
        DType dtype;       /* DT_BF16, DT_F32 (dense) or DT_U8 (int4) */
        const void *w;     /* dense weights, or NULL for int4 */
        float *owned;      /* F16 sources converted to float32 (owned) */
        uint8_t *codes;    /* int4 codes repacked for the kernels (owned) */
        uint32_t *sz;      /* int4 scale|zero pairs (owned) */
        Q4Weights q4;
    } part[MAX_PARTS];
};

/* out[i] = element i of a BF16/F16/F32 tensor, as float32 (exact widening). */
static void to_f32(float *out, const StTensor *t, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (t->dtype == DT_BF16)
            out[i] = bf16_to_f32(((const uint16_t *)t->data)[i]);
        else if (t->dtype == DT_F16)
            out[i] = f16_to_f32(((const uint16_t *)t->data)[i]);
        else
            out[i] = ((const float *)t->data)[i];
    }
}

static void cpu_linear_free(Backend *be, Linear *l) {
    (void)be;
    for (int i = 0; i < l->n_parts; i++) {
        free(l->part[i].owned);
        free(l->part[i].codes);
        free(l->part[i].sz);
    }
    free(l);
}

/* Drops the mapped pages of a region we have copied from, so they stop counting as resident
 * (they are re-read from the file if ever touched again). */
static void release_pages(const void *p, size_t bytes) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1), b = ((uintptr_t)p + bytes) & ~(page - 1);
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

static Linear *cpu_linear_load(Backend *be, const LinearSource *parts, int n_parts, QErr *err) {
    Linear *l = calloc(1, sizeof *l);
    if (!l) {
        qerr_set(err, "out of memory");
        return NULL;
    }
    l->n_parts = n_parts;
    l->k = parts[0].k;
    for (int i = 0; i < n_parts; i++) {
        const LinearSource *s = &parts[i];
        l->part[i].n = s->n;
        l->n += s->n;
        if (s->q4) {
            l->part[i].dtype = DT_U8;
            size_t bytes = (size_t)(s->n * s->k / 2), groups = (size_t)(s->n * (s->k / s->group_size));
            l->part[i].codes = malloc(bytes);
            l->part[i].sz = malloc(groups * sizeof(uint32_t));
            if (!l->part[i].codes || !l->part[i].sz) {
                cpu_linear_free(be, l);
                qerr_set(err, "out of memory repacking %s", s->name);
                return NULL;
            }
            if (q4_repack(l->part[i].codes, l->part[i].sz, s->qweight->data, s->scales->data, s->zeros->data, (int)s->n,
                          (int)s->k, s->group_size, err)) {
                cpu_linear_free(be, l);
                qerr_prefix(err, "%s", s->name);
                return NULL;
            }
            release_pages(s->qweight->data, bytes);
            release_pages(s->scales->data, groups * 2);
            release_pages(s->zeros->data, groups * 2);
            l->part[i].q4 = (Q4Weights){.codes = l->part[i].codes, .sz = l->part[i].sz, .group = s->group_size};
        } else if (s->dense->dtype == DT_F16) {
            l->part[i].dtype = DT_F32;
            size_t count = (size_t)(s->n * s->k);
            l->part[i].owned = malloc(count * sizeof(float));
            if (l->part[i].owned) to_f32(l->part[i].owned, s->dense, count);
            l->part[i].w = l->part[i].owned;
            if (!l->part[i].owned) {
                cpu_linear_free(be, l);
                qerr_set(err, "out of memory converting %s", s->name);
                return NULL;
            }
        } else {
            l->part[i].dtype = s->dense->dtype;
            l->part[i].w = s->dense->data;
        }
    }
    return l;
}

static float *cpu_vector_load(Backend *be, const StTensor *t, QErr *err) {
    size_t n = (size_t)t->shape[0];
    float *v = cpu_alloc(be, n * sizeof(float));
    if (!v) {
        qerr_set(err, "out of memory loading %s", t->name);
        return NULL;
    }
    to_f32(v, t, n);
    return v;
}

struct Embedding {
    const StTensor *table;
};

static Embedding *cpu_embedding_load(Backend *be, const StTensor *table, bool resident, QErr *err) {
    (void)be, (void)resident; /* host memory is the device */
    Embedding *e = malloc(sizeof *e);
    if (!e) {
        qerr_set(err, "out of memory");
        return NULL;
    }
    e->table = table;
    return e;
}

static void cpu_embedding_free(Backend *be, Embedding *e) {
    (void)be;
    free(e);
}

/* ---- KV cache ---------------------------------------------------------------------------- */

typedef struct CpuKV {
    KVShape s;
    size_t layer_stride; /* values per layer per K (or V) */
    void *k, *v;         /* [layers][blocks][block_size][nkv][hd]: float, or uint8 e4m3 codes (KV_FP8) */
    float fp8[256];      /* KV_FP8: the value of each code */
} CpuKV;

static void *cpu_kv_alloc(Backend *be, const KVShape *s, QErr *err) {
    CpuKV *kv = calloc(1, sizeof *kv);
    if (!kv) {
        qerr_set(err, "out of memory");
        return NULL;
    }
    kv->s = *s;
    kv->layer_stride = (size_t)s->n_blocks * s->block_size * s->n_kv_heads * s->head_dim;
    size_t bytes = kv->layer_stride * s->n_layers * (size_t)kv_dtype_bytes(be->ops, s->dtype);
    for (int b = 0; b < 256; b++) kv->fp8[b] = fp8_e4m3_to_f32((uint8_t)b);
    kv->k = cpu_alloc(be, bytes);
    kv->v = cpu_alloc(be, bytes);
    if (!kv->k || !kv->v) {
        cpu_free(be, kv->k);
        cpu_free(be, kv->v);
        free(kv);
        qerr_set(err, "out of memory for the KV cache (%zu MiB)", 2 * bytes >> 20);
        return NULL;
    }
    return kv;
}

static void cpu_kv_free(Backend *be, void *p) {
    CpuKV *kv = p;
    cpu_free(be, kv->k);
    cpu_free(be, kv->v);
    free(kv);
}

/* ---- compute ----------------------------------------------------------------------------- */

static void cpu_embed(Backend *be, float *x, const int32_t *ids, int M, const Embedding *e) {
    (void)be;
    const StTensor *t = e->table;
    size_t D = (size_t)t->shape[1];
    for (int m = 0; m < M; m++) {
        size_t off = (size_t)ids[m] * D;
        float *row = x + (size_t)m * D;
        if (t->dtype == DT_BF16)
            bf16_to_f32_row(row, (const uint16_t *)t->data + off, D);
        else if (t->dtype == DT_F16)
            for (size_t i = 0; i < D; i++) row[i] = f16_to_f32(((const uint16_t *)t->data)[off + i]);
        else
            memcpy(row, (const float *)t->data + off, D * sizeof(float));
    }
}

/* Stacked parts write side by side in y's rows: directly when M = 1 (decode), through
 * scratch and a scatter otherwise. */
static void cpu_matmul(Backend *be, float *y, const float *x, int M, const Linear *l) {
    CpuBackend *c = cpu(be);
    int K = (int)l->k, off = 0;
    for (int i = 0; i < l->n_parts; i++) {
        int N = (int)l->part[i].n;
        bool direct = M == 1 || l->n_parts == 1;
        float *yp = direct ? y + off : scratch(c, (size_t)M * N);
        if (l->part[i].dtype == DT_U8)
            mm_f32_q4(c->pool, yp, x, &l->part[i].q4, M, N, K);
        else if (l->part[i].dtype == DT_BF16)
            mm_f32_bf16(c->pool, yp, x, l->part[i].w, M, N, K);
        else
            mm_f32_f32(c->pool, yp, x, l->part[i].w, M, N, K);
        if (!direct)
            for (int m = 0; m < M; m++)
                memcpy(y + (size_t)m * l->n + off, yp + (size_t)m * N, (size_t)N * sizeof(float));
        off += N;
    }
}

static void rmsnorm_row(float *y, const float *x, const float *w, int D, float eps) {
    double ss = 0;
    for (int i = 0; i < D; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / D) + eps);
    for (int i = 0; i < D; i++) y[i] = w[i] * (x[i] * inv);
}

/* The CPU gains nothing from fusing: the composite ops stage their intermediate. */
static void cpu_matmul_add(Backend *be, float *y, const float *x, int M, const Linear *l) {
    CpuBackend *c = cpu(be);
    size_t n = (size_t)M * l->n;
    float *t = grow(&c->staged, &c->staged_n, n);
    cpu_matmul(be, t, x, M, l);
    for (size_t i = 0; i < n; i++) y[i] += t[i];
}

static void cpu_norm_matmul(Backend *be, float *y, const float *x, const float *norm_w, float eps, int M,
                            const Linear *l) {
    CpuBackend *c = cpu(be);
    int D = (int)l->k;
    float *t = grow(&c->staged, &c->staged_n, (size_t)M * D);
    for (int m = 0; m < M; m++) rmsnorm_row(t + (size_t)m * D, x + (size_t)m * D, norm_w, D, eps);
    cpu_matmul(be, y, t, M, l);
}

static void cpu_gather_rows(Backend *be, float *dst, const float *src, const int32_t *rows, int n, int width) {
    (void)be;
    for (int r = 0; r < n; r++)
        memmove(dst + (size_t)r * width, src + (size_t)rows[r] * width, (size_t)width * sizeof(float));
}

static void cpu_swiglu_matmul_add(Backend *be, float *y, const float *gu, int M, int I, const Linear *l) {
    CpuBackend *c = cpu(be);
    float *h = grow(&c->swiglu, &c->swiglu_n, (size_t)M * I);
    for (int m = 0; m < M; m++) {
        const float *g = gu + (size_t)m * 2 * I, *u = g + I;
        float *o = h + (size_t)m * I;
        for (int i = 0; i < I; i++) o[i] = g[i] / (1.0f + fast_expf(-g[i])) * u[i];
    }
    cpu_matmul_add(be, y, h, M, l);
}

static void cpu_mlp_add(Backend *be, float *x, const float *norm_w, float eps, int M, const Linear *gate_up,
                        const Linear *down, float *scratch) {
    cpu_norm_matmul(be, scratch, x, norm_w, eps, M, gate_up);
    cpu_swiglu_matmul_add(be, x, scratch, M, (int)(gate_up->n / 2), down);
}

static void cpu_rope_cos_sin(Backend *be, float *cs, const int32_t *pos, int M, const float *inv_freq, int half) {
    (void)be;
    for (int m = 0; m < M; m++) {
        float *c = cs + (size_t)m * 2 * half;
        for (int i = 0; i < half; i++) {
            float a = (float)pos[m] * inv_freq[i];
            c[i] = cosf(a);
            c[half + i] = sinf(a);
        }
    }
}

/* Per-head RMSNorm then rotate-half RoPE, in place on one head vector. */
static void norm_rope_head(float *x, const float *w, const float *cs, int hd, float eps) {
    rmsnorm_row(x, x, w, hd, eps);
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half], c = cs[i], s = cs[half + i];
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

/* The attention op's first half: q and k normalised and rotated in place, K and V stored. */
static void qk_norm_rope_store(float *qkv, const AttnHeads *ah, const float *cs, CpuKV *kv, int layer,
                               const AttnMeta *meta) {
    const int M = meta->n_tokens, nh = ah->nh, nkv = ah->nkv, hd = ah->hd;
    const float *q_norm = ah->q_norm, *k_norm = ah->k_norm;
    const float eps = ah->eps;
    size_t width = (size_t)(nh + 2 * nkv) * hd;
    for (int m = 0; m < M; m++) {
        float *row = qkv + (size_t)m * width;
        const float *c = cs + (size_t)m * hd;
        for (int h = 0; h < nh; h++) norm_rope_head(row + (size_t)h * hd, q_norm, c, hd, eps);
        float *k = row + (size_t)nh * hd, *v = k + (size_t)nkv * hd;
        for (int h = 0; h < nkv; h++) norm_rope_head(k + (size_t)h * hd, k_norm, c, hd, eps);
        size_t slot = (size_t)meta->slots[m] * nkv * hd + kv->layer_stride * layer, n = (size_t)nkv * hd;
        if (kv->s.dtype == KV_FP8) {
            uint8_t *kc = (uint8_t *)kv->k + slot, *vc = (uint8_t *)kv->v + slot;
            for (size_t i = 0; i < n; i++) kc[i] = fp8_e4m3_from_f32(k[i]), vc[i] = fp8_e4m3_from_f32(v[i]);
        } else {
            memcpy((float *)kv->k + slot, k, n * sizeof(float));
            memcpy((float *)kv->v + slot, v, n * sizeof(float));
        }
    }
}

typedef struct AttnJob {
    float *out;
    const float *qkv;
    int nh, nkv, hd;
    const CpuKV *kv;
    int layer;
    const AttnMeta *meta;
    float *scratch;      /* [threads][max_ctx + hd]: scores, then a decoded K or V row */
    int T;
} AttnJob;

/* Row idx (in values) of a K or V pool as floats: in place for float32, else decoded into row. */
static const float *kv_row(const CpuKV *kv, const void *pool, size_t idx, int hd, float *row) {
    if (kv->s.dtype != KV_FP8) return (const float *)pool + idx;
    const uint8_t *c = (const uint8_t *)pool + idx;
    for (int i = 0; i < hd; i++) row[i] = kv->fp8[c[i]];
    return row;
}

/* Dot product with 16 independent accumulators, so the compiler vectorises it. */
static float dot(const float *a, const float *b, int n) {
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

/* One task = one (token, head): scores over its causal context, softmax, weighted sum of V. */
static void attn_task(void *ctx, int task, int thread) {
    const AttnJob *j = ctx;
    const AttnMeta *mt = j->meta;
    int t = task / j->nh, h = task % j->nh;
    int s = 0;
    while (mt->q_start[s + 1] <= t) s++;
    int n_q = mt->q_start[s + 1] - mt->q_start[s];
    int pos = mt->ctx_len[s] - (mt->q_start[s + 1] - t);
    (void)n_q;
    int hd = j->hd, kvh = h / (j->nh / j->nkv), bs = j->kv->s.block_size;
    size_t qkv_w = (size_t)(j->nh + 2 * j->nkv) * hd;
    const float *q = j->qkv + (size_t)t * qkv_w + (size_t)h * hd;
    const int32_t *table = mt->block_tables + (size_t)s * mt->max_blocks;
    const size_t base = j->kv->layer_stride * j->layer;
    float *sc = j->scratch + (size_t)thread * (mt->max_ctx + hd), *row = sc + mt->max_ctx;
    float scale = 1.0f / sqrtf((float)hd), mx = -INFINITY;
    for (int p = 0; p <= pos; p++) {
        size_t slot = (size_t)table[p / bs] * bs + p % bs;
        sc[p] = dot(q, kv_row(j->kv, j->kv->k, base + (slot * j->nkv + kvh) * hd, hd, row), hd) * scale;
        if (sc[p] > mx) mx = sc[p];
    }
    float sum = 0;
    for (int p = 0; p <= pos; p++) {
        sc[p] = fast_expf(sc[p] - mx);
        sum += sc[p];
    }
    float *o = j->out + (size_t)t * j->nh * hd + (size_t)h * hd;
    memset(o, 0, (size_t)hd * sizeof(float));
    for (int p = 0; p <= pos; p++) {
        size_t slot = (size_t)table[p / bs] * bs + p % bs;
        const float *v = kv_row(j->kv, j->kv->v, base + (slot * j->nkv + kvh) * hd, hd, row);
        float w = sc[p] / sum;
        for (int i = 0; i < hd; i++) o[i] += w * v[i];
    }
}

static void cpu_attention(Backend *be, float *out, float *qkv, const AttnHeads *ah, const float *cs, void *kv,
                          int layer, const AttnMeta *meta) {
    CpuBackend *c = cpu(be);
    qk_norm_rope_store(qkv, ah, cs, kv, layer, meta);
    int threads = tp_size(c->pool);
    float *sc = scratch(c, (size_t)threads * (meta->max_ctx + ah->hd));
    AttnJob j = {out, qkv, ah->nh, ah->nkv, ah->hd, kv, layer, meta, sc, meta->n_tokens};
    tp_run(c->pool, meta->n_tokens * ah->nh, attn_task, &j);
}

static void cpu_attn_add(Backend *be, float *x, float *qkv, const AttnHeads *ah, const float *cs, void *kv, int layer,
                         const AttnMeta *meta, const Linear *o, float *scratch) {
    cpu_attention(be, scratch, qkv, ah, cs, kv, layer, meta);
    cpu_matmul_add(be, x, scratch, meta->n_tokens, o);
}

typedef struct ProbeJob {
    const uint64_t *buf;
    size_t n_per_task;
    uint64_t sums[256];
} ProbeJob;

static void probe_task(void *ctx, int task, int thread) {
    ProbeJob *j = ctx;
    const uint64_t *p = j->buf + (size_t)task * j->n_per_task;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i < j->n_per_task; i += 4) a ^= p[i], b ^= p[i + 1], c ^= p[i + 2], d ^= p[i + 3];
    j->sums[thread & 255] ^= a ^ b ^ c ^ d;
}

/* Reads 1 GiB with every thread, several times; the best pass counts (bytes read / second). */
static double cpu_probe_bandwidth(Backend *be) {
    CpuBackend *c = cpu(be);
    size_t bytes = (size_t)1 << 30, n = bytes / sizeof(uint64_t);
    uint64_t *buf = malloc(bytes);
    if (!buf) return 0;
    for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ull;
    int tasks = 64;
    ProbeJob j = {.buf = buf, .n_per_task = n / (size_t)tasks};
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        tp_run(c->pool, tasks, probe_task, &j);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
        double gbs = (double)bytes / s / 1e9;
        if (gbs > best) best = gbs;
    }
    free(buf);
    return best;
}

static void cpu_destroy(Backend *be) {
    tp_free(cpu(be)->pool);
    free(cpu(be)->scratch);
    free(cpu(be)->staged);
    free(cpu(be)->swiglu);
    free(be);
}

static const BackendOps CPU_OPS = {
    .name = "cpu",
    .kv_value_bytes = sizeof(float),
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .to_device = cpu_copy,
    .to_host = cpu_copy,
    .sync = cpu_sync,
    .mem_used = cpu_mem_used,
    .linear_load = cpu_linear_load,
    .linear_free = cpu_linear_free,
    .vector_load = cpu_vector_load,
    .embedding_load = cpu_embedding_load,
    .embedding_free = cpu_embedding_free,
    .kv_alloc = cpu_kv_alloc,
    .kv_free = cpu_kv_free,
    .embed = cpu_embed,
    .matmul = cpu_matmul,
    .matmul_add = cpu_matmul_add,
    .norm_matmul = cpu_norm_matmul,
    .gather_rows = cpu_gather_rows,
    .swiglu_matmul_add = cpu_swiglu_matmul_add,
    .mlp_add = cpu_mlp_add,
    .rope_cos_sin = cpu_rope_cos_sin,
    .attention = cpu_attention,
    .attn_add = cpu_attn_add,
    .probe_bandwidth = cpu_probe_bandwidth,
};

Backend *cpu_backend_create(int n_threads, QErr *err) {
    CpuBackend *c = calloc(1, sizeof *c);
    if (!c) {
        qerr_set(err, "out of memory");
        return NULL;
    }
    if (!(c->pool = tp_create(n_threads, err))) {
        free(c);
        return NULL;
    }
    c->base.ops = &CPU_OPS;
    return &c->base;
}
