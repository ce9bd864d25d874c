/* test_safetensors.c — safetensors reader/writer and config.json / generation_config.json.
 *
 * Reader: files written by Python's safetensors (../shared/reference, the trained model) open
 * with the right names, dtypes and shapes; hand-made broken files are refused with messages that
 * name the file and the tensor. Writer: round trip, exact header layout, clean failure when space
 * cannot be reserved. Config: Qwen3-8B's real config.json (4.x keys) and the trained model's
 * (5.x keys), refusals by name, and saved files byte-identical to what transformers writes. */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/config.h"
#include "io/random_model.h"
#include "io/safetensors.h"
#include "../test_util.h"

static char tmpdir[256];

static const char *tmp_path(const char *name) {
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmpdir, name);
    return buf[k];
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
}

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (fread(s, 1, (size_t)n, f) != (size_t)n) n = 0;
    s[n] = '\0';
    fclose(f);
    return s;
}

/* A safetensors file with the given header text (space-padded to a multiple of 8, as writers
 * do) and data_len bytes of data (0x11 each). */
static void write_raw(const char *path, const char *header, size_t data_len) {
    FILE *f = fopen(path, "wb");
    uint64_t n = strlen(header), padded = (n + 7) / 8 * 8;
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(padded >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, n, f);
    for (uint64_t i = n; i < padded; i++) fputc(' ', f);
    for (size_t i = 0; i < data_len; i++) fputc(0x11, f);
    fclose(f);
}

/* Opens PATH expecting failure whose message contains every one of the given substrings. */
static void expect_bad_file(const char *path, const char *what, const char *s1, const char *s2) {
    QErr err = {{0}};
    StModel *m = st_open_file(path, &err);
    CHECK(m == NULL, "%s: opened", what);
    st_close(m);
    CHECK(strstr(err.msg, path) != NULL, "%s: message lacks the file: %s", what, err.msg);
    if (s1) CHECK(strstr(err.msg, s1) != NULL, "%s: message lacks '%s': %s", what, s1, err.msg);
    if (s2) CHECK(strstr(err.msg, s2) != NULL, "%s: message lacks '%s': %s", what, s2, err.msg);
}

static void test_reference_files(void) {
    QErr err = {{0}};
    StModel *m = st_open_file(shared_path("reference/tiny_ref.safetensors"), &err);
    CHECK(m != NULL, "tiny_ref: %s", err.msg);
    if (m) {
        const StTensor *t = st_find(m, "chat.input_ids");
        CHECK(t && t->dtype == DT_I32 && t->ndim == 1 && t->shape[0] == 18, "chat.input_ids");
        t = st_find(m, "chat.top8_ids");
        CHECK(t && t->dtype == DT_I32 && t->ndim == 2 && t->shape[0] == 18 && t->shape[1] == 8,
              "chat.top8_ids");
        t = st_find(m, "chat.last_logits");
        CHECK(t && t->dtype == DT_F32 && t->shape[0] == 151936 && t->nbytes == 151936 * 4,
              "chat.last_logits");
        CHECK(st_metadata(m, "prompts") != NULL, "metadata 'prompts' missing");
        CHECK(st_metadata(m, "no-such-key") == NULL, "absent metadata key");
        CHECK(st_find(m, "nope") == NULL, "absent tensor found");
        for (size_t i = 1; i < st_count(m); i++)
            CHECK(strcmp(st_at(m, i - 1)->name, st_at(m, i)->name) < 0, "not sorted at %zu", i);
        st_close(m);
    }
    m = st_open_file(shared_path("reference/small_int4_hqq_tensors.safetensors"), &err);
    CHECK(m != NULL, "small_int4: %s", err.msg);
    if (m) {
        const StTensor *t = st_find(m, "model.layers.0.mlp.down_proj.qweight");
        CHECK(t && t->dtype == DT_U8 && t->shape[0] == 512 && t->shape[1] == 768, "qweight");
        t = st_find(m, "model.layers.0.mlp.down_proj.scales");
        CHECK(t && t->dtype == DT_BF16 && t->shape[0] == 512 && t->shape[1] == 12, "scales");
        CHECK(st_metadata(m, "format") != NULL, "format metadata");
        st_close(m);
    }
}

