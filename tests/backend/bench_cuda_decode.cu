/* bench_cuda_decode.cu — one Qwen3-8B-shaped layer stack (36 layers, random weights, int4 HQQ
 * layout g128 or bf16, bf16 lm_head) on the CUDA backend: times a batch-1 decode step (CUDA graph
 * replay, as the model runs it, preceded by the 16 KB upload of the token's embedding) at a given
 * context, the same step's matmuls alone, the largest matmuls alone, and a 511-token prefill,
 * next to a device-to-device copy probe of the same run. Not a ctest (bench_, not test_); build
 * by hand against the CUDA backend library (scripts/gpu_bench.sh does this):
 *
 *   nvcc -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Isrc \
 *        tests/backend/bench_cuda_decode.cu build-gpu/libquill_cuda.a -lcublas -o /tmp/bench
 *   /tmp/bench [--dtype int4|bf16] [--ctx N] [--layers L] [--reps R] [--profile] [--matmul-m LIST]
 *              [--attn-seqs LIST] [--prefill-seqs LIST] [--kv-dtype bf16|fp8]
 *
 * --profile runs one decode step eagerly and exits (for ncu: the step's kernels, nothing else).
 * --matmul-m 1,16,128,... times, for each M of the list instead of the decode step, one step's
 * 4 x L linear layers (qkv, o, gate_up, down; the backend table's matmul, as a CUDA graph) on M
 * tokens, with the FLOP rate and the rate at which the weights are read, each matrix alone, and
 * the same linears as model_forward issues them (norm_matmul, matmul_add, mlp_add: with the
 * RMSNorms, SwiGLU and residual adds, and the input conversions, each path fuses or needs;
 * the plain matmul step converts every float input to bf16 from 4 tokens). --attn-seqs 1,64,...
 * times instead one step's L decode attentions for that many sequences of context --ctx each;
 * --prefill-seqs the same for prefill chunks (every sequence's --ctx tokens at once).
 * --kv-dtype fp8: the KV cache in float8 e4m3 (KvDtype KV_FP8) instead of bf16.
 * The layer sequence is model_forward's (src/model/qwen3.c), issued through the backend table. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern "C" {
#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
}

extern bool cu_pdl, cu_pdl_now; /* the backend's programmatic-dependent-launch switches (cuda_common.cuh) */

namespace {

const int H = 4096, I = 12288, NH = 32, NKV = 8, HD = 128, V = 151936, G = 128, BS = 16;

double now_s() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

uint64_t rng = 0x9e3779b97f4a7c15ull;
uint64_t next() {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return rng;
}

/* Random bytes (int4 codes). */
void fill_bytes(uint8_t *p, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v = next();
        memcpy(p + i, &v, 8);
    }
    for (; i < n; i++) p[i] = (uint8_t)next();
}

/* Random bf16 in +-[2^-7, 2^-6) * mul (mul a power of two, via the exponent). */
void fill_bf16(uint16_t *p, size_t n, int exp_shift) {
    const uint16_t e = (uint16_t)((0x78 + exp_shift) << 7);
    for (size_t i = 0; i < n; i += 4) {
        uint64_t v = next();
        for (int j = 0; j < 4 && i + j < n; j++) p[i + j] = (uint16_t)(((v >> (16 * j)) & 0x807f) | e);
    }
}

struct HostLinear {
    StTensor qw, sc, ze, dense;
    LinearSource src;
};

/* Host weights of one [n][k] linear: int4 codes + scales (~2^-9) + zeros (~2^-12), or bf16. */
void host_linear(HostLinear *h, const char *name, int n, int k, bool q4) {
    memset(h, 0, sizeof *h);
    if (q4) {
        size_t groups = (size_t)n * (k / G);
        uint8_t *codes = (uint8_t *)malloc((size_t)n * k / 2);
        uint16_t *sc = (uint16_t *)malloc(groups * 2), *ze = (uint16_t *)malloc(groups * 2);
        fill_bytes(codes, (size_t)n * k / 2);
        fill_bf16(sc, groups, -2);
        fill_bf16(ze, groups, -5);
        for (size_t i = 0; i < groups; i++) sc[i] &= 0x7fff; /* positive scales */
        h->qw = StTensor{name, DT_U8, 2, {n, k / 2}, codes, (size_t)n * k / 2, NULL};
        h->sc = StTensor{name, DT_BF16, 2, {n, k / G}, sc, groups * 2, NULL};
        h->ze = StTensor{name, DT_BF16, 2, {n, k / G}, ze, groups * 2, NULL};
        h->src = LinearSource{name, n, k, true, NULL, &h->qw, &h->sc, &h->ze, G};
    } else {
        uint16_t *w = (uint16_t *)malloc((size_t)n * k * 2);
        fill_bf16(w, (size_t)n * k, 0);
        h->dense = StTensor{name, DT_BF16, 2, {n, k}, w, (size_t)n * k * 2, NULL};
        h->src = LinearSource{name, n, k, false, &h->dense, NULL, NULL, NULL, 0};
    }
}

