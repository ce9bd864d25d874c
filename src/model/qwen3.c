/* qwen3.c — Qwen3 weights and forward pass, written once against the backend ops.
 *
 * Loading checks every tensor against the config before anything runs: an int4 checkpoint
 * replaces `NAME.weight` of each quantized linear by NAME.qweight/scales/zeros (the format of
 * ../shared/spec/int4-checkpoint.md); anything missing, misshapen or left over is an error that
 * names the tensor. q|k|v and gate|up are loaded as single stacked Linears so each is one matmul.
 *
 * The forward pass mirrors transformers' Qwen3ForCausalLM: embed, then per layer
 *   h = x + o(attn(rope(qk_norm(q, k)), v))   with x normalised by input_layernorm,
 *   x = h + down(silu(gate(h')) * up(h'))      with h' = post_attention_layernorm(h),
 * then the final norm and lm_head on the rows whose logits are wanted. */
#include "model/qwen3.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- loading ----------------------------------------------------------------------------- */

typedef struct Loader {
    Model *m;
    const char *dir;
    bool *used;   /* [st_count]: tensors the config accounts for (leftovers are errors) */
    QErr *err;
} Loader;

/* Finds NAME with the given rank and dims (dims[i] < 0: any). */
static const StTensor *need(Loader *L, const char *name, int ndim, int64_t d0, int64_t d1) {
    const StTensor *t = st_find(L->m->st, name);
    if (!t) {
        qerr_set(L->err, "%s: tensor '%s' is missing from the checkpoint", L->dir, name);
        return NULL;
    }
    if (t->ndim != ndim || (d0 >= 0 && t->shape[0] != d0) || (ndim > 1 && d1 >= 0 && t->shape[1] != d1)) {
        char want[64], got[64];
        if (ndim == 1)
            snprintf(want, sizeof want, "[%lld]", (long long)d0);
        else
            snprintf(want, sizeof want, "[%lld, %lld]", (long long)d0, (long long)d1);
        if (t->ndim == 1)
            snprintf(got, sizeof got, "[%lld]", (long long)t->shape[0]);
        else if (t->ndim == 2)
            snprintf(got, sizeof got, "[%lld, %lld]", (long long)t->shape[0], (long long)t->shape[1]);
        else
            snprintf(got, sizeof got, "(%d dims)", t->ndim);
        qerr_set(L->err, "%s: tensor '%s' has shape %s, config.json implies %s", t->file, name, got, want);
        return NULL;
    }
    L->used[t - st_at(L->m->st, 0)] = true;
    return t;
}

static bool is_float(DType dt) { return dt == DT_BF16 || dt == DT_F16 || dt == DT_F32; }

static float *load_vector(Loader *L, const char *name, int64_t n) {
    const StTensor *t = need(L, name, 1, n, 0);
    if (!t) return NULL;
    if (!is_float(t->dtype)) {
        qerr_set(L->err, "%s: tensor '%s' has dtype %s, expected a float type", t->file, name, dtype_name(t->dtype));
        return NULL;
    }
    Backend *be = L->m->be;
    return be->ops->vector_load(be, t, L->err);
}