static void test_round_trip(void) {
    const char *path = tmp_path("rt.safetensors");
    StSpec specs[] = {
        {"zeta", DT_F32, 2, {3, 5}},
        {"alpha", DT_BF16, 1, {8}},
        {"Mid.bytes", DT_U8, 3, {2, 3, 4}},
        {"scalar", DT_I64, 0, {0}},
        {"empty", DT_F16, 2, {0, 4}},
    };
    const char *meta[] = {"format", "pt", "author", "quill \"test\""};
    QErr err = {{0}};
    StWriter *w = st_writer_create(path, specs, 5, meta, 2, &err);
    CHECK(w != NULL, "writer: %s", err.msg);
    if (!w) return;
    CHECK(st_writer_count(w) == 5, "count");
    /* Sorted by bytes: uppercase first. */
    CHECK(!strcmp(st_writer_tensor(w, 0)->name, "Mid.bytes"), "order 0");
    CHECK(!strcmp(st_writer_tensor(w, 4)->name, "zeta"), "order 4");
    StTensor *z = st_writer_find(w, "zeta");
    for (int i = 0; i < 15; i++) ((float *)z->data)[i] = (float)i * 0.5f;
    uint16_t a[8] = {1, 2, 3, 4, 5, 6, 7, 0xBEEF};
    memcpy(st_writer_find(w, "alpha")->data, a, sizeof a);
    StTensor *mb = st_writer_find(w, "Mid.bytes");
    for (int i = 0; i < 24; i++) ((uint8_t *)mb->data)[i] = (uint8_t)(100 + i);
    *(int64_t *)st_writer_find(w, "scalar")->data = -42;
    CHECK(st_writer_finish(w, &err) == 0, "finish: %s", err.msg);

    /* Exact header layout (spec: keys sorted, __metadata__ first, no spaces, padded to 8). */
    char *raw = read_text(path);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | (unsigned char)raw[i];
    CHECK(hlen % 8 == 0, "header length %llu not a multiple of 8", (unsigned long long)hlen);
    const char *want =
        "{\"__metadata__\":{\"author\":\"quill \\\"test\\\"\",\"format\":\"pt\"},"
        "\"Mid.bytes\":{\"data_offsets\":[0,24],\"dtype\":\"U8\",\"shape\":[2,3,4]},"
        "\"alpha\":{\"data_offsets\":[24,40],\"dtype\":\"BF16\",\"shape\":[8]},"
        "\"empty\":{\"data_offsets\":[40,40],\"dtype\":\"F16\",\"shape\":[0,4]},"
        "\"scalar\":{\"data_offsets\":[40,48],\"dtype\":\"I64\",\"shape\":[]},"
        "\"zeta\":{\"data_offsets\":[48,108],\"dtype\":\"F32\",\"shape\":[3,5]}}";
    CHECK(!strncmp(raw + 8, want, strlen(want)), "header text: %.*s", (int)hlen, raw + 8);
    for (size_t i = 8 + strlen(want); i < 8 + hlen; i++) CHECK(raw[i] == ' ', "padding byte %zu", i);
    free(raw);

    StModel *m = st_open_file(path, &err);
    CHECK(m != NULL, "reopen: %s", err.msg);
    if (!m) return;
    CHECK(st_count(m) == 5, "count");
    CHECK(!strcmp(st_metadata(m, "format"), "pt"), "format");
    CHECK(!strcmp(st_metadata(m, "author"), "quill \"test\""), "author");
    const StTensor *t = st_find(m, "zeta");
    CHECK(t && t->ndim == 2 && t->shape[0] == 3 && t->shape[1] == 5 && t->dtype == DT_F32, "zeta");
    CHECK(t && ((const float *)t->data)[14] == 7.0f, "zeta data");
    CHECK(t && !strcmp(t->file, path), "file field");
    t = st_find(m, "alpha");
    CHECK(t && ((const uint16_t *)t->data)[7] == 0xBEEF && t->nbytes == 16, "alpha data");
    t = st_find(m, "scalar");
    CHECK(t && t->ndim == 0 && t->nbytes == 8 && *(const int64_t *)t->data == -42, "scalar");
    t = st_find(m, "empty");
    CHECK(t && t->nbytes == 0 && t->shape[0] == 0 && t->shape[1] == 4, "empty");
    t = st_find(m, "Mid.bytes");
    CHECK(t && ((const uint8_t *)t->data)[23] == 123, "bytes");
    st_close(m);

    /* A layout that would misalign a tensor is refused by the writer. */
    StSpec odd[] = {{"a", DT_U8, 1, {3}}, {"b", DT_F32, 1, {2}}};
    w = st_writer_create(path, odd, 2, NULL, 0, &err);
    CHECK(!w && strstr(err.msg, "'b'") && strstr(err.msg, "unaligned"), "misaligned: %s", err.msg);
}