void free_host_linear(HostLinear *h) {
    free(h->qw.data), free(h->sc.data), free(h->ze.data), free(h->dense.data);
}

size_t linear_bytes(int n, int k, bool q4) {
    return q4 ? (size_t)n * k / 2 + (size_t)n * (k / G) * 4 : (size_t)n * k * 2;
}

struct Layer {
    Linear *qkv, *o, *gate_up, *down;
    float *attn_norm, *mlp_norm, *q_norm, *k_norm;
};

struct Bench {
    Backend *be;
    const BackendOps *op;
    int L;
    Layer *layers;
    Linear *lm_head;
    float *final_norm, *inv_freq;
    void *kv;
    float *x, *xb, *qkv, *attn, *gate_up, *cs, *logits;
    int32_t *d_meta;
};

void die(const char *what, const QErr &err) {
    fprintf(stderr, "bench: %s: %s\n", what, err.msg);
    exit(1);
}

/* model_forward's layer walk (qwen3.c) for T tokens of one sequence; matmuls_only skips all but
 * the matmuls (with the norms, SwiGLU and residual adds they fuse), to see what the rest costs. */
void forward(Bench *b, const AttnMeta *m, int T, bool matmuls_only) {
    const BackendOps *op = b->op;
    Backend *be = b->be;
    const float eps = 1e-6f;
    if (!matmuls_only) op->rope_cos_sin(be, b->cs, m->positions, T, b->inv_freq, HD / 2);
    for (int l = 0; l < b->L; l++) {
        const Layer *w = &b->layers[l];
        op->norm_matmul(be, b->qkv, b->x, w->attn_norm, eps, T, w->qkv);
        if (matmuls_only) {
            op->matmul_add(be, b->x, b->attn, T, w->o);
        } else {
            const AttnHeads heads = {NH, NKV, HD, w->q_norm, w->k_norm, eps};
            op->attn_add(be, b->x, b->qkv, &heads, b->cs, b->kv, l, m, w->o, b->attn);
        }
        op->mlp_add(be, b->x, w->mlp_norm, eps, T, w->gate_up, w->down, b->gate_up);
    }
    if (!matmuls_only) op->gather_rows(be, b->xb, b->x, m->logit_rows, 1, H);
    op->norm_matmul(be, b->logits, b->xb, b->final_norm, eps, 1, b->lm_head);
}

/* Metadata of one step: T tokens ending at context ctx, logits for the last. */
AttnMeta upload_meta(Bench *b, int T, int ctx, int max_blocks) {
    int32_t *h = (int32_t *)calloc((size_t)(2 + 1 + max_blocks + 3 * T), 4);
    int32_t *q_start = h, *ctx_len = h + 2, *table = ctx_len + 1, *pos = table + max_blocks, *slots = pos + T,
            *rows = slots + T;
    q_start[0] = 0, q_start[1] = T, ctx_len[0] = ctx;
    for (int j = 0; j < max_blocks; j++) table[j] = j;
    for (int t = 0; t < T; t++) pos[t] = ctx - T + t, slots[t] = pos[t];
    rows[0] = T - 1;
    b->op->to_device(b->be, b->d_meta, h, (size_t)(2 + 1 + max_blocks + 3 * T) * 4);
    free(h);
    int32_t *d = b->d_meta;
    AttnMeta m = {1, T, max_blocks, ctx, T, d, d + 2, d + 3, d + 3 + max_blocks, d + 3 + max_blocks + T,
                  d + 3 + max_blocks + 2 * T, 1};
    return m;
}

int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median over reps of the mean time of `inner` replays of graph `key` (captured from fn on first
 * use), each preceded by the embedding-sized upload of x when with_upload. */
