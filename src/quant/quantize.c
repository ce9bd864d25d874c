/* quantize.c — `quill quantize` as a library function: bf16 checkpoint in, int4 checkpoint out.
 *
 * Workload: a few hundred matrices of up to ~50M weights (Qwen3-8B: 252 of them, 7 G weights,
 * 16 GB of bf16), each quantized by many passes over it (HQQ), plus a few large tensors copied
 * as they are. Design: validate everything first (a bad tensor found after an hour is a bad
 * experience), then stream one source tensor at a time from the mmap'd source straight into the
 * mmap'd, pre-allocated output file, with the thread pool working inside each matrix. Pages of
 * the source and of the output are released (madvise DONTNEED) as soon as a tensor is done:
 * output pages are shared file pages, so their contents stay in the page cache to be written
 * back, and the process's resident size stays near one matrix instead of the model. The output
 * is staged (ckpt_dir.h) so that a failure leaves nothing that looks like a checkpoint. */
#include "quant/quantize.h"

#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "io/ckpt_dir.h"
#include "io/config.h"
#include "io/safetensors.h"

#define QUANTIZE_SHARD_BYTES 5000000000ull /* Hugging Face's default max_shard_size, "5GB" */
#define COPY_CHUNK (64u << 20)

/* Small files carried over from the source when present. */
static const char *const COPIED_FILES[] = {
    "generation_config.json", "tokenizer.json",    "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json",       "merges.txt",
    "added_tokens.json",       "chat_template.jinja", "LICENSE",
    "NOTICE",
};

/* One source tensor and what becomes of it. */
typedef struct Item {
    const StTensor *src;
    bool quantize;
    int shard;
    uint64_t out_bytes;
} Item;

void quantize_options_default(QuantizeOptions *o) {
    memset(o, 0, sizeof *o);
    o->group_size = 128;
    o->algorithm = Q4_HQQ;
}

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !memcmp(s + n - m, suffix, m);
}

/* Drops the whole pages inside [p, p + n) from this process's memory (they stay in the page
 * cache; shared file pages keep their new contents). */
static void release_pages(const void *p, size_t n) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1);
    uintptr_t b = ((uintptr_t)p + n) & ~(page - 1);
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

/* "PREFIX.qweight" etc. for a matrix named "PREFIX.weight". */
static int derived_name(char *out, size_t n, const char *weight_name, const char *suffix) {
    size_t base = strlen(weight_name) - strlen(".weight");
    return (size_t)snprintf(out, n, "%.*s.%s", (int)base, weight_name, suffix) >= n ? -1 : 0;
}

static const char *const Q_SUFFIX[3] = {"qweight", "scales", "zeros"};

/* The output tensors of item it: 1 or 3 specs with malloc'd names appended to specs[*n]. */
static int item_specs(const Item *it, int gs, StSpec *specs, size_t *n, QErr *err) {
    const StTensor *t = it->src;
    if (!it->quantize) {
        StSpec *s = &specs[(*n)++];
        s->name = strdup(t->name);
        s->dtype = t->dtype;
        s->ndim = t->ndim;
        memcpy(s->shape, t->shape, sizeof s->shape);
        return s->name ? 0 : qerr_set(err, "out of memory");
    }
    for (int k = 0; k < 3; k++) {
        char name[1024];
        if (derived_name(name, sizeof name, t->name, Q_SUFFIX[k]))
            return qerr_set(err, "tensor name too long: %s", t->name);
        StSpec *s = &specs[(*n)++];
        s->name = strdup(name);
        s->dtype = k == 0 ? DT_U8 : DT_BF16;
        s->ndim = 2;
        s->shape[0] = t->shape[0];
        s->shape[1] = k == 0 ? t->shape[1] / 2 : t->shape[1] / gs;
        if (!s->name) return qerr_set(err, "out of memory");
    }
    return 0;
}

static void free_specs(StSpec *specs, size_t n) {
    for (size_t i = 0; i < n; i++) free((char *)specs[i].name);
}