/* The pattern test_block_writer's producer writes: a function of tensor and byte offset. */
static uint8_t pattern(size_t i, size_t off) { return (uint8_t)(i * 131 + off * 7 + (off >> 13)); }

static void produce_pattern(void *ctx, size_t i, size_t off, void *dst, size_t n) {
    size_t *calls = ctx;
    (*calls)++;
    for (size_t k = 0; k < n; k++) ((uint8_t *)dst)[k] = pattern(i, off + k);
}

/* Block-wise writing (O_DIRECT where possible) gives the same file as the layout promises, with
 * tensors spanning blocks, blocks holding several tensors, and blocks written out of order. */
static void test_block_writer(void) {
    const char *path = tmp_path("blocks.safetensors");
    StSpec specs[] = {
        {"a.big", DT_F32, 2, {3, 1 << 21}},    /* 24 MiB: spans blocks */
        {"b.small", DT_BF16, 1, {1001}},
        {"c.mid", DT_U8, 2, {1000, 9999}},     /* ~9.5 MiB */
        {"d.tail", DT_BF16, 2, {3, 5}},
    };
    const char *meta[] = {"format", "pt"};
    QErr err = {{0}};
    StWriter *w = st_writer_create(path, specs, 4, meta, 1, &err);
    CHECK(w != NULL, "writer: %s", err.msg);
    if (!w) return;
    size_t nb = st_writer_block_count(w), calls = 0;
    CHECK(nb == 5, "blocks %zu", nb); /* 24 MiB + 2002 + 9999000 + 30 + header: 4.2 blocks */
    void *scratch = NULL;
    CHECK(posix_memalign(&scratch, ST_WRITER_ALIGN, ST_WRITER_BLOCK) == 0, "memalign");
    for (size_t b = nb; b-- > 0;)
        CHECK(st_writer_write_block(w, b, produce_pattern, &calls, scratch, &err) == 0,
              "block %zu: %s", b, err.msg);
    CHECK(calls == 8, "produce called %zu times", calls); /* a: 4 pieces, b: 1, c: 2, d: 1 */
    CHECK(st_writer_write_block(w, nb, produce_pattern, &calls, scratch, &err) == -1 &&
              strstr(err.msg, path),
          "block past the end: %s", err.msg);
    free(scratch);
    CHECK(st_writer_finish(w, &err) == 0, "finish: %s", err.msg);
    StModel *m = st_open_file(path, &err);
    CHECK(m != NULL, "reopen: %s", err.msg);
    if (!m) return;
    for (size_t i = 0; i < st_count(m); i++) {
        const StTensor *t = st_at(m, i);
        size_t bad = 0;
        for (size_t k = 0; k < t->nbytes; k++) bad += ((const uint8_t *)t->data)[k] != pattern(i, k);
        CHECK(bad == 0, "%s: %zu bytes differ", t->name, bad);
    }
    st_close(m);
}