/* Describes linear BASE (".weight" dense, or ".qweight/.scales/.zeros" int4) of shape [n][k]. */
static int linear_source(Loader *L, const char *base, int64_t n, int64_t k, LinearSource *src) {
    char name[256];
    memset(src, 0, sizeof *src);
    src->name = base;
    src->n = n;
    src->k = k;
    snprintf(name, sizeof name, "%s.qweight", base);
    if (st_find(L->m->st, name)) {
        int g = L->m->cfg.group_size;
        if (!L->m->cfg.quantized)
            return qerr_set(L->err, "%s: tensor '%s' is int4 but config.json has no quantization_config", L->dir, name);
        if (k % g)
            return qerr_set(L->err, "%s: in_features %lld of '%s' is not a multiple of group_size %d", L->dir, (long long)k, base, g);
        src->q4 = true;
        src->group_size = g;
        if (!(src->qweight = need(L, name, 2, n, k / 2))) return -1;
        snprintf(name, sizeof name, "%s.scales", base);
        if (!(src->scales = need(L, name, 2, n, k / g))) return -1;
        snprintf(name, sizeof name, "%s.zeros", base);
        if (!(src->zeros = need(L, name, 2, n, k / g))) return -1;
        if (src->qweight->dtype != DT_U8 || src->scales->dtype != DT_BF16 || src->zeros->dtype != DT_BF16)
            return qerr_set(L->err, "%s: int4 tensors of '%s' must be U8 qweight and BF16 scales/zeros", L->dir, base);
        return 0;
    }
    snprintf(name, sizeof name, "%s.weight", base);
    if (!(src->dense = need(L, name, 2, n, k))) return -1;
    if (!is_float(src->dense->dtype))
        return qerr_set(L->err, "%s: tensor '%s' has dtype %s, expected BF16, F16 or F32", src->dense->file, name,
                        dtype_name(src->dense->dtype));
    return 0;
}

static Linear *load_linear(Loader *L, const char *const *bases, const int64_t *ns, int n_parts, int64_t k) {
    LinearSource parts[3];
    for (int i = 0; i < n_parts; i++)
        if (linear_source(L, bases[i], ns[i], k, &parts[i])) return NULL;
    Backend *be = L->m->be;
    return be->ops->linear_load(be, parts, n_parts, L->err);
}

static int load_layer(Loader *L, int i, LayerWeights *lw) {
    const QwenConfig *c = &L->m->cfg;
    int64_t H = c->hidden_size, hd = c->head_dim, nh = c->num_attention_heads, nkv = c->num_key_value_heads;
    int64_t I = c->intermediate_size;
    char p[128], a[160], b[160], d[160];
    snprintf(p, sizeof p, "model.layers.%d", i);

    snprintf(a, sizeof a, "%s.input_layernorm.weight", p);
    if (!(lw->attn_norm = load_vector(L, a, H))) return -1;
    snprintf(a, sizeof a, "%s.post_attention_layernorm.weight", p);
    if (!(lw->mlp_norm = load_vector(L, a, H))) return -1;
    snprintf(a, sizeof a, "%s.self_attn.q_norm.weight", p);
    if (!(lw->q_norm = load_vector(L, a, hd))) return -1;
    snprintf(a, sizeof a, "%s.self_attn.k_norm.weight", p);
    if (!(lw->k_norm = load_vector(L, a, hd))) return -1;

    snprintf(a, sizeof a, "%s.self_attn.q_proj", p);
    snprintf(b, sizeof b, "%s.self_attn.k_proj", p);
    snprintf(d, sizeof d, "%s.self_attn.v_proj", p);
    const char *qkv[3] = {a, b, d};
    int64_t qkv_n[3] = {nh * hd, nkv * hd, nkv * hd};
    if (!(lw->qkv = load_linear(L, qkv, qkv_n, 3, H))) return -1;

    snprintf(a, sizeof a, "%s.self_attn.o_proj", p);
    const char *o[1] = {a};
    int64_t o_n[1] = {H};
    if (!(lw->o = load_linear(L, o, o_n, 1, nh * hd))) return -1;

    snprintf(a, sizeof a, "%s.mlp.gate_proj", p);
    snprintf(b, sizeof b, "%s.mlp.up_proj", p);
    const char *gu[2] = {a, b};
    int64_t gu_n[2] = {I, I};
    if (!(lw->gate_up = load_linear(L, gu, gu_n, 2, H))) return -1;

    snprintf(a, sizeof a, "%s.mlp.down_proj", p);
    const char *dn[1] = {a};
    int64_t dn_n[1] = {H};
    if (!(lw->down = load_linear(L, dn, dn_n, 1, I))) return -1;
    return 0;
}