/* Checks the source and decides each tensor's fate and shard. */
static int plan(const StModel *m, const QwenConfig *cfg, const QuantizeOptions *opt, Item *items,
                int *n_shards, uint64_t *weights_total, QErr *err) {
    const size_t n = st_count(m);
    const int gs = opt->group_size;
    bool have_lm_head = false;
    *weights_total = 0;
    for (size_t i = 0; i < n; i++) {
        const StTensor *t = st_at(m, i);
        Item *it = &items[i];
        it->src = t;
        if (ends_with(t->name, ".qweight") || ends_with(t->name, ".scales"))
            return qerr_set(err, "%s: tensor %s: the checkpoint is already quantized", t->file,
                            t->name);
        have_lm_head |= !strcmp(t->name, "lm_head.weight");
        it->quantize = ends_with(t->name, "_proj.weight") ||
                       (opt->quantize_lm_head && !strcmp(t->name, "lm_head.weight"));
        if (!it->quantize) {
            it->out_bytes = t->nbytes;
            continue;
        }
        if (t->dtype != DT_BF16)
            return qerr_set(err, "%s: tensor %s is %s; only BF16 matrices can be quantized",
                            t->file, t->name, dtype_name(t->dtype));
        if (t->ndim != 2)
            return qerr_set(err, "%s: tensor %s has %d dimensions, expected 2", t->file, t->name,
                            t->ndim);
        if (q4_check_shape(t->shape[0], t->shape[1], gs, err))
            return qerr_prefix(err, "%s: tensor %s [%lld, %lld]", t->file, t->name,
                               (long long)t->shape[0], (long long)t->shape[1]);
        uint64_t rows = (uint64_t)t->shape[0], cols = (uint64_t)t->shape[1];
        it->out_bytes = rows * cols / 2 + 2 * 2 * rows * (cols / (uint64_t)gs);
        *weights_total += rows * cols;
    }
    if (*weights_total == 0)
        return qerr_set(err, "%s: no *_proj.weight matrices to quantize", n ? st_at(m, 0)->file
                                                                             : "checkpoint");
    if (opt->quantize_lm_head && (cfg->tie_word_embeddings || !have_lm_head))
        return qerr_set(err, "--quantize-lm-head: the model has no lm_head.weight of its own%s",
                        cfg->tie_word_embeddings ? " (tie_word_embeddings: it is the embedding)"
                                                 : "");

    const uint64_t max_shard = opt->max_shard_bytes ? opt->max_shard_bytes : QUANTIZE_SHARD_BYTES;
    int shard = 0;
    uint64_t in_shard = 0;
    for (size_t i = 0; i < n; i++) {
        if (in_shard > 0 && in_shard + items[i].out_bytes > max_shard) {
            shard++;
            in_shard = 0;
        }
        items[i].shard = shard;
        in_shard += items[i].out_bytes;
    }
    *n_shards = shard + 1;
    return 0;
}

static void shard_name(char *out, size_t n, int shard, int n_shards) {
    if (n_shards == 1)
        snprintf(out, n, "model.safetensors");
    else
        snprintf(out, n, "model-%05d-of-%05d.safetensors", shard + 1, n_shards);
}