static void test_bad_files(void) {
    const char *p = tmp_path("bad.safetensors");
    FILE *f = fopen(p, "wb");
    fputs("abc", f);
    fclose(f);
    expect_bad_file(p, "tiny file", "too short", NULL);

    write_raw(p, "{\"w\":{\"dtype\":\"U8\",\"shape\":[4],", 4);
    expect_bad_file(p, "bad json", "JSON", NULL);

    /* 4-byte floats at data offset 2 of an 8-aligned data region. */
    write_raw(p, "{\"f\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[2,6]}}", 8);
    expect_bad_file(p, "misaligned", "'f'", "aligned");

    write_raw(p, "[1,2]", 0);
    expect_bad_file(p, "not an object", "object", NULL);

    write_raw(p, "{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,100]}}", 8);
    expect_bad_file(p, "offsets out of range", "'w'", "data region");

    write_raw(p, "{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[6,2]}}", 8);
    expect_bad_file(p, "reversed offsets", "'w'", NULL);

    write_raw(p, "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
                 "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[2,6]}}", 8);
    expect_bad_file(p, "overlap", "'a'", "'b'");

    write_raw(p, "{\"f\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,8]}}", 16);
    expect_bad_file(p, "byte count", "'f'", "16");

    write_raw(p, "{\"q\":{\"dtype\":\"F8_E4M3\",\"shape\":[4],\"data_offsets\":[0,4]}}", 8);
    expect_bad_file(p, "unknown dtype", "'q'", "F8_E4M3");

    write_raw(p, "{\"s\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,0]}}", 8);
    expect_bad_file(p, "negative dim", "'s'", "shape");

    write_raw(p, "{\"s\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,1]}}", 8);
    expect_bad_file(p, "too many dims", "'s'", "dimensions");

    write_raw(p, "{\"s\":{\"dtype\":\"U8\",\"shape\":[4]}}", 8);
    expect_bad_file(p, "missing offsets", "'s'", "data_offsets");

    write_raw(p, "{\"s\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4],\"extra\":1}}", 8);
    expect_bad_file(p, "unknown key", "'s'", "extra");

    write_raw(p, "{\"__metadata__\":{\"n\":1}}", 0);
    expect_bad_file(p, "non-string metadata", "__metadata__", NULL);

    write_raw(p, "{\"s\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
                 "\"s\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}", 8);
    expect_bad_file(p, "duplicate key", "JSON", NULL);

    /* Header length field larger than the file. */
    f = fopen(p, "wb");
    unsigned char len[8] = {0xff, 0xff, 0, 0, 0, 0, 0, 0};
    fwrite(len, 1, 8, f);
    fputs("{}", f);
    fclose(f);
    expect_bad_file(p, "header length", "header length", NULL);

    /* A real file cut short: the last tensor in byte order loses its end. */
    StSpec specs[] = {{"w1", DT_BF16, 2, {64, 64}}, {"w2", DT_BF16, 2, {64, 64}}};
    QErr err = {{0}};
    StWriter *w = st_writer_create(p, specs, 2, NULL, 0, &err);
    CHECK(w != NULL, "writer: %s", err.msg);
    if (w) {
        memset(st_writer_tensor(w, 0)->data, 1, st_writer_tensor(w, 0)->nbytes);
        memset(st_writer_tensor(w, 1)->data, 2, st_writer_tensor(w, 1)->nbytes);
        CHECK(st_writer_finish(w, &err) == 0, "finish: %s", err.msg);
        struct stat st;
        stat(p, &st);
        CHECK(truncate(p, st.st_size - 1000) == 0, "truncate");
        expect_bad_file(p, "truncated", "'w2'", "truncated");
    }
}