ModelOptions model_default_options(const QwenConfig *cfg) {
    ModelOptions o = {.max_step_tokens = 512, .max_seqs = 1, .block_size = 16};
    o.max_ctx = cfg->max_position_embeddings < 4096 ? cfg->max_position_embeddings : 4096;
    return o;
}

static int alloc_scratch(Model *m, QErr *err) {
    const QwenConfig *c = &m->cfg;
    Backend *be = m->be;
    size_t T = (size_t)m->opt.max_step_tokens;
    size_t qkv_w = (size_t)(c->num_attention_heads + 2 * c->num_key_value_heads) * c->head_dim;
    struct {
        float **p;
        size_t n;
    } bufs[] = {
        {&m->x, T * c->hidden_size},
        {&m->xb, T * c->hidden_size},
        {&m->qkv, T * qkv_w},
        {&m->attn, T * c->num_attention_heads * c->head_dim},
        {&m->gate_up, T * 2 * c->intermediate_size},
        {&m->cs, T * c->head_dim},
        {&m->logits, (size_t)m->opt.max_logit_rows * c->vocab_size},
    };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        *bufs[i].p = be->ops->alloc(be, bufs[i].n * sizeof(float));
        if (!*bufs[i].p) return qerr_set(err, "out of %s memory for activations (%zu bytes)", be->ops->name, bufs[i].n * 4);
    }
    size_t max_blocks = ((size_t)m->opt.max_ctx + m->opt.block_size - 1) / m->opt.block_size;
    size_t S = (size_t)m->opt.max_seqs;
    size_t meta_n = (S + 1) + S + S * max_blocks + 3 * T;
    m->d_meta = be->ops->alloc(be, meta_n * sizeof(int32_t));
    m->h_meta = malloc(meta_n * sizeof(int32_t));
    if (!m->d_meta || !m->h_meta) return qerr_set(err, "out of memory for step metadata");
    return 0;
}

Model *model_load(const char *dir, Backend *be, const ModelOptions *opt, QErr *err) {
    QwenConfig cfg;
    GenConfig gen;
    if (config_load(&cfg, dir, err) || gen_config_load(&gen, &cfg, dir, err)) return NULL;
    StModel *st = st_open_dir(dir, err);
    if (!st) return NULL;
    return model_create(&cfg, &gen, st, be, opt, dir, err);
}

/* KV blocks when the pool is sized by a fraction of the device (ModelOptions.kv_mem_fraction):
 * the memory free now, less the part of the device to leave unused and a reserve for scratch
 * that backends grow on first use (bf16 copies of activations and, for long steps, of one
 * dequantized weight matrix: a generous estimate), in whole blocks, at most cap. */
static long kv_blocks_by_memory(const Model *m, long cap) {
    Backend *be = m->be;
    const QwenConfig *c = &m->cfg;
    size_t total = 0, avail = be->ops->mem_free(be, &total);
    size_t keep = (size_t)((1.0 - m->opt.kv_mem_fraction) * (double)total);
    size_t reserve = (size_t)m->opt.max_step_tokens * ((size_t)c->intermediate_size * 2 + (size_t)c->hidden_size * 4) +
                     (size_t)c->intermediate_size * c->hidden_size * 2 + ((size_t)256 << 20);
    size_t per_block = (size_t)c->num_hidden_layers * 2 * c->num_key_value_heads * c->head_dim *
                       kv_dtype_bytes(be->ops, m->opt.kv_dtype) * m->opt.block_size;
    if (avail <= keep + reserve || per_block == 0) return 0;
    long fit = (long)((avail - keep - reserve) / per_block);
    return fit < cap ? fit : cap;
}

