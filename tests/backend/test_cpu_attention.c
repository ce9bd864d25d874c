/* test_cpu_attention.c — the CPU backend's attention op with the fp8 KV cache (KVShape.dtype
 * KV_FP8) on small random inputs: three sequences over two steps (prefills, a chunk that
 * continues a prefill, a decode, a sequence that starts in the second step), blocks of 4 tokens
 * taken from the pool in shuffled order, GQA (4 query heads on 2 KV heads), head size 40 (not a
 * multiple of the dot product's 16 lanes), layer 1 of 2.
 *
 * The op normalises and rotates k before it stores it, so to know exactly what an fp8 cache must
 * hold the first case makes that step the identity: norm weights 2^20 with eps 2^40 (the sum
 * (float)(ss / hd) + eps rounds to 2^40, so every row is scaled by 2^-20 and back, exactly) and
 * RoPE at angle 0 (cos 1, sin 0). Then the fp8 run must equal, bit for bit, a float32-cache run
 * fed K and V already rounded to e4m3; agree with a double-precision attention written here over
 * those rounded values; and differ from a float32 run on the unrounded values (K spans the
 * subnormal codes, V reaches past the saturation at 448). The second case has real norm weights
 * and RoPE angles: fp8 and float32 caches agree to e4m3's precision (a few percent) but not
 * exactly; storing k before its norm and RoPE, or not rounding, would fail it. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "backend/backend.h"
#include "util/fp8.h"

enum { NH = 4, NKV = 2, HD = 40, BS = 4, N_BLOCKS = 16, N_LAYERS = 2, LAYER = 1, W = (NH + 2 * NKV) * HD };
enum { N_SEQS = 3, N_STEPS = 2, MAX_BLOCKS = 4 };

/* Tokens of each sequence in each step (context grows by them). */
static const int step_tokens[N_STEPS][N_SEQS] = {{7, 10, 0}, {1, 3, 5}};

static uint64_t rng = 88172645463325252ull;
static double uniform(void) { /* [0, 1) */
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}
/* A random sign times 2^e, e uniform in [lo, hi). */
static float log_uniform(double lo, double hi) {
    return (float)((uniform() < 0.5 ? -1 : 1) * exp2(lo + (hi - lo) * uniform()));
}

static float round_fp8(float x) { return fp8_e4m3_to_f32(fp8_e4m3_from_f32(x)); }

typedef struct Step {
    int n_tokens, n_seqs;
    int seq_of[32], pos_of[32]; /* per token */
    int32_t q_start[N_SEQS + 1], ctx_len[N_SEQS], positions[32], slots[32], logit_rows[32];
} Step;

static int32_t block_tables[N_SEQS][MAX_BLOCKS];

/* The step's metadata: every sequence with tokens in the step, in order. */
static void make_step(Step *st, int step, AttnMeta *meta) {
    memset(st, 0, sizeof *st);
    int ctx[N_SEQS] = {0};
    for (int k = 0; k <= step; k++)
        for (int s = 0; s < N_SEQS; s++) ctx[s] += step_tokens[k][s];
    int max_ctx = 0, max_q = 0;
    for (int s = 0; s < N_SEQS; s++) {
        int n = step_tokens[step][s];
        if (!n) continue;
        int i = st->n_seqs++;
        st->q_start[i] = st->n_tokens;
        st->ctx_len[i] = ctx[s];
        for (int p = ctx[s] - n; p < ctx[s]; p++) {
            int t = st->n_tokens++;
            st->seq_of[t] = s, st->pos_of[t] = p;
            st->positions[t] = p;
            st->slots[t] = block_tables[s][p / BS] * BS + p % BS;
            st->logit_rows[t] = t;
        }
        st->q_start[i + 1] = st->n_tokens;
        if (ctx[s] > max_ctx) max_ctx = ctx[s];
        if (n > max_q) max_q = n;
    }
    /* block tables of the step's sequences, in step order */
    static int32_t tables[N_SEQS][MAX_BLOCKS];
    for (int i = 0, s = 0; s < N_SEQS; s++)
        if (step_tokens[step][s]) memcpy(tables[i++], block_tables[s], sizeof tables[0]);
    *meta = (AttnMeta){.n_seqs = st->n_seqs, .n_tokens = st->n_tokens, .max_blocks = MAX_BLOCKS, .max_ctx = max_ctx,
                       .max_q = max_q, .q_start = st->q_start, .ctx_len = st->ctx_len, .block_tables = &tables[0][0],
                       .positions = st->positions, .slots = st->slots, .logit_rows = st->logit_rows,
                       .n_logit_rows = st->n_tokens};
}

/* Inputs of one case: qkv rows per step and token, norm weights, cos/sin per step and token. */
typedef struct Case {
    float qkv[N_STEPS][32][W];
    float cs[N_STEPS][32][HD];
    float q_norm[HD], k_norm[HD], eps;
} Case;