static void test_shards(void) {
    char dir[300];
    snprintf(dir, sizeof dir, "%s/sharded", tmpdir);
    mkdir(dir, 0755);
    char p1[400], p2[400], idx[400];
    snprintf(p1, sizeof p1, "%s/model-00001-of-00002.safetensors", dir);
    snprintf(p2, sizeof p2, "%s/model-00002-of-00002.safetensors", dir);
    snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", dir);
    write_raw(p1, "{\"__metadata__\":{\"format\":\"pt\"},"
                  "\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}", 4);
    write_raw(p2, "{\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]},"
                  "\"c\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[4,5]}}", 5);
    write_text(idx, "{\"metadata\":{\"total_size\":9},\"weight_map\":{"
                    "\"a\":\"model-00001-of-00002.safetensors\","
                    "\"b\":\"model-00002-of-00002.safetensors\","
                    "\"c\":\"model-00002-of-00002.safetensors\"}}");
    QErr err = {{0}};
    StModel *m = st_open_dir(dir, &err);
    CHECK(m != NULL, "sharded: %s", err.msg);
    if (m) {
        CHECK(st_count(m) == 3, "count %zu", st_count(m));
        const StTensor *t = st_find(m, "b");
        CHECK(t && !strcmp(t->file, p2) && t->dtype == DT_BF16, "b in shard 2");
        CHECK(st_find(m, "a") && !strcmp(st_find(m, "a")->file, p1), "a in shard 1");
        CHECK(st_metadata(m, "format") && !strcmp(st_metadata(m, "format"), "pt"), "metadata");
        st_close(m);
    }

    /* Index names a tensor the shard lacks. */
    write_text(idx, "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                    "\"b\":\"model-00002-of-00002.safetensors\","
                    "\"c\":\"model-00002-of-00002.safetensors\","
                    "\"d\":\"model-00002-of-00002.safetensors\"}}");
    m = st_open_dir(dir, &err);
    CHECK(!m && strstr(err.msg, idx) && strstr(err.msg, "'d'"), "missing tensor: %s", err.msg);
    st_close(m);

    /* Index puts a tensor in the wrong shard. */
    write_text(idx, "{\"weight_map\":{\"a\":\"model-00002-of-00002.safetensors\","
                    "\"b\":\"model-00002-of-00002.safetensors\","
                    "\"c\":\"model-00002-of-00002.safetensors\"}}");
    m = st_open_dir(dir, &err);
    CHECK(!m && strstr(err.msg, "'a'"), "wrong shard: %s", err.msg);
    st_close(m);

    /* A shard holds a tensor the index does not list. */
    write_text(idx, "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                    "\"b\":\"model-00002-of-00002.safetensors\"}}");
    m = st_open_dir(dir, &err);
    CHECK(!m && strstr(err.msg, "'c'") && strstr(err.msg, p2), "unlisted tensor: %s", err.msg);
    st_close(m);

    /* A tensor in two shards. */
    write_raw(p1, "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
                  "\"c\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[4,5]}}", 5);
    write_text(idx, "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                    "\"b\":\"model-00002-of-00002.safetensors\","
                    "\"c\":\"model-00002-of-00002.safetensors\"}}");
    m = st_open_dir(dir, &err);
    CHECK(!m && strstr(err.msg, "'c'") && strstr(err.msg, p1) && strstr(err.msg, p2),
          "duplicate across shards: %s", err.msg);
    st_close(m);

    /* A missing shard: the message names it and a tensor that lived there. */
    unlink(p2);
    m = st_open_dir(dir, &err);
    CHECK(!m && strstr(err.msg, "model-00002-of-00002.safetensors") && strstr(err.msg, "'b'") &&
              strstr(err.msg, "missing"),
          "missing shard: %s", err.msg);
    st_close(m);

    /* Path traversal in a shard name. */
    write_text(idx, "{\"weight_map\":{\"a\":\"../x.safetensors\"}}");
    m = st_open_dir(dir, &err);
    CHECK(!m && strstr(err.msg, "'a'") && strstr(err.msg, "plain file name"), "traversal: %s",
          err.msg);
    st_close(m);

    write_text(idx, "{\"weight_map\":[1,2]}");
    m = st_open_dir(dir, &err);
    CHECK(!m && strstr(err.msg, idx) && strstr(err.msg, "weight_map"), "bad index: %s", err.msg);
    st_close(m);

    m = st_open_dir(tmp_path("no-such-dir"), &err);
    CHECK(!m && strstr(err.msg, "no-such-dir"), "no checkpoint: %s", err.msg);
}

/* Space that cannot be reserved fails cleanly and leaves no file. RLIMIT_FSIZE stands in for a
 * full disk (it makes the reservation fail with EFBIG where a full disk gives ENOSPC). */
static void test_writer_no_space(void) {
    const char *p = tmp_path("big.safetensors");
    struct rlimit old, lim;
    getrlimit(RLIMIT_FSIZE, &old);
    lim = old;
    lim.rlim_cur = 1 << 20;
    signal(SIGXFSZ, SIG_IGN);
    CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0, "setrlimit");
    StSpec spec = {"big", DT_BF16, 2, {4096, 4096}};
    QErr err = {{0}};
    StWriter *w = st_writer_create(p, &spec, 1, NULL, 0, &err);
    setrlimit(RLIMIT_FSIZE, &old);
    CHECK(w == NULL, "writer beyond the size limit succeeded");
    if (w) st_writer_abort(w);
    CHECK(strstr(err.msg, p) && strstr(err.msg, "33554"), "message: %s", err.msg);
    CHECK(access(p, F_OK) != 0, "a failed writer left its file behind");

    StSpec dup[] = {{"x", DT_U8, 1, {1}}, {"x", DT_U8, 1, {1}}};
    w = st_writer_create(p, dup, 2, NULL, 0, &err);
    CHECK(!w && strstr(err.msg, "'x'"), "duplicate names: %s", err.msg);
}

/* ------------------------------------------------------------------------------------------ */

