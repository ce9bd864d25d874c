/* random_weights.c — see random_weights.h. Tensors are generated one at a time with all cores;
 * for int4 a linear's bf16 values live only in a scratch buffer while they are quantized, so peak
 * host memory is the int4 model plus one bf16 matrix. */
#include "model/random_weights.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/random_model.h"
#include "quant/q4.h"
#include "util/threadpool.h"

#define GROUP 128

static bool is_linear(const char *name) {
    size_t n = strlen(name);
    return n > 12 && !strcmp(name + n - 12, "_proj.weight");
}

StModel *random_weights_build(const char *preset, bool int4, QwenConfig *cfg, GenConfig *gen, QErr *err) {
    uint64_t seed;
    if (rm_preset(preset, cfg, &seed, err)) return NULL;
    rm_gen_config(gen);
    size_t n = 0;
    StSpec *src = rm_tensor_specs(cfg, &n, err);
    if (!src) return NULL;
    /* The specs of what we hold: each int4 linear as three tensors. */
    StSpec *specs = calloc(3 * n, sizeof *specs);
    char **names = calloc(3 * n, sizeof *names);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        if (!int4 || !is_linear(src[i].name)) {
            specs[m++] = src[i];
            continue;
        }
        size_t base = strlen(src[i].name) - strlen(".weight");
        int64_t rows = src[i].shape[0], cols = src[i].shape[1];
        const char *suffix[3] = {".qweight", ".scales", ".zeros"};
        for (int k = 0; k < 3; k++) {
            names[m] = malloc(base + 16);
            snprintf(names[m], base + 16, "%.*s%s", (int)base, src[i].name, suffix[k]);
            specs[m] = (StSpec){names[m], k ? DT_BF16 : DT_U8, 2, {rows, k ? cols / GROUP : cols / 2}};
            m++;
        }
    }
    char label[96];
    snprintf(label, sizeof label, "random %s (%s)", preset, int4 ? "int4" : "bf16");
    StModel *st = st_create_memory(specs, m, label, err);
    ThreadPool *pool = st ? tp_create(0, err) : NULL;
    uint16_t *scratch = NULL;
    int rc = st && pool ? 0 : -1;
    for (size_t i = 0; i < n && rc == 0; i++) {
        const StSpec *s = &src[i];
        if (!int4 || !is_linear(s->name)) {
            rc = rm_fill_tensor(st_find(st, s->name)->data, s->name, s->ndim, s->shape, seed, pool, err);
            continue;
        }
        size_t count = (size_t)(s->shape[0] * s->shape[1]);
        free(scratch);
        if (!(scratch = malloc(count * sizeof *scratch))) {
            rc = qerr_set(err, "out of memory generating %s", s->name);
            break;
        }
        size_t base = strlen(s->name) - strlen(".weight");
        char q[256], sc[256], z[256];
        snprintf(q, sizeof q, "%.*s.qweight", (int)base, s->name);
        snprintf(sc, sizeof sc, "%.*s.scales", (int)base, s->name);
        snprintf(z, sizeof z, "%.*s.zeros", (int)base, s->name);
        rc = rm_fill_tensor(scratch, s->name, s->ndim, s->shape, seed, pool, err);
        if (rc == 0)
            rc = q4_quantize_bf16(Q4_MINMAX, scratch, s->shape[0], s->shape[1], GROUP, pool, st_find(st, q)->data,
                                  st_find(st, sc)->data, st_find(st, z)->data, err);
    }
    free(scratch);
    tp_free(pool);
    for (size_t i = 0; i < m; i++) free(names[i]);
    free(names);
    free(specs);
    rm_specs_free(src, n);
    if (rc) {
        st_close(st);
        return NULL;
    }
    if (int4) {
        cfg->quantized = true;
        cfg->group_size = GROUP;
        snprintf(cfg->quant_algorithm, sizeof cfg->quant_algorithm, "minmax");
    }
    return st;
}