Model *model_create(const QwenConfig *cfg, const GenConfig *gen, StModel *st, Backend *be, const ModelOptions *opt,
                    const char *dir, QErr *err) {
    Model *m = calloc(1, sizeof *m);
    if (!m) {
        st_close(st);
        qerr_set(err, "out of memory");
        return NULL;
    }
    m->be = be;
    m->st = st;
    m->cfg = *cfg;
    m->gen = *gen;
    Loader L = {.m = m, .dir = dir, .err = err, .used = calloc(st_count(st) + 1, sizeof(bool))};
    const QwenConfig *c = &m->cfg;
    if (!L.used) {
        qerr_set(err, "out of memory");
        goto fail;
    }
    m->opt = opt ? *opt : model_default_options(c);
    if (m->opt.max_logit_rows <= 0) m->opt.max_logit_rows = m->opt.max_step_tokens;
    if (m->opt.max_ctx > c->max_position_embeddings) m->opt.max_ctx = c->max_position_embeddings;
    if (m->opt.max_step_tokens < 1 || m->opt.max_seqs < 1 || m->opt.block_size < 1 || m->opt.max_ctx < 1) {
        qerr_set(err, "invalid model options (step tokens %d, seqs %d, block size %d, context %d)",
                 m->opt.max_step_tokens, m->opt.max_seqs, m->opt.block_size, m->opt.max_ctx);
        goto fail;
    }
    if (c->head_dim % 2) {
        qerr_set(err, "%s/config.json: head_dim %d must be even for RoPE", dir, c->head_dim);
        goto fail;
    }

    const StTensor *emb = need(&L, "model.embed_tokens.weight", 2, c->vocab_size, c->hidden_size);
    if (!emb) goto fail;
    if (!(m->final_norm = load_vector(&L, "model.norm.weight", c->hidden_size))) goto fail;
    const char *lm_name = c->tie_word_embeddings ? "model.embed_tokens" : "lm_head";
    const char *lm[1] = {lm_name};
    int64_t lm_n[1] = {c->vocab_size};
    if (!(m->lm_head = load_linear(&L, lm, lm_n, 1, c->hidden_size))) goto fail;

    m->layers = calloc((size_t)c->num_hidden_layers, sizeof *m->layers);
    if (!m->layers) {
        qerr_set(err, "out of memory");
        goto fail;
    }
    for (int i = 0; i < c->num_hidden_layers; i++)
        if (load_layer(&L, i, &m->layers[i])) goto fail;
    /* after the layers: a resident table takes device memory only where the weights left room */
    if (!(m->embed = be->ops->embedding_load(be, emb, m->opt.embed_resident, err))) goto fail;

    for (size_t i = 0; i < st_count(m->st); i++) {
        const StTensor *t = st_at(m->st, i);
        if (!L.used[i]) {
            qerr_set(err, "%s: unexpected tensor '%s' (not part of a %d-layer Qwen3)", t->file, t->name, c->num_hidden_layers);
            goto fail;
        }
    }

    /* inv_freq exactly as transformers: float32 arange / dim, then base ** that in float32. */
    int half = c->head_dim / 2;
    float *inv = malloc((size_t)half * sizeof(float));
    for (int i = 0; i < half; i++) inv[i] = 1.0f / powf((float)c->rope_theta, (float)(2 * i) / (float)c->head_dim);
    m->inv_freq = be->ops->alloc(be, (size_t)half * sizeof(float));
    if (m->inv_freq) be->ops->to_device(be, m->inv_freq, inv, (size_t)half * sizeof(float));
    free(inv);
    if (!m->inv_freq) {
        qerr_set(err, "out of memory");
        goto fail;
    }

    if (alloc_scratch(m, err)) goto fail;
    int blocks_per_seq = (m->opt.max_ctx + m->opt.block_size - 1) / m->opt.block_size;
    long n_blocks = m->opt.kv_blocks > 0 ? m->opt.kv_blocks : (long)blocks_per_seq * m->opt.max_seqs;
    if (m->opt.kv_mem_fraction > 0 && be->ops->mem_free) {
        n_blocks = kv_blocks_by_memory(m, (long)blocks_per_seq * m->opt.max_seqs);
        if (n_blocks < blocks_per_seq) {
            qerr_set(err,
                     "%s memory: the KV cache of one %d-token request does not fit in %.0f%% of the device after "
                     "the weights (lower --max-model-len or raise --gpu-memory-utilization)",
                     be->ops->name, m->opt.max_ctx, 100 * m->opt.kv_mem_fraction);
            goto fail;
        }
    }
    m->kv_shape = (KVShape){
        .n_layers = c->num_hidden_layers,
        .n_blocks = (int)n_blocks,
        .block_size = m->opt.block_size,
        .n_kv_heads = c->num_key_value_heads,
        .head_dim = c->head_dim,
        .dtype = m->opt.kv_dtype,
    };
    if (!(m->kv = be->ops->kv_alloc(be, &m->kv_shape, err))) goto fail;
    free(L.used);
    return m;
fail:
    free(L.used);
    model_free(m);
    return NULL;
}