/* Qwen3-8B's config.json and generation_config.json as published (transformers 4.51). */
static const char QWEN3_8B_CONFIG[] =
    "{\n  \"architectures\": [\n    \"Qwen3ForCausalLM\"\n  ],\n  \"attention_bias\": false,\n"
    "  \"attention_dropout\": 0.0,\n  \"bos_token_id\": 151643,\n  \"eos_token_id\": 151645,\n"
    "  \"head_dim\": 128,\n  \"hidden_act\": \"silu\",\n  \"hidden_size\": 4096,\n"
    "  \"initializer_range\": 0.02,\n  \"intermediate_size\": 12288,\n"
    "  \"max_position_embeddings\": 40960,\n  \"max_window_layers\": 36,\n"
    "  \"model_type\": \"qwen3\",\n  \"num_attention_heads\": 32,\n  \"num_hidden_layers\": 36,\n"
    "  \"num_key_value_heads\": 8,\n  \"rms_norm_eps\": 1e-06,\n  \"rope_scaling\": null,\n"
    "  \"rope_theta\": 1000000,\n  \"sliding_window\": null,\n  \"tie_word_embeddings\": false,\n"
    "  \"torch_dtype\": \"bfloat16\",\n  \"transformers_version\": \"4.51.0\",\n"
    "  \"use_cache\": true,\n  \"use_sliding_window\": false,\n  \"vocab_size\": 151936\n}\n";
static const char QWEN3_GEN_CONFIG[] =
    "{\n  \"bos_token_id\": 151643,\n  \"do_sample\": true,\n  \"eos_token_id\": [\n"
    "    151645,\n    151643\n  ],\n  \"pad_token_id\": 151643,\n  \"temperature\": 0.6,\n"
    "  \"top_k\": 20,\n  \"top_p\": 0.95,\n  \"transformers_version\": \"4.51.0\"\n}\n";

static void expect_bad_config(const char *text, const char *what, const char *s1) {
    char dir[300];
    snprintf(dir, sizeof dir, "%s/badcfg", tmpdir);
    mkdir(dir, 0755);
    char path[400];
    snprintf(path, sizeof path, "%s/config.json", dir);
    write_text(path, text);
    QwenConfig c;
    QErr err = {{0}};
    CHECK(config_load(&c, dir, &err) == -1, "%s: accepted", what);
    CHECK(strstr(err.msg, path) != NULL, "%s: message lacks the file: %s", what, err.msg);
    CHECK(strstr(err.msg, s1) != NULL, "%s: message lacks '%s': %s", what, s1, err.msg);
}

/* QWEN3_8B_CONFIG with one "key": value line replaced (`"key": ` prefix in from). */
static char *config_with(const char *from, const char *to) {
    static char buf[4096];
    const char *p = strstr(QWEN3_8B_CONFIG, from);
    if (!p) {
        fprintf(stderr, "config_with: %s not found\n", from);
        exit(1);
    }
    const char *eol = strchr(p, '\n');
    if (eol[-1] == '[') eol = strchr(p, ']') + 1; /* a list value spans lines */
    else if (eol[-1] == ',') eol--;
    snprintf(buf, sizeof buf, "%.*s%s%s", (int)(p - QWEN3_8B_CONFIG), QWEN3_8B_CONFIG, to, eol);
    return buf;
}