/* Quantizes or copies one item into the open writer. */
static int write_item(const Item *it, StWriter *w, const QuantizeOptions *opt, ThreadPool *pool,
                      QuantizeReport *rep, QErr *err) {
    const StTensor *t = it->src;
    if (!it->quantize) {
        StTensor *d = st_writer_find(w, t->name);
        for (size_t off = 0; off < t->nbytes; off += COPY_CHUNK) {
            size_t len = t->nbytes - off < COPY_CHUNK ? t->nbytes - off : COPY_CHUNK;
            memcpy((char *)d->data + off, (const char *)t->data + off, len);
            release_pages((const char *)t->data + off, len);
            release_pages((char *)d->data + off, len);
        }
        return 0;
    }
    StTensor *out[3];
    for (int k = 0; k < 3; k++) {
        char name[1024];
        derived_name(name, sizeof name, t->name, Q_SUFFIX[k]);
        out[k] = st_writer_find(w, name);
    }
    const int64_t rows = t->shape[0], cols = t->shape[1];
    if (q4_quantize_bf16(opt->algorithm, t->data, rows, cols, opt->group_size, pool,
                         out[0]->data, out[1]->data, out[2]->data, err))
        return qerr_prefix(err, "%s: tensor %s", t->file, t->name);
    double rel = q4_rel_error(t->data, rows, cols, opt->group_size, out[0]->data, out[1]->data,
                              out[2]->data, pool);
    rep->n_quantized++;
    rep->n_weights += (uint64_t)(rows * cols);
    rep->mean_rel_err += rel; /* divided by n_quantized at the end */
    if (rel > rep->max_rel_err || rep->n_quantized == 1) {
        rep->max_rel_err = rel;
        size_t base = strlen(t->name) - strlen(".weight");
        snprintf(rep->worst, sizeof rep->worst, "%.*s", (int)base, t->name);
    }
    release_pages(t->data, t->nbytes);
    for (int k = 0; k < 3; k++) release_pages(out[k]->data, out[k]->nbytes);
    return 0;
}

/* Writes one safetensors file holding the items of `shard`. */
static int write_shard(const CkptStage *st, const Item *items, size_t n_items, int shard,
                       int n_shards, const QuantizeOptions *opt, ThreadPool *pool,
                       QuantizeProgress *prog, QuantizeReport *rep, QErr *err) {
    char fname[64], path[PATH_MAX];
    shard_name(fname, sizeof fname, shard, n_shards);
    if (ckpt_stage_path(st, fname, path, sizeof path, err)) return -1;
    size_t n_specs = 0, cap = 0;
    for (size_t i = 0; i < n_items; i++) cap += items[i].shard == shard ? 3 : 0;
    StSpec *specs = calloc(cap ? cap : 1, sizeof *specs);
    if (!specs) return qerr_set(err, "out of memory");
    int rc = 0;
    for (size_t i = 0; i < n_items && !rc; i++)
        if (items[i].shard == shard)
            rc = item_specs(&items[i], opt->group_size, specs, &n_specs, err);
    StWriter *w = NULL;
    if (!rc) {
        static const char *const meta[] = {"format", "pt"};
        w = st_writer_create(path, specs, n_specs, meta, 1, err);
        if (!w) rc = -1;
    }
    free_specs(specs, n_specs);
    free(specs);
    for (size_t i = 0; i < n_items && !rc; i++) {
        if (items[i].shard != shard) continue;
        rc = write_item(&items[i], w, opt, pool, rep, err);
        if (rc) break;
        prog->tensor = items[i].src->name;
        prog->tensors_done++;
        if (items[i].quantize)
            prog->weights_done += (uint64_t)(items[i].src->shape[0] * items[i].src->shape[1]);
        if (opt->progress) opt->progress(opt->progress_ctx, prog);
    }
    if (rc) {
        if (w) st_writer_abort(w);
        return rc;
    }
    for (size_t i = 0; i < n_items; i++)
        if (items[i].shard == shard) rep->bytes_written += items[i].out_bytes;
    return st_writer_finish(w, err);
}

