/* test_random_model.c — the random-weights generator against ../shared/spec/random-weights.md:
 * the files' sha256 equal the spec's, the tensor list matches the reference int4 checkpoint's
 * linear layers, the vectorised fill equals the literal per-element formula on odd ranges, and
 * the in-memory fill gives the same bytes as the file. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/random_model.h"
#include "io/safetensors.h"
#include "../test_util.h"

static char tmpdir[256];

/* The sha256 the spec's table gives for a model (read from the spec itself). */
static int spec_sha(const char *model, char out[65]) {
    FILE *f = fopen(shared_path("spec/random-weights.md"), "r");
    if (!f) return -1;
    char line[1024];
    int rc = -1;
    while (fgets(line, sizeof line, f)) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "| %s |", model);
        if (strncmp(line, prefix, strlen(prefix))) continue;
        char *bar = strrchr(line, '|');
        *bar = '\0';
        char *start = strrchr(line, '|') + 1;
        if (sscanf(start, " %64s", out) == 1 && strlen(out) == 64) rc = 0;
        break;
    }
    fclose(f);
    return rc;
}

static int file_sha(const char *path, char out[65]) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "sha256sum '%s'", path);
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    int ok = fscanf(p, "%64s", out) == 1;
    pclose(p);
    return ok ? 0 : -1;
}

static void test_hashes(void) {
    /* FNV-1a 64 test vectors from the algorithm's reference. */
    CHECK(rm_fnv1a64("") == 0xCBF29CE484222325ULL, "fnv1a64('')");
    CHECK(rm_fnv1a64("a") == 0xAF63DC4C8601EC8CULL, "fnv1a64('a')");
    CHECK(rm_fnv1a64("foobar") == 0x85944171F73967E8ULL, "fnv1a64('foobar')");
    CHECK(rm_stream("a", 5) == (0xAF63DC4C8601EC8CULL ^ 5), "stream");
    RmKind k;
    CHECK(!rm_kind_of("model.layers.3.self_attn.q_norm.weight", &k) && k == RM_NORM, "q_norm");
    CHECK(!rm_kind_of("model.norm.weight", &k) && k == RM_NORM, "norm");
    CHECK(!rm_kind_of("lm_head.weight", &k) && k == RM_EMBED, "lm_head");
    CHECK(!rm_kind_of("model.layers.0.mlp.down_proj.weight", &k) && k == RM_LINEAR, "down");
    CHECK(rm_kind_of("model.layers.0.mlp.down_proj.bias", &k) == -1, "bias has no rule");
}

/* The fast fill equals the spec's formula element by element, on ranges that start and end at
 * odd places (vector body and scalar tail), for every kind. */
static void test_fill_matches_reference(void) {
    const uint64_t n = 1000003;
    uint16_t *buf = malloc(4096 * sizeof *buf);
    const RmKind kinds[] = {RM_NORM, RM_EMBED, RM_LINEAR};
    int outliers = 0;
    for (int ki = 0; ki < 3; ki++) {
        uint64_t stream = rm_stream("model.layers.0.mlp.up_proj.weight", (uint64_t)ki + 7);
        const uint64_t begins[] = {0, 1, 3, 7, 8, 13, 999, 500001, n - 37};
        for (size_t b = 0; b < sizeof begins / sizeof begins[0]; b++) {
            for (uint64_t len = 0; len <= 37 && begins[b] + len <= n; len += (len < 20 ? 1 : 17)) {
                rm_fill_range(buf, stream, kinds[ki], n, begins[b], begins[b] + len);
                for (uint64_t i = 0; i < len; i++)
                    CHECK(buf[i] == rm_element(stream, kinds[ki], n, begins[b] + i),
                          "kind %d element %llu", ki, (unsigned long long)(begins[b] + i));
            }
        }
        rm_fill_range(buf, stream, kinds[ki], n, 123457, 123457 + 4096);
        int bad = 0;
        for (int i = 0; i < 4096; i++) {
            bad += buf[i] != rm_element(stream, kinds[ki], n, 123457 + (uint64_t)i);
            /* |x| <= 2*sqrt(3): linear values beyond 0.02*3.47 must be x8 outliers. */
            if (kinds[ki] == RM_LINEAR && (buf[i] & 0x7FFF) > 0x3D90) outliers++;
        }
        CHECK(bad == 0, "kind %d: %d of 4096 differ", ki, bad);
    }
    /* ~0.1% outliers expected in 4096 draws: some, not many. */
    CHECK(outliers >= 1 && outliers <= 20, "outliers %d", outliers);
    free(buf);
}