static void test_config(void) {
    QErr err = {{0}};
    char d8[300];
    snprintf(d8, sizeof d8, "%s/qwen3-8b", tmpdir);
    mkdir(d8, 0755);
    write_text(tmp_path("qwen3-8b/config.json"), QWEN3_8B_CONFIG);
    QwenConfig c;
    CHECK(config_load(&c, d8, &err) == 0, "8B config: %s", err.msg);
    CHECK(c.vocab_size == 151936 && c.hidden_size == 4096 && c.intermediate_size == 12288 &&
              c.num_hidden_layers == 36 && c.num_attention_heads == 32 &&
              c.num_key_value_heads == 8 && c.head_dim == 128 &&
              c.max_position_embeddings == 40960,
          "8B sizes");
    CHECK(c.rms_norm_eps == 1e-6f && c.rope_theta == 1e6 && !c.tie_word_embeddings, "8B values");
    CHECK(c.bos_token_id == 151643 && c.n_eos == 1 && c.eos_token_ids[0] == 151645, "8B ids");
    CHECK(!strcmp(c.dtype, "bfloat16") && !c.quantized, "8B dtype");

    /* The random-weights preset writes exactly Qwen3-8B's file. */
    QwenConfig p8;
    CHECK(rm_preset("qwen3-8b", &p8, NULL, &err) == 0, "preset: %s", err.msg);
    char out[300];
    snprintf(out, sizeof out, "%s/saved", tmpdir);
    mkdir(out, 0755);
    CHECK(config_save(&p8, out, &err) == 0, "save: %s", err.msg);
    char *saved = read_text(tmp_path("saved/config.json"));
    CHECK(saved && !strcmp(saved, QWEN3_8B_CONFIG), "config_save differs from Qwen3-8B's:\n%s",
          saved ? saved : "(none)");
    free(saved);

    /* generation_config.json: absent -> defaults with the config's eos; Qwen3's written exactly. */
    GenConfig g;
    CHECK(gen_config_load(&g, &c, d8, &err) == 0, "absent gen config: %s", err.msg);
    CHECK(!g.do_sample && g.temperature == 1.0f && g.top_k == 0 && g.n_eos == 1 &&
              g.eos_token_ids[0] == 151645 && g.pad_token_id == -1,
          "gen defaults");
    rm_gen_config(&g);
    CHECK(gen_config_save(&g, &p8, out, &err) == 0, "gen save: %s", err.msg);
    saved = read_text(tmp_path("saved/generation_config.json"));
    CHECK(saved && !strcmp(saved, QWEN3_GEN_CONFIG), "gen_config_save differs from Qwen3's:\n%s",
          saved ? saved : "(none)");
    free(saved);

    /* transformers 5.x keys: the trained model's config (rope_parameters, dtype). */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "tar -xJf '%s' -C '%s'", shared_path("models/trained-qwen3.tar.xz"),
             tmpdir);
    CHECK(system(cmd) == 0, "tar failed: %s", cmd);
    char tdir[300];
    snprintf(tdir, sizeof tdir, "%s/trained-qwen3", tmpdir);
    CHECK(config_load(&c, tdir, &err) == 0, "trained config: %s", err.msg);
    CHECK(c.hidden_size == 256 && c.num_hidden_layers == 4 && c.intermediate_size == 512 &&
              c.num_attention_heads == 2 && c.num_key_value_heads == 1 && c.head_dim == 128 &&
              c.vocab_size == 151936 && c.tie_word_embeddings,
          "trained sizes");
    CHECK(c.rope_theta == 1e6 && !strcmp(c.dtype, "bfloat16") && c.rms_norm_eps == 1e-6f,
          "trained rope_theta %g dtype %s", c.rope_theta, c.dtype);
    CHECK(gen_config_load(&g, &c, tdir, &err) == 0, "trained gen: %s", err.msg);
    CHECK(g.do_sample && g.temperature == 0.6f && g.top_k == 20 && g.top_p == 0.95f &&
              g.n_eos == 2 && g.eos_token_ids[0] == 151645 && g.eos_token_ids[1] == 151643 &&
              g.pad_token_id == 151643,
          "trained gen values");
    StModel *m = st_open_dir(tdir, &err);
    CHECK(m != NULL, "trained model: %s", err.msg);
    if (m) {
        const StTensor *t = st_find(m, "model.embed_tokens.weight");
        CHECK(t && t->dtype == DT_BF16 && t->shape[0] == 151936 && t->shape[1] == 256, "embed");
        CHECK(st_find(m, "lm_head.weight") == NULL, "tied model has lm_head");
        st_close(m);
    }

    /* config_save_quantized keeps every key and adds quantization_config. */
    char qdir[300];
    snprintf(qdir, sizeof qdir, "%s/quant", tmpdir);
    mkdir(qdir, 0755);
    CHECK(config_save_quantized(tdir, qdir, 128, "hqq", false, &err) == 0, "save q: %s", err.msg);
    QwenConfig q;
    CHECK(config_load(&q, qdir, &err) == 0, "load q: %s", err.msg);
    CHECK(q.quantized && q.group_size == 128 && !strcmp(q.quant_algorithm, "hqq") &&
              !q.lm_head_quantized && q.hidden_size == 256 && q.rope_theta == 1e6,
          "quant fields");
    char *qt = read_text(tmp_path("quant/config.json"));
    CHECK(qt && strstr(qt, "\"layer_types\": [") && strstr(qt, "\"rope_type\": \"default\"") &&
              strstr(qt, "\"dequant\": \"(q - 8) * scale + zero\"") &&
              strstr(qt, "\"rms_norm_eps\": 1e-06,") &&
              strstr(qt, "\"modules_not_quantized\": [\n      \"model.embed_tokens\",\n"
                         "      \"lm_head\"\n    ]"),
          "quantized config text:\n%s", qt ? qt : "(none)");
    free(qt);
    CHECK(config_save_quantized(tdir, qdir, 128, "minmax", true, &err) == 0, "minmax: %s", err.msg);
    CHECK(config_load(&q, qdir, &err) == 0 && q.lm_head_quantized &&
              !strcmp(q.quant_algorithm, "minmax"),
          "minmax + lm_head");
    CHECK(config_save_quantized(tdir, qdir, 100, "hqq", false, &err) == -1 &&
              strstr(err.msg, "100"),
          "bad group size: %s", err.msg);

    /* Refusals, each naming the file and the field or value at fault. */
    expect_bad_config(config_with("\"architectures\"", "\"architectures\": [\"LlamaForCausalLM\"]"),
                      "llama architecture", "LlamaForCausalLM");
    expect_bad_config(config_with("\"model_type\"", "\"model_type\": \"qwen3_moe\""), "moe",
                      "qwen3_moe");
    expect_bad_config("{\"hidden_size\": 8}", "no architecture", "Qwen3ForCausalLM");
    expect_bad_config(config_with("\"hidden_size\"", "\"hidden_size\": \"4096\""), "string size",
                      "\"hidden_size\"");
    expect_bad_config(config_with("\"hidden_size\"", "\"hidden_size\": 4096.0"), "real size",
                      "integer");
    expect_bad_config(config_with("\"vocab_size\"", "\"vocab_size\": 0"), "zero vocab",
                      "\"vocab_size\" = 0");
    expect_bad_config(config_with("\"num_key_value_heads\"", "\"num_key_value_heads\": 5"),
                      "gqa ratio", "num_key_value_heads");
    expect_bad_config(config_with("\"head_dim\"", "\"head_dim\": 127"), "odd head_dim", "head_dim");
    expect_bad_config(config_with("\"rms_norm_eps\"", "\"rms_norm_eps\": -1"), "negative eps",
                      "rms_norm_eps");
    expect_bad_config(config_with("\"rope_scaling\"",
                                  "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}"),
                      "yarn", "yarn");
    expect_bad_config(config_with("\"hidden_act\"", "\"hidden_act\": \"gelu\""), "gelu", "gelu");
    expect_bad_config(config_with("\"attention_bias\"", "\"attention_bias\": true"), "bias",
                      "attention_bias");
    expect_bad_config(config_with("\"use_sliding_window\"", "\"use_sliding_window\": true"),
                      "sliding", "use_sliding_window");
    expect_bad_config(config_with("\"torch_dtype\"", "\"torch_dtype\": \"int8\""), "dtype",
                      "int8");
    expect_bad_config(config_with("\"eos_token_id\"", "\"eos_token_id\": [1, \"x\"]"), "eos list",
                      "eos_token_id");
    expect_bad_config(config_with("\"vocab_size\"", "\"vocab_size\": 151936,\n"
                                  "  \"quantization_config\": {\"quant_method\": \"gptq\"}"),
                      "gptq", "gptq");
    expect_bad_config("{\"model_type\": \"qwen3\",", "truncated json", "JSON");
    CHECK(config_load(&c, tmp_path("nowhere"), &err) == -1 && strstr(err.msg, "nowhere"),
          "missing file: %s", err.msg);

    /* Optional fields take transformers' defaults; null counts as absent. */
    write_text(tmp_path("badcfg/config.json"),
               "{\"model_type\": \"qwen3\", \"vocab_size\": 100, \"hidden_size\": 64,"
               " \"intermediate_size\": 96, \"num_hidden_layers\": 1, \"num_attention_heads\": 4,"
               " \"bos_token_id\": null}");
    CHECK(config_load(&c, tmp_path("badcfg"), &err) == 0, "minimal: %s", err.msg);
    CHECK(c.num_key_value_heads == 4 && c.head_dim == 16 && c.rope_theta == 10000.0 &&
              c.max_position_embeddings == 32768 && c.bos_token_id == -1 && c.n_eos == 0 &&
              !c.tie_word_embeddings,
          "defaults");
    write_text(tmp_path("badcfg/generation_config.json"), "{\"top_p\": 1.5}");
    CHECK(gen_config_load(&g, &c, tmp_path("badcfg"), &err) == -1 && strstr(err.msg, "top_p") &&
              strstr(err.msg, "generation_config.json"),
          "bad top_p: %s", err.msg);
}

int main(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/quill-test-io-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_reference_files();
    test_round_trip();
    test_block_writer();
    test_bad_files();
    test_shards();
    test_writer_no_space();
    test_config();
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) fprintf(stderr, "could not remove %s\n", tmpdir);
    return test_finish();
}