template <class F>
double time_graph(Bench *b, uint64_t key, F fn, int reps, int inner, bool with_upload, const float *x_host) {
    const BackendOps *op = b->op;
    op->graph_begin(b->be, key);
    fn();
    op->graph_end(b->be, key);
    op->sync(b->be);
    for (int i = 0; i < 5; i++) op->graph_replay(b->be, key);
    op->sync(b->be);
    double *t = (double *)malloc(sizeof(double) * reps);
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        for (int i = 0; i < inner; i++) {
            if (with_upload) op->to_device(b->be, b->x, x_host, (size_t)H * 4);
            op->graph_replay(b->be, key);
        }
        op->sync(b->be);
        t[r] = (now_s() - t0) / inner;
    }
    qsort(t, reps, sizeof *t, cmp_double);
    double med = t[reps / 2];
    free(t);
    return med;
}

/* --matmul-m: one step's linear layers at each M of Ms (inputs random, sized for the largest M).
 * Returns nonzero when a CUDA error was recorded. */
int matmul_steps(Bench *b, const int *Ms, int n_M, bool q4, int reps) {
    const BackendOps *op = b->op;
    int max_m = 1;
    for (int i = 0; i < n_M; i++) max_m = Ms[i] > max_m ? Ms[i] : max_m;
    const size_t QKV = (size_t)(NH + 2 * NKV) * HD;
    /* inputs: x [M][H] (qkv, gate_up), attn [M][H] (o), h [M][I] (down); outputs per shape */
    float *x = (float *)op->alloc(b->be, (size_t)max_m * H * 4);
    float *attn = (float *)op->alloc(b->be, (size_t)max_m * H * 4);
    float *h = (float *)op->alloc(b->be, (size_t)max_m * I * 4);
    float *qkv = (float *)op->alloc(b->be, (size_t)max_m * QKV * 4);
    float *gate_up = (float *)op->alloc(b->be, (size_t)max_m * 2 * I * 4);
    float *out = (float *)op->alloc(b->be, (size_t)max_m * H * 4);
    if (!x || !attn || !h || !qkv || !gate_up || !out) {
        fprintf(stderr, "bench: out of GPU memory for M = %d\n", max_m);
        return 1;
    }
    float *host = (float *)malloc((size_t)max_m * I * 4);
    for (size_t i = 0; i < (size_t)max_m * I; i++) host[i] = (float)((int)(next() % 2001) - 1000) * 1e-3f;
    op->to_device(b->be, x, host, (size_t)max_m * H * 4);
    op->to_device(b->be, attn, host, (size_t)max_m * H * 4);
    op->to_device(b->be, h, host, (size_t)max_m * I * 4);
    free(host);
    const double weights = (double)(linear_bytes((int)QKV, H, q4) + linear_bytes(H, NH * HD, q4) +
                                    linear_bytes(2 * I, H, q4) + linear_bytes(H, I, q4)) * b->L;
    const double macs = ((double)QKV * H + (double)H * NH * HD + 2.0 * I * H + (double)H * I) * b->L;
    printf("qwen3-8b shapes, %d layers, %s linears (g%d): one step's %d matmuls (graph)\n", b->L, q4 ? "int4" : "bf16",
           G, 4 * b->L);
    for (int i = 0; i < n_M; i++) {
        const int M = Ms[i], inner = M <= 64 ? 10 : M <= 512 ? 3 : 1;
        /* op w of a layer: the plain step's four matmuls, or the model's three ops (qkv with its
         * RMSNorm, o with its residual add, the MLP; o from float x here, where the model's
         * attn_add from 4 tokens has the attention store bf16 and no conversion runs) */
        auto plain_op = [&](int w, const Layer *ly) {
            if (w == 0) op->matmul(b->be, qkv, x, M, ly->qkv);
            if (w == 1) op->matmul(b->be, out, attn, M, ly->o);
            if (w == 2) op->matmul(b->be, gate_up, x, M, ly->gate_up);
            if (w == 3) op->matmul(b->be, out, h, M, ly->down);
        };
        auto model_op = [&](int w, const Layer *ly) {
            if (w == 0) op->norm_matmul(b->be, qkv, x, ly->attn_norm, 1e-6f, M, ly->qkv);
            if (w == 1) op->matmul_add(b->be, out, attn, M, ly->o);
            if (w == 2) op->mlp_add(b->be, out, ly->mlp_norm, 1e-6f, M, ly->gate_up, ly->down, gate_up);
        };
        /* seconds per replay of graph `key`: ops w0 .. w1 - 1 of every layer */
        auto timed = [&](uint64_t key, const auto &one, int w0, int w1) {
            return time_graph(b, key, [&] {
                for (int l = 0; l < b->L; l++)
                    for (int w = w0; w < w1; w++) one(w, &b->layers[l]);
            }, reps, inner, false, NULL);
        };
        const double t = timed(100 + (uint64_t)i, plain_op, 0, 4);
        printf("  matmul-step M=%-5d time=%9.3f ms  TFLOP/s=%7.1f  GB/s(weights)=%6.0f\n", M, t * 1e3,
               2.0 * macs * M / t / 1e12, weights / t / 1e9);
        double each[4];
        for (int w = 0; w < 4; w++) each[w] = timed(1000 + 4 * (uint64_t)i + w, plain_op, w, w + 1) / b->L * 1e6;
        printf("    per launch (us): qkv %.1f  o %.1f  gate_up %.1f  down %.1f\n", each[0], each[1], each[2], each[3]);
        const double t_model = timed(2000 + (uint64_t)i, model_op, 0, 3);
        double part[3];
        for (int w = 0; w < 3; w++) part[w] = timed(3000 + 3 * (uint64_t)i + w, model_op, w, w + 1) / b->L * 1e6;
        printf("    as the model runs them: %9.3f ms  (per layer, us: norm + qkv %.1f  o + add %.1f  mlp %.1f)\n",
               t_model * 1e3, part[0], part[1], part[2]);
    }
    const char *e = cuda_backend_error(b->be);
    printf("  CUDA error: %s\n", e ? e : "none");
    return e ? 1 : 0;
}