/* Linear layer names from the reference int4 checkpoint (NAME.qweight for each NAME.weight). */
static void check_linear_names(const StSpec *specs, size_t n, const char *ref) {
    QErr err = {{0}};
    StModel *m = st_open_file(shared_path(ref), &err);
    CHECK(m != NULL, "%s: %s", ref, err.msg);
    if (!m) return;
    size_t n_ref = 0, n_ours = 0;
    for (size_t i = 0; i < st_count(m); i++) {
        const char *name = st_at(m, i)->name;
        size_t len = strlen(name);
        if (len < 8 || strcmp(name + len - 8, ".qweight")) continue;
        n_ref++;
        char want[256];
        snprintf(want, sizeof want, "%.*s.weight", (int)(len - 8), name);
        int found = 0;
        for (size_t j = 0; j < n; j++) {
            if (strcmp(specs[j].name, want)) continue;
            found = 1;
            /* qweight is [out, in/2] */
            CHECK(specs[j].shape[0] == st_at(m, i)->shape[0] &&
                      specs[j].shape[1] == 2 * st_at(m, i)->shape[1],
                  "%s: shape", want);
        }
        CHECK(found, "%s: in the reference, not in our list", want);
    }
    for (size_t j = 0; j < n; j++) {
        size_t len = strlen(specs[j].name);
        n_ours += len > 12 && !strcmp(specs[j].name + len - 12, "_proj.weight");
    }
    CHECK(n_ref == n_ours && n_ref > 0, "%s: %zu linear layers there, %zu here", ref, n_ref, n_ours);
    st_close(m);
}

static void progress_cb(void *ctx, uint64_t done, uint64_t total) {
    uint64_t *last = ctx;
    CHECK(done <= total, "progress %llu > %llu", (unsigned long long)done,
          (unsigned long long)total);
    last[0] = done;
    last[1] = total;
}

static void test_model(const char *preset, const char *ref_int4, size_t want_tensors) {
    QwenConfig cfg;
    uint64_t seed;
    QErr err = {{0}};
    CHECK(rm_preset(preset, &cfg, &seed, &err) == 0, "%s: %s", preset, err.msg);
    size_t n;
    StSpec *specs = rm_tensor_specs(&cfg, &n, &err);
    CHECK(specs && n == want_tensors, "%s: %zu tensors", preset, n);
    if (!specs) return;
    check_linear_names(specs, n, ref_int4);
    rm_specs_free(specs, n);

    char path[512];
    snprintf(path, sizeof path, "%s/%s.safetensors", tmpdir, preset);
    uint64_t last[2] = {0, 0};
    CHECK(rm_write_safetensors(path, &cfg, seed, 3, progress_cb, last, &err) == 0, "%s: %s",
          preset, err.msg);
    CHECK(last[0] == last[1] && last[1] > 0, "final progress %llu/%llu",
          (unsigned long long)last[0], (unsigned long long)last[1]);
    char want[65] = "", got[65] = "";
    CHECK(spec_sha(preset, want) == 0, "%s: no sha256 in the spec", preset);
    CHECK(file_sha(path, got) == 0, "sha256sum failed");
    CHECK(!strcmp(want, got), "%s: sha256 %s, spec says %s", preset, got, want);

    /* The in-memory path gives the file's bytes, tensor by tensor. */
    StModel *m = st_open_file(path, &err);
    CHECK(m != NULL, "reopen: %s", err.msg);
    if (!m) return;
    CHECK(st_count(m) == want_tensors, "count");
    CHECK(st_metadata(m, "format") && !strcmp(st_metadata(m, "format"), "pt"), "format=pt");
    CHECK((st_find(m, "lm_head.weight") != NULL) == !cfg.tie_word_embeddings, "lm_head iff untied");
    ThreadPool *pool = tp_create(3, &err);
    CHECK(pool != NULL, "pool: %s", err.msg);
    for (size_t i = 0; i < st_count(m); i++) {
        const StTensor *t = st_at(m, i);
        uint16_t *buf = malloc(t->nbytes + 2);
        CHECK(rm_fill_tensor(buf, t->name, t->ndim, t->shape, seed, i % 2 ? pool : NULL, &err) == 0,
              "%s: %s", t->name, err.msg);
        CHECK(!memcmp(buf, t->data, t->nbytes), "%s: in-memory fill differs from the file",
              t->name);
        free(buf);
    }
    tp_free(pool);
    st_close(m);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/quill-test-rm-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_hashes();
    test_fill_matches_reference();
    test_model("tiny-qwen3", "reference/tiny_int4_hqq_tensors.safetensors", 2 * 11 + 2);
    test_model("small-qwen3", "reference/small_int4_hqq_tensors.safetensors", 3 * 11 + 3);

    QwenConfig cfg;
    QErr err = {{0}};
    CHECK(rm_preset("qwen3-9b", &cfg, NULL, &err) == -1 && strstr(err.msg, "qwen3-9b") &&
              strstr(err.msg, "qwen3-8b"),
          "unknown preset: %s", err.msg);
    CHECK(rm_preset("qwen3-0.6b", &cfg, NULL, &err) == 0 && cfg.hidden_size == 1024 &&
              cfg.num_hidden_layers == 28 && cfg.tie_word_embeddings,
          "0.6b preset");
    int64_t shape[2] = {4, 4};
    uint16_t buf[16];
    CHECK(rm_fill_tensor(buf, "model.rotary.inv_freq", 2, shape, 1, NULL, &err) == -1 &&
              strstr(err.msg, "model.rotary.inv_freq"),
          "unknown tensor: %s", err.msg);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmpdir);
    return test_finish();
}