/* Runs both steps through the attention op on a fresh cache of dtype; K and V inputs rounded to
 * e4m3 first if pre_round. out[step][token][NH * HD]. Returns 0, or -1 (reported) on failure. */
static int run(Backend *be, const Case *c, KvDtype dtype, bool pre_round, float out[N_STEPS][32][NH * HD]) {
    QErr err;
    KVShape ks = {.n_layers = N_LAYERS, .n_blocks = N_BLOCKS, .block_size = BS, .n_kv_heads = NKV, .head_dim = HD,
                  .dtype = dtype};
    void *kv = be->ops->kv_alloc(be, &ks, &err);
    CHECK(kv != NULL, "kv_alloc: %s", kv ? "" : err.msg);
    if (!kv) return -1;
    AttnHeads ah = {.nh = NH, .nkv = NKV, .hd = HD, .q_norm = c->q_norm, .k_norm = c->k_norm, .eps = c->eps};
    static float qkv[32][W];
    for (int step = 0; step < N_STEPS; step++) {
        Step st;
        AttnMeta meta;
        make_step(&st, step, &meta);
        memcpy(qkv, c->qkv[step], sizeof qkv);
        if (pre_round)
            for (int t = 0; t < st.n_tokens; t++)
                for (int i = NH * HD; i < W; i++) qkv[t][i] = round_fp8(qkv[t][i]);
        be->ops->attention(be, &out[step][0][0], &qkv[0][0], &ah, &c->cs[step][0][0], kv, LAYER, &meta);
    }
    be->ops->kv_free(be, kv);
    return 0;
}

/* Double-precision attention of both steps over the e4m3-rounded raw K and V (case 1, where the
 * op's norm and RoPE are the identity): each token attends to its sequence's positions 0..itself. */
static void reference(const Case *c, double out[N_STEPS][32][NH * HD]) {
    static float k[N_SEQS][64][NKV * HD], v[N_SEQS][64][NKV * HD]; /* by sequence and position */
    for (int step = 0; step < N_STEPS; step++) {
        Step st;
        AttnMeta meta;
        make_step(&st, step, &meta);
        for (int t = 0; t < st.n_tokens; t++)
            for (int i = 0; i < NKV * HD; i++) {
                k[st.seq_of[t]][st.pos_of[t]][i] = round_fp8(c->qkv[step][t][NH * HD + i]);
                v[st.seq_of[t]][st.pos_of[t]][i] = round_fp8(c->qkv[step][t][(NH + NKV) * HD + i]);
            }
        for (int t = 0; t < st.n_tokens; t++)
            for (int h = 0; h < NH; h++) {
                const int s = st.seq_of[t], g = h / (NH / NKV);
                const float *q = &c->qkv[step][t][h * HD];
                double sc[64], mx = -INFINITY, sum = 0;
                for (int p = 0; p <= st.pos_of[t]; p++) {
                    double d = 0;
                    for (int i = 0; i < HD; i++) d += (double)q[i] * k[s][p][g * HD + i];
                    sc[p] = d / sqrt(HD);
                    if (sc[p] > mx) mx = sc[p];
                }
                for (int p = 0; p <= st.pos_of[t]; p++) sum += sc[p] = exp(sc[p] - mx);
                for (int i = 0; i < HD; i++) {
                    double o = 0;
                    for (int p = 0; p <= st.pos_of[t]; p++) o += sc[p] / sum * v[s][p][g * HD + i];
                    out[step][t][h * HD + i] = o;
                }
            }
    }
}

/* relative L2 distance ||a - b|| / ||b|| over the steps' tokens */
static double rel_l2(const float a[N_STEPS][32][NH * HD], const float b[N_STEPS][32][NH * HD]) {
    double d = 0, m = 0;
    for (int step = 0; step < N_STEPS; step++)
        for (int t = 0; t < 32; t++)
            for (int i = 0; i < NH * HD; i++) {
                d += ((double)a[step][t][i] - b[step][t][i]) * ((double)a[step][t][i] - b[step][t][i]);
                m += (double)b[step][t][i] * b[step][t][i];
            }
    return sqrt(d / m);
}

/* max |a - b| / max |b| over the steps' tokens */
static double max_rel(const float a[N_STEPS][32][NH * HD], const float b[N_STEPS][32][NH * HD]) {
    double d = 0, m = 0;
    for (int step = 0; step < N_STEPS; step++)
        for (int t = 0; t < 32; t++)
            for (int i = 0; i < NH * HD; i++) {
                d = fmax(d, fabs((double)a[step][t][i] - b[step][t][i]));
                m = fmax(m, fabs((double)b[step][t][i]));
            }
    return d / m;
}

static float out_fp8[N_STEPS][32][NH * HD], out_rounded[N_STEPS][32][NH * HD], out_f32[N_STEPS][32][NH * HD];
static double out_ref[N_STEPS][32][NH * HD];
static Case c;