void model_free(Model *m) {
    if (!m) return;
    Backend *be = m->be;
    if (m->layers) {
        for (int i = 0; i < m->cfg.num_hidden_layers; i++) {
            LayerWeights *lw = &m->layers[i];
            be->ops->free(be, lw->attn_norm);
            be->ops->free(be, lw->mlp_norm);
            be->ops->free(be, lw->q_norm);
            be->ops->free(be, lw->k_norm);
            if (lw->qkv) be->ops->linear_free(be, lw->qkv);
            if (lw->o) be->ops->linear_free(be, lw->o);
            if (lw->gate_up) be->ops->linear_free(be, lw->gate_up);
            if (lw->down) be->ops->linear_free(be, lw->down);
        }
        free(m->layers);
    }
    if (m->embed) be->ops->embedding_free(be, m->embed);
    if (m->lm_head) be->ops->linear_free(be, m->lm_head);
    be->ops->free(be, m->final_norm);
    be->ops->free(be, m->inv_freq);
    float *bufs[] = {m->x, m->xb, m->qkv, m->attn, m->gate_up, m->cs, m->logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be->ops->free(be, bufs[i]);
    be->ops->free(be, m->d_meta);
    if (m->kv) be->ops->kv_free(be, m->kv);
    free(m->h_meta);
    st_close(m->st);
    free(m);
}

int model_eos_ids(const Model *m, int32_t out[2 * CONFIG_MAX_EOS]) {
    const int V = m->cfg.vocab_size;
    int n = 0;
    for (int i = 0; i < m->gen.n_eos; i++)
        if (m->gen.eos_token_ids[i] >= 0 && m->gen.eos_token_ids[i] < V) out[n++] = m->gen.eos_token_ids[i];
    for (int i = 0; i < m->cfg.n_eos; i++)
        if (m->cfg.eos_token_ids[i] >= 0 && m->cfg.eos_token_ids[i] < V) out[n++] = m->cfg.eos_token_ids[i];
    return n;
}

size_t model_weight_bytes_per_step(const Model *m) {
    size_t total = 0;
    for (size_t i = 0; i < st_count(m->st); i++) total += st_at(m->st, i)->nbytes;
    if (!m->cfg.tie_word_embeddings) total -= st_find(m->st, "model.embed_tokens.weight")->nbytes;
    return total;
}

/* ---- forward ----------------------------------------------------------------------------- */

/* Lays the step's metadata out in h_meta, uploads it, and points meta's arrays at the device
 * copy. Returns the number of rows that need logits. */
static int build_meta(Model *m, const Step *st, AttnMeta *meta) {
    int bs = m->opt.block_size;
    int max_blocks = (m->opt.max_ctx + bs - 1) / bs;
    int S = st->n_seqs, T = 0;
    for (int s = 0; s < S; s++) T += st->seqs[s].n_tokens;

    int32_t *q_start = m->h_meta;
    int32_t *ctx_len = q_start + (S + 1);
    int32_t *tables = ctx_len + S;
    int32_t *positions = tables + (size_t)S * max_blocks;
    int32_t *slots = positions + T;
    int32_t *logit_rows = slots + T;
    int n_rows = 0, t = 0, max_ctx = 0, max_q = 0;
    for (int s = 0; s < S; s++) {
        const StepSeq *q = &st->seqs[s];
        q_start[s] = t;
        ctx_len[s] = q->ctx_len;
        int nb = (q->ctx_len + bs - 1) / bs;
        memcpy(tables + (size_t)s * max_blocks, q->block_table, (size_t)nb * sizeof(int32_t));
        for (int i = 0; i < q->n_tokens; i++, t++) {
            int pos = q->ctx_len - q->n_tokens + i;
            positions[t] = pos;
            slots[t] = q->block_table[pos / bs] * bs + pos % bs;
            if (!q->no_logits && (q->all_logits || i == q->n_tokens - 1)) logit_rows[n_rows++] = t;
        }
        if (q->ctx_len > max_ctx) max_ctx = q->ctx_len;
        if (q->n_tokens > max_q) max_q = q->n_tokens;
    }
    q_start[S] = t;
    size_t n = (size_t)(logit_rows + n_rows - m->h_meta);
    m->be->ops->to_device(m->be, m->d_meta, m->h_meta, n * sizeof(int32_t));
    int32_t *d = m->d_meta;
    *meta = (AttnMeta){
        .n_seqs = S,
        .n_tokens = T,
        .max_blocks = max_blocks,
        .max_ctx = max_ctx,
        .max_q = max_q,
        .q_start = d,
        .ctx_len = d + (ctx_len - m->h_meta),
        .block_tables = d + (tables - m->h_meta),
        .positions = d + (positions - m->h_meta),
        .slots = d + (slots - m->h_meta),
        .logit_rows = d + (logit_rows - m->h_meta),
        .n_logit_rows = n_rows,
    };
    return n_rows;
}

float *model_forward(Model *m, const Step *step, int *n_rows) {
    const QwenConfig *c = &m->cfg;
    Backend *be = m->be;
    const BackendOps *op = be->ops;
    int H = c->hidden_size, hd = c->head_dim;
    int nh = c->num_attention_heads, nkv = c->num_key_value_heads;
    float eps = c->rms_norm_eps;

    AttnMeta meta;
    int rows = build_meta(m, step, &meta);
    int T = meta.n_tokens;

    op->embed(be, m->x, step->tokens, T, m->embed);

    /* Decode steps (one token per sequence) have few shapes and run every few milliseconds:
     * where the backend can, they are captured once per shape and replayed (CUDA graphs). */
    bool graphable = op->graph_replay && T == meta.n_seqs;
    uint64_t key = (uint64_t)T | (uint64_t)rows << 24;
    if (graphable && op->graph_replay(be, key)) {
        *n_rows = rows;
        return m->logits;
    }
    if (graphable) op->graph_begin(be, key);
    op->rope_cos_sin(be, m->cs, meta.positions, T, m->inv_freq, hd / 2);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const LayerWeights *w = &m->layers[l];
        /* x += o(attention(q, k, v)), with q|k|v = rmsnorm(x) W_qkv^T */
        op->norm_matmul(be, m->qkv, m->x, w->attn_norm, eps, T, w->qkv);
        const AttnHeads heads = {nh, nkv, hd, w->q_norm, w->k_norm, eps};
        op->attn_add(be, m->x, m->qkv, &heads, m->cs, m->kv, l, &meta, w->o, m->attn);

        /* x += down(silu(gate) * up), with gate|up = rmsnorm(x) W_gate_up^T */
        op->mlp_add(be, m->x, w->mlp_norm, eps, T, w->gate_up, w->down, m->gate_up);
    }

    /* Only the rows whose logits are wanted go through the final norm and lm_head (all of them in
     * a decode step, where the gather would be a copy). */
    const float *last = m->x;
    if (rows < T) {
        op->gather_rows(be, m->xb, m->x, meta.logit_rows, rows, H);
        last = m->xb;
    }
    op->norm_matmul(be, m->logits, last, m->final_norm, eps, rows, m->lm_head);
    if (graphable) op->graph_end(be, key);
    *n_rows = rows;
    return m->logits;
}