/* --attn-seqs / --prefill-seqs: one step's L attentions for S sequences of context ctx each, with
 * one new token per sequence (decode) or all ctx of them (a prefill chunk of S x ctx tokens).
 * Distinct KV blocks per sequence, so the cache is read from HBM as in serving; the cache is
 * filled once (qk-norm + rope + store of every token) before the timing. Returns nonzero on a
 * CUDA error. */
int attention_steps(Bench *b, const int *Ss, int n_S, int ctx, bool prefill, int reps, KvDtype kv_dtype) {
    const BackendOps *op = b->op;
    int max_s = 1;
    for (int i = 0; i < n_S; i++) max_s = Ss[i] > max_s ? Ss[i] : max_s;
    const int mb = (ctx + BS - 1) / BS, W = (NH + 2 * NKV) * HD, nq = prefill ? ctx : 1;
    const size_t max_t = (size_t)max_s * ctx;
    QErr err;
    KVShape ks = {b->L, max_s * mb, BS, NKV, HD, kv_dtype};
    if (!(b->kv = op->kv_alloc(b->be, &ks, &err))) die("kv_alloc", err);
    float *qkv = (float *)op->alloc(b->be, max_t * W * 4), *out = (float *)op->alloc(b->be, max_t * NH * HD * 4);
    float *cs = (float *)op->alloc(b->be, max_t * HD * 4);
    size_t meta_n = (size_t)max_s * (2 + mb) + 3 * max_t + 1;
    int32_t *h = (int32_t *)calloc(meta_n, 4), *d = (int32_t *)op->alloc(b->be, meta_n * 4);
    if (!qkv || !out || !cs || !d) die("attention buffers", err);
    float *xq = (float *)malloc(max_t * W * 4);
    for (size_t i = 0; i < max_t * W; i++) xq[i] = (float)((int)(next() % 2001) - 1000) * 1e-3f;
    printf("%s attention, ctx %d, %d layers (graph), KV %s\n", prefill ? "prefill" : "decode", ctx, b->L,
           kv_dtype == KV_FP8 ? "fp8 e4m3" : "bf16");
    for (int i = 0; i < n_S; i++) {
        const int S = Ss[i], T = S * nq;
        int32_t *q_start = h, *ctx_len = q_start + S + 1, *tables = ctx_len + S, *pos = tables + (size_t)S * mb,
                *slots = pos + T, *rows = slots + T;
        for (int s = 0; s < S; s++) {
            q_start[s] = s * nq, ctx_len[s] = ctx, rows[s] = s * nq + nq - 1;
            for (int j = 0; j < mb; j++) tables[(size_t)s * mb + j] = s * mb + j;
            for (int q = 0; q < nq; q++) {
                const int t = s * nq + q, p = ctx - nq + q;
                pos[t] = p, slots[t] = tables[(size_t)s * mb + p / BS] * BS + p % BS;
            }
        }
        q_start[S] = T;
        op->to_device(b->be, d, h, (size_t)(rows + S - h) * 4);
        AttnMeta m = {S, T, mb, ctx, nq, d, d + (ctx_len - h), d + (tables - h), d + (pos - h), d + (slots - h),
                      d + (rows - h), S};
        op->to_device(b->be, qkv, xq, (size_t)T * W * 4);
        op->rope_cos_sin(b->be, cs, m.positions, T, b->inv_freq, HD / 2);
        /* (q and k are normalised again at each replay: the same work as in a step) */
        double t = time_graph(b, 200 + (uint64_t)i + (prefill ? 100 : 0), [&] {
            for (int l = 0; l < b->L; l++) {
                const AttnHeads heads = {NH, NKV, HD, b->layers[l].q_norm, b->layers[l].k_norm, 1e-6f};
                op->attention(b->be, out, qkv, &heads, cs, b->kv, l, &m);
            }
        }, reps, prefill ? 1 : 5, false, NULL);
        const double kv_bytes = (double)S * ctx * NKV * HD * 2 * (kv_dtype == KV_FP8 ? 1 : 2) * b->L;
        const double flops = 4.0 * HD * NH * b->L * S * (prefill ? (double)ctx * (ctx + 1) / 2 : (double)ctx);
        printf("  attention S=%-4d time=%8.3f ms  (%6.1f us per layer)  KV %.2f GB at %5.0f GB/s  %6.1f TFLOP/s\n", S,
               t * 1e3, t * 1e6 / b->L, kv_bytes / 1e9, kv_bytes / t / 1e9, flops / t / 1e12);
    }
    free(h), free(xq);
    const char *e = cuda_backend_error(b->be);
    printf("  CUDA error: %s\n", e ? e : "none");
    return e ? 1 : 0;
}

} // namespace