/* model.safetensors.index.json for a sharded checkpoint, as transformers writes it. */
static int write_index(const CkptStage *st, const Item *items, size_t n_items, int n_shards,
                       int gs, QErr *err) {
    json_t *root = json_object(), *meta = json_object(), *map = json_object();
    uint64_t total = 0;
    int rc = 0;
    for (size_t i = 0; i < n_items && !rc; i++) {
        char fname[64];
        shard_name(fname, sizeof fname, items[i].shard, n_shards);
        total += items[i].out_bytes;
        StSpec specs[3];
        size_t n = 0;
        rc = item_specs(&items[i], gs, specs, &n, err);
        for (size_t k = 0; k < n && !rc; k++)
            if (json_object_set_new(map, specs[k].name, json_string(fname)))
                rc = qerr_set(err, "out of memory");
        free_specs(specs, n);
    }
    json_object_set_new(meta, "total_size", json_integer((json_int_t)total));
    json_object_set_new(root, "metadata", meta);
    json_object_set_new(root, "weight_map", map);
    char path[PATH_MAX];
    if (!rc && ckpt_stage_path(st, "model.safetensors.index.json", path, sizeof path, err))
        rc = -1;
    if (!rc && json_dump_file(root, path, JSON_INDENT(2) | JSON_SORT_KEYS))
        rc = qerr_set(err, "%s: cannot write", path);
    json_decref(root);
    return rc;
}

/* Refuses a destination that is the source or contains it (replacing it would delete it). */
static int check_not_source(const char *src_dir, const char *dst_dir, QErr *err) {
    char rs[PATH_MAX], rd[PATH_MAX];
    if (!realpath(src_dir, rs) || !realpath(dst_dir, rd)) return 0; /* dst does not exist yet */
    size_t n = strlen(rd);
    if (!strcmp(rs, rd) || (!strncmp(rs, rd, n) && (rd[n - 1] == '/' || rs[n] == '/')))
        return qerr_set(err, "%s holds the source checkpoint %s; refusing to replace it", dst_dir,
                        src_dir);
    return 0;
}

int quantize_checkpoint(const char *src_dir, const char *dst_dir, const QuantizeOptions *opt,
                        QuantizeReport *report, QErr *err) {
    QuantizeReport rep_local;
    QuantizeReport *rep = report ? report : &rep_local;
    memset(rep, 0, sizeof *rep);
    if (q4_check_shape(1, opt->group_size, opt->group_size, err)) return -1;
    QwenConfig cfg;
    if (config_load(&cfg, src_dir, err)) return -1;
    if (cfg.quantized)
        return qerr_set(err, "%s: already quantized (config.json has a quantization_config)",
                        src_dir);
    if (check_not_source(src_dir, dst_dir, err)) return -1;

    StModel *m = st_open_dir(src_dir, err);
    if (!m) return -1;
    const size_t n_items = st_count(m);
    Item *items = calloc(n_items ? n_items : 1, sizeof *items);
    ThreadPool *pool = NULL;
    CkptStage st;
    memset(&st, 0, sizeof st);
    int n_shards = 0, rc = -1;
    QuantizeProgress prog = {0};
    if (!items) {
        qerr_set(err, "out of memory");
        goto out;
    }
    if (plan(m, &cfg, opt, items, &n_shards, &prog.weights_total, err)) goto out;
    prog.tensors_total = (int)n_items;
    if (!(pool = tp_create(opt->n_threads > 0 ? opt->n_threads : 0, err))) goto out;
    if (ckpt_stage_begin(&st, dst_dir, opt->force, err)) goto out;

    for (int s = 0; s < n_shards; s++)
        if (write_shard(&st, items, n_items, s, n_shards, opt, pool, &prog, rep, err)) goto out;
    if (n_shards > 1 && write_index(&st, items, n_items, n_shards, opt->group_size, err))
        goto out;
    if (config_save_quantized(src_dir, st.tmp, opt->group_size, q4_algorithm_name(opt->algorithm),
                              opt->quantize_lm_head, err))
        goto out;
    for (size_t i = 0; i < sizeof COPIED_FILES / sizeof *COPIED_FILES; i++)
        if (ckpt_stage_copy(&st, src_dir, COPIED_FILES[i], true, err)) goto out;
    if (ckpt_stage_commit(&st, err)) goto out;
    rep->n_shards = n_shards;
    if (rep->n_quantized) rep->mean_rel_err /= rep->n_quantized;
    rc = 0;
out:
    ckpt_stage_abort(&st);
    tp_free(pool);
    free(items);
    st_close(m);
    return rc;
}