int main(void) {
    QErr err;
    Backend *be = cpu_backend_create(2, &err);
    CHECK(be != NULL, "cpu_backend_create: %s", be ? "" : err.msg);
    if (!be) return test_finish();
    CHECK(kv_dtype_bytes(be->ops, KV_FP8) == 1 && kv_dtype_bytes(be->ops, KV_AUTO) == 4, "KV value bytes %d / %d",
          kv_dtype_bytes(be->ops, KV_FP8), kv_dtype_bytes(be->ops, KV_AUTO));
    /* each sequence's blocks: a shuffle of the pool */
    int perm[N_BLOCKS];
    for (int i = 0; i < N_BLOCKS; i++) perm[i] = i;
    for (int i = N_BLOCKS - 1; i > 0; i--) {
        int j = (int)(uniform() * (i + 1)), x = perm[i];
        perm[i] = perm[j], perm[j] = x;
    }
    for (int s = 0; s < N_SEQS; s++)
        for (int b = 0; b < MAX_BLOCKS; b++) block_tables[s][b] = perm[s * MAX_BLOCKS + b];

    /* case 1: norm and RoPE are the identity (see the top); q in [-1, 1], K of magnitude 2^-11
     * .. 2^2 (subnormal codes below 2^-6), V 2^-11 .. 2^10 (saturating past 448), a few zeros */
    for (int i = 0; i < HD; i++) c.q_norm[i] = c.k_norm[i] = 0x1p20f;
    c.eps = 0x1p40f;
    for (int step = 0; step < N_STEPS; step++)
        for (int t = 0; t < 32; t++) {
            for (int i = 0; i < HD; i++) c.cs[step][t][i] = i < HD / 2 ? 1.0f : 0.0f;
            for (int i = 0; i < W; i++) {
                float x = i < NH * HD ? (float)(2 * uniform() - 1)
                          : i < (NH + NKV) * HD ? log_uniform(-11, 2)
                                                : log_uniform(-11, 10);
                c.qkv[step][t][i] = uniform() < 0.02 ? 0.0f : x;
            }
        }
    if (run(be, &c, KV_FP8, false, out_fp8) || run(be, &c, KV_AUTO, true, out_rounded) ||
        run(be, &c, KV_AUTO, false, out_f32))
        goto done;
    reference(&c, out_ref);
    CHECK(!memcmp(out_fp8, out_rounded, sizeof out_fp8), "fp8 cache == float32 cache of rounded K/V (max rel %.3g)",
          max_rel(out_fp8, out_rounded));
    double worst = 0;
    for (int step = 0; step < N_STEPS; step++) {
        Step st;
        AttnMeta meta;
        make_step(&st, step, &meta);
        double m = 0;
        for (int t = 0; t < st.n_tokens; t++)
            for (int i = 0; i < NH * HD; i++) m = fmax(m, fabs(out_ref[step][t][i]));
        for (int t = 0; t < st.n_tokens; t++)
            for (int i = 0; i < NH * HD; i++) worst = fmax(worst, fabs(out_fp8[step][t][i] - out_ref[step][t][i]) / m);
    }
    CHECK(worst < 1e-5, "fp8 cache vs the double reference: max rel %.3g", worst);
    double diff = max_rel(out_fp8, out_f32);
    CHECK(diff > 1e-3, "fp8 cache differs from float32 on unrounded K/V: max rel %.3g", diff);

    /* case 2: real norm weights (around 1) and RoPE angles, raw values ~ N(0, 1)-ish */
    for (int i = 0; i < HD; i++) c.q_norm[i] = (float)(0.5 + uniform()), c.k_norm[i] = (float)(0.5 + uniform());
    c.eps = 1e-6f;
    for (int step = 0; step < N_STEPS; step++) {
        Step st;
        AttnMeta meta;
        make_step(&st, step, &meta);
        for (int t = 0; t < 32; t++) {
            for (int i = 0; i < HD / 2; i++) {
                float a = (float)st.positions[t] * powf(10000.0f, -2.0f * i / HD);
                c.cs[step][t][i] = cosf(a), c.cs[step][t][HD / 2 + i] = sinf(a);
            }
            for (int i = 0; i < W; i++) c.qkv[step][t][i] = (float)(2 * uniform() - 1 + 2 * uniform() - 1);
        }
    }
    if (run(be, &c, KV_FP8, false, out_fp8) || run(be, &c, KV_AUTO, false, out_f32)) goto done;
    /* e4m3 keeps 3 mantissa bits: each value rounds by up to 2^-4 of itself, ~2.5% rms, and these
     * short contexts average only a few rows (measured: 0.029) */
    diff = rel_l2(out_fp8, out_f32);
    CHECK(diff > 0.005 && diff < 0.06, "real norm and RoPE: fp8 vs float32 cache relative L2 %.3g, want 0.005 .. 0.06",
          diff);
done:
    be->ops->destroy(be);
    return test_finish();
}