int main(int argc, char **argv) {
    bool q4 = true;
    int ctx = 512, L = 36, reps = 15;
    bool profile = false;
    int mm[32], n_mm = 0, as[32], n_as = 0;
    bool prefill_attn = false;
    KvDtype kv_dtype = KV_AUTO;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
            q4 = !strcmp(argv[++i], "int4");
        } else if (!strcmp(argv[i], "--ctx") && i + 1 < argc) {
            ctx = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--layers") && i + 1 < argc) {
            L = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--kv-dtype") && i + 1 < argc) {
            kv_dtype = !strcmp(argv[++i], "fp8") ? KV_FP8 : KV_AUTO;
        } else if (!strcmp(argv[i], "--profile")) {
            profile = true;
        } else if ((!strcmp(argv[i], "--matmul-m") || !strcmp(argv[i], "--attn-seqs") ||
                    !strcmp(argv[i], "--prefill-seqs")) && i + 1 < argc) {
            int *list = argv[i][2] == 'm' ? mm : as, *n = argv[i][2] == 'm' ? &n_mm : &n_as;
            prefill_attn = argv[i][2] == 'p';
            for (char *p = argv[++i], *end; *p && *n < 32; p = *end ? end + 1 : end) {
                list[*n] = (int)strtol(p, &end, 10);
                if (end == p || list[*n] < 1) return 2;
                ++*n;
            }
        } else {
            fprintf(stderr, "usage: %s [--dtype int4|bf16] [--ctx N] [--layers L] [--reps R] [--profile]"
                            " [--matmul-m M,M,...] [--attn-seqs S,S,...] [--prefill-seqs S,S,...]"
                            " [--kv-dtype bf16|fp8]\n", argv[0]);
            return 2;
        }
    }
    if (ctx < 2 || L < 1 || reps < 1) return 2;
    QErr err;
    Bench b = {};
    b.be = cuda_backend_create(0, &err);
    if (!b.be) die("cuda_backend_create", err);
    b.op = b.be->ops;
    b.L = L;
    const BackendOps *op = b.op;
    double probe = op->probe_bandwidth(b.be);

    /* weights: one host copy of each shape, uploaded once per layer (distinct device copies) */
    double t0 = now_s();
    HostLinear hq, hk, hv, ho, hg, hu, hd, hlm;
    host_linear(&hq, "q_proj", NH * HD, H, q4);
    host_linear(&hk, "k_proj", NKV * HD, H, q4);
    host_linear(&hv, "v_proj", NKV * HD, H, q4);
    host_linear(&ho, "o_proj", H, NH * HD, q4);
    host_linear(&hg, "gate_proj", I, H, q4);
    host_linear(&hu, "up_proj", I, H, q4);
    host_linear(&hd, "down_proj", H, I, q4);
    host_linear(&hlm, "lm_head", V, H, false);
    float *ones = (float *)malloc(sizeof(float) * H);
    for (int i = 0; i < H; i++) ones[i] = 1.0f + 0.001f * (float)(i % 7);
    StTensor normH = {"norm", DT_F32, 1, {H}, ones, (size_t)H * 4, NULL};
    StTensor normD = {"qk_norm", DT_F32, 1, {HD}, ones, (size_t)HD * 4, NULL};
    b.layers = (Layer *)calloc(L, sizeof(Layer));
    for (int l = 0; l < L; l++) {
        Layer *w = &b.layers[l];
        LinearSource qkv[3] = {hq.src, hk.src, hv.src}, gu[2] = {hg.src, hu.src};
        if (!(w->qkv = op->linear_load(b.be, qkv, 3, &err)) || !(w->o = op->linear_load(b.be, &ho.src, 1, &err)) ||
            !(w->gate_up = op->linear_load(b.be, gu, 2, &err)) || !(w->down = op->linear_load(b.be, &hd.src, 1, &err)))
            die("linear_load", err);
        w->attn_norm = op->vector_load(b.be, &normH, &err);
        w->mlp_norm = op->vector_load(b.be, &normH, &err);
        w->q_norm = op->vector_load(b.be, &normD, &err);
        w->k_norm = op->vector_load(b.be, &normD, &err);
    }
    if (!(b.lm_head = op->linear_load(b.be, &hlm.src, 1, &err))) die("lm_head", err);
    b.final_norm = op->vector_load(b.be, &normH, &err);
    float inv[HD / 2];
    for (int i = 0; i < HD / 2; i++) inv[i] = 1.0f / powf(1000000.0f, (float)(2 * i) / (float)HD);
    b.inv_freq = (float *)op->alloc(b.be, sizeof inv);
    op->to_device(b.be, b.inv_freq, inv, sizeof inv);
    double t_load = now_s() - t0;
    if (n_mm || n_as) {
        int rc = n_mm ? matmul_steps(&b, mm, n_mm, q4, reps) : attention_steps(&b, as, n_as, ctx, prefill_attn, reps, kv_dtype);
        free(ones);
        free_host_linear(&hq), free_host_linear(&hk), free_host_linear(&hv), free_host_linear(&ho);
        free_host_linear(&hg), free_host_linear(&hu), free_host_linear(&hd), free_host_linear(&hlm);
        b.be->ops->destroy(b.be);
        free(b.layers);
        return rc;
    }

    const int T = ctx - 1, max_blocks = (ctx + BS - 1) / BS;
    KVShape ks = {L, max_blocks, BS, NKV, HD, kv_dtype};
    if (!(b.kv = op->kv_alloc(b.be, &ks, &err))) die("kv_alloc", err);
    struct {
        float **p;
        size_t n;
    } bufs[] = {{&b.x, (size_t)T * H},       {&b.xb, (size_t)T * H},          {&b.qkv, (size_t)T * (NH + 2 * NKV) * HD},
                {&b.attn, (size_t)T * NH * HD}, {&b.gate_up, (size_t)T * 2 * I},
                {&b.cs, (size_t)T * HD},     {&b.logits, (size_t)V}};
    for (auto &bf : bufs)
        if (!(*bf.p = (float *)op->alloc(b.be, bf.n * 4))) die("activations", err);
    b.d_meta = (int32_t *)op->alloc(b.be, (size_t)(3 + max_blocks + 3 * T) * 4);
    float *xh = (float *)malloc((size_t)T * H * 4);
    for (size_t i = 0; i < (size_t)T * H; i++) xh[i] = (float)((int)(next() % 2001) - 1000) * 1e-3f;

    if (profile) {
        AttnMeta dm = upload_meta(&b, 1, ctx, max_blocks);
        op->to_device(b.be, b.x, xh, (size_t)H * 4);
        forward(&b, &dm, 1, false);
        op->sync(b.be);
        const char *e = cuda_backend_error(b.be);
        printf("profile step done; CUDA error: %s\n", e ? e : "none");
        b.be->ops->destroy(b.be);
        return e ? 1 : 0;
    }

    /* prefill of the first T tokens (fills the cache the decode step reads); second run timed */
    AttnMeta pm = upload_meta(&b, T, T, max_blocks);
    double t_prefill = 0;
    for (int rep = 0; rep < 2; rep++) {
        op->to_device(b.be, b.x, xh, (size_t)T * H * 4);
        op->sync(b.be);
        double s = now_s();
        forward(&b, &pm, T, false);
        op->sync(b.be);
        t_prefill = now_s() - s;
    }

    /* decode step at context ctx */
    AttnMeta dm = upload_meta(&b, 1, ctx, max_blocks);
    double t_step = time_graph(&b, 1, [&] { forward(&b, &dm, 1, false); }, reps, 20, true, xh);
    double t_mm = time_graph(&b, 2, [&] { forward(&b, &dm, 1, true); }, reps, 20, false, xh);
    double t_lm = time_graph(&b, 3, [&] { op->matmul(b.be, b.logits, b.xb, 1, b.lm_head); }, reps, 50, false, xh);
    /* each matmul of the layers alone, and each other op alone (L or 2L launches per graph) */
    double t_mat[4];
    for (int w = 0; w < 4; w++)
        t_mat[w] = time_graph(&b, 10 + w, [&] {
            for (int l = 0; l < L; l++) {
                const Layer *ly = &b.layers[l];
                if (w == 0) op->norm_matmul(b.be, b.qkv, b.x, ly->attn_norm, 1e-6f, 1, ly->qkv);
                if (w == 1) op->matmul_add(b.be, b.xb, b.attn, 1, ly->o);
                if (w == 2) op->norm_matmul(b.be, b.gate_up, b.x, ly->mlp_norm, 1e-6f, 1, ly->gate_up);
                if (w == 3) op->swiglu_matmul_add(b.be, b.xb, b.gate_up, 1, I, ly->down);
            }
        }, reps, 20, false, xh);
    /* the same with layer 0's weights every time: what each matmul costs when its weights are
     * already in L2 (they fit, but for gate_up), i.e. what an L2 prefetch could win at most */
    double t_mat_l2[4];
    for (int w = 0; w < 4; w++)
        t_mat_l2[w] = time_graph(&b, 30 + w, [&] {
            for (int l = 0; l < L; l++) {
                const Layer *ly = &b.layers[0];
                if (w == 0) op->norm_matmul(b.be, b.qkv, b.x, ly->attn_norm, 1e-6f, 1, ly->qkv);
                if (w == 1) op->matmul_add(b.be, b.xb, b.attn, 1, ly->o);
                if (w == 2) op->norm_matmul(b.be, b.gate_up, b.x, ly->mlp_norm, 1e-6f, 1, ly->gate_up);
                if (w == 3) op->swiglu_matmul_add(b.be, b.xb, b.gate_up, 1, I, ly->down);
            }
        }, reps, 20, false, xh);
    const double t_attn = time_graph(&b, 20, [&] {
        for (int l = 0; l < L; l++) {
            const Layer *ly = &b.layers[l];
            const AttnHeads heads = {NH, NKV, HD, ly->q_norm, ly->k_norm, 1e-6f};
            op->attention(b.be, b.attn, b.qkv, &heads, b.cs, b.kv, l, &dm);
        }
    }, reps, 20, false, xh);
    /* the same step captured with programmatic dependent launch switched the other way */
    const bool pdl = cu_pdl;
    cu_pdl = cu_pdl_now = !pdl;
    double t_step_flip = time_graph(&b, 5, [&] { forward(&b, &dm, 1, false); }, reps, 20, true, xh);
    cu_pdl = cu_pdl_now = pdl;
    float *lg = (float *)malloc((size_t)V * 4);
    op->to_host(b.be, lg, b.logits, (size_t)V * 4);
    int finite = 1;
    for (int i = 0; i < V; i++) finite &= isfinite(lg[i]) != 0;

    size_t layer_w = linear_bytes(NH * HD + 2 * NKV * HD, H, q4) + linear_bytes(H, NH * HD, q4) +
                     linear_bytes(2 * I, H, q4) + linear_bytes(H, I, q4);
    size_t lm_w = linear_bytes(V, H, false), kv_bytes = (size_t)ctx * L * NKV * HD * 2 * 2;
    double step_bytes = (double)layer_w * L + lm_w + kv_bytes;
    size_t peak = 0, used = op->mem_used(b.be, &peak);
    const char *e = cuda_backend_error(b.be);
    printf("qwen3-8b shapes, %d layers, %s linears (g%d), bf16 lm_head, ctx %d\n", L, q4 ? "int4" : "bf16", G, ctx);
    printf("  weights uploaded in %.1f s; GPU memory %.2f GB in use, %.2f GB peak\n", t_load, used / 1e9, peak / 1e9);
    printf("  copy probe (device to device, read + write): %.0f GB/s\n", probe);
    printf("  bytes per decode step: %.3f GB (layers %.3f, lm_head %.3f, KV %.3f)\n", step_bytes / 1e9,
           (double)layer_w * L / 1e9, lm_w / 1e9, kv_bytes / 1e9);
    printf("  floor at the probe's rate: %.3f ms\n", step_bytes / (probe * 1e9) * 1e3);
    printf("  %-40s %9.3f ms  %6.0f GB/s  %5.1f%% of probe  (PDL %s)\n", "decode step (upload + graph)",
           t_step * 1e3, step_bytes / t_step / 1e9, 100 * step_bytes / t_step / 1e9 / probe, pdl ? "on" : "off");
    printf("  %-40s %9.3f ms  %6.0f GB/s  %5.1f%% of probe  (PDL %s)\n", "decode step, PDL switched", t_step_flip * 1e3,
           step_bytes / t_step_flip / 1e9, 100 * step_bytes / t_step_flip / 1e9 / probe, pdl ? "off" : "on");
    double mm_bytes = (double)layer_w * L + lm_w;
    printf("  %-40s %9.3f ms  %6.0f GB/s  %5.1f%% of probe\n", "matmuls only (graph)", t_mm * 1e3,
           mm_bytes / t_mm / 1e9, 100 * mm_bytes / t_mm / 1e9 / probe);
    printf("  %-40s %9.3f ms  %6.0f GB/s  %5.1f%% of probe\n", "lm_head alone (graph)", t_lm * 1e3, lm_w / t_lm / 1e9,
           100 * lm_w / t_lm / 1e9 / probe);
    const char *mat_names[] = {"qkv", "o", "gate_up", "down"};
    const size_t mat_bytes[] = {linear_bytes(NH * HD + 2 * NKV * HD, H, q4), linear_bytes(H, NH * HD, q4),
                                linear_bytes(2 * I, H, q4), linear_bytes(H, I, q4)};
    for (int w = 0; w < 4; w++) {
        double by = (double)mat_bytes[w] * L;
        char name[64];
        snprintf(name, sizeof name, "%s x %d alone (graph)", mat_names[w], L);
        printf("  %-40s %9.3f ms  %6.0f GB/s  %5.1f%% of probe  (%.1f us each)\n", name, t_mat[w] * 1e3,
               by / t_mat[w] / 1e9, 100 * by / t_mat[w] / 1e9 / probe, t_mat[w] * 1e6 / L);
        snprintf(name, sizeof name, "%s x %d, layer 0's (L2)", mat_names[w], L);
        printf("  %-40s %9.3f ms  %6.0f GB/s  %5.1f%% of probe  (%.1f us each)\n", name, t_mat_l2[w] * 1e3,
               by / t_mat_l2[w] / 1e9, 100 * by / t_mat_l2[w] / 1e9 / probe, t_mat_l2[w] * 1e6 / L);
    }
    {
        char name[64];
        snprintf(name, sizeof name, "attention (+ q/k norm) x %d alone (graph)", L);
        printf("  %-40s %9.3f ms  (%.2f us each)\n", name, t_attn * 1e3, t_attn * 1e6 / L);
    }
    printf("  %-40s %9.1f ms  %6.0f tokens/s\n", "prefill (eager)", t_prefill * 1e3, T / t_prefill);
    printf("  logits finite: %s; CUDA error: %s\n", finite ? "yes" : "NO", e ? e : "none");

    free(lg), free(xh), free(ones);
    free_host_linear(&hq), free_host_linear(&hk), free_host_linear(&hv), free_host_linear(&ho);
    free_host_linear(&hg), free_host_linear(&hu), free_host_linear(&hd), free_host_linear(&hlm);
    b.be->ops->destroy(b.be);
    free(b.layers);
    return e || !finite ? 1 : 0;
}
