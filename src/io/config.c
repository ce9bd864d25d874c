/* config.c — config.json / generation_config.json: strict reading, transformers-style writing.
 *
 * Reading trades leniency for safety: every field the engine depends on is type- and
 * range-checked, and settings quill cannot honour (another architecture, rope scaling, sliding
 * windows, attention bias, an unknown quantization) are refused by name rather than silently
 * ignored, because a wrong-but-running model is worse than an error. Keys the engine does not use
 * are ignored. Writing mimics Python's `json.dumps(indent=2, sort_keys=True)` (the way
 * transformers saves configs), including Python's shortest round-trip float spelling, so files
 * diff cleanly against real Hugging Face checkpoints. */
#include "io/config.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The transformers version written into saved files: the one Qwen3-8B's files name. */
#define CONFIG_TRANSFORMERS_VERSION "4.51.0"

/* ------------------------------------------------------------------------------------------ */
/* Python-style JSON output                                                                    */

/* Formats v the way Python's repr(float) does: the shortest digits that read back as the same
 * value (the same float32 when as_float), fixed notation for exponents in [-4, 16), else
 * scientific with a two-digit exponent. */
static void fmt_real(char *out, size_t n, double v, bool as_float) {
    char sci[40];
    int p;
    for (p = 1; p <= 17; p++) {
        snprintf(sci, sizeof sci, "%.*e", p - 1, v);
        double back = strtod(sci, NULL);
        if (as_float ? (float)back == (float)v : back == v) break;
    }
    /* sci is "[-]d[.ddd]e[+-]XX": gather the digits and the exponent. */
    const char *s = sci;
    bool neg = *s == '-';
    if (neg) s++;
    char digits[24];
    int nd = 0;
    for (; *s && *s != 'e'; s++)
        if (*s != '.') digits[nd++] = *s;
    int exp = atoi(s + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = '\0';
    char *o = out;
    size_t room = n;
#define PUT(...)                                              \
    do {                                                      \
        int w_ = snprintf(o, room, __VA_ARGS__);              \
        if (w_ < 0 || (size_t)w_ >= room) return;            \
        o += w_;                                              \
        room -= (size_t)w_;                                   \
    } while (0)
    if (neg) PUT("-");
    if (exp >= -4 && exp < 16) {
        if (exp < 0) {
            PUT("0.");
            for (int i = 0; i < -exp - 1; i++) PUT("0");
            PUT("%s", digits);
        } else if (nd <= exp + 1) {
            PUT("%s", digits);
            for (int i = nd; i < exp + 1; i++) PUT("0");
            PUT(".0");
        } else {
            PUT("%.*s.%s", exp + 1, digits, digits + exp + 1);
        }
    } else {
        PUT("%c", digits[0]);
        if (nd > 1) PUT(".%s", digits + 1);
        PUT("e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    }
#undef PUT
}

static int cmp_cstr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Whether key is in the NULL-terminated list of keys holding float32 quantities: those print as
 * Python prints the float32 value read back (1e-06, not 9.999999974752427e-07). */
static bool is_f32_key(const char *const *f32_keys, const char *key) {
    for (; key && f32_keys && *f32_keys; f32_keys++)
        if (!strcmp(*f32_keys, key)) return true;
    return false;
}

static void dump(FILE *f, json_t *j, int depth, const char *const *f32_keys, const char *key) {
    switch (json_typeof(j)) {
    case JSON_OBJECT: {
        size_t n = json_object_size(j);
        if (!n) {
            fputs("{}", f);
            return;
        }
        const char **keys = malloc(n * sizeof *keys);
        if (!keys) return;
        size_t i = 0;
        const char *k;
        json_t *v;
        json_object_foreach(j, k, v) keys[i++] = k;
        qsort(keys, n, sizeof *keys, cmp_cstr);
        fputs("{\n", f);
        for (i = 0; i < n; i++) {
            json_t *ks = json_string(keys[i]);
            char *enc = ks ? json_dumps(ks, JSON_ENCODE_ANY | JSON_ENSURE_ASCII) : NULL;
            fprintf(f, "%*s%s: ", 2 * (depth + 1), "", enc ? enc : "\"\"");
            free(enc);
            json_decref(ks);
            dump(f, json_object_get(j, keys[i]), depth + 1, f32_keys, keys[i]);
            fputs(i + 1 < n ? ",\n" : "\n", f);
        }
        fprintf(f, "%*s}", 2 * depth, "");
        free(keys);
        return;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(j);
        if (!n) {
            fputs("[]", f);
            return;
        }
        fputs("[\n", f);
        for (size_t i = 0; i < n; i++) {
            fprintf(f, "%*s", 2 * (depth + 1), "");
            dump(f, json_array_get(j, i), depth + 1, f32_keys, key);
            fputs(i + 1 < n ? ",\n" : "\n", f);
        }
        fprintf(f, "%*s]", 2 * depth, "");
        return;
    }
    case JSON_REAL: {
        char buf[64];
        fmt_real(buf, sizeof buf, json_real_value(j), is_f32_key(f32_keys, key));
        fputs(buf, f);
        return;
    }
    default: {
        char *enc = json_dumps(j, JSON_ENCODE_ANY | JSON_ENSURE_ASCII);
        fputs(enc ? enc : "null", f);
        free(enc);
        return;
    }
    }
}

/* Writes root to DIR/NAME as transformers would; f32_keys as for is_f32_key (may be NULL). */
static int write_json(const char *dir, const char *name, json_t *root,
                      const char *const *f32_keys, QErr *err) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, name) >= sizeof path)
        return qerr_set(err, "%s: path too long", dir);
    FILE *f = fopen(path, "w");
    if (!f) return qerr_set(err, "%s: cannot create: %s", path, strerror(errno));
    dump(f, root, 0, f32_keys, NULL);
    fputc('\n', f);
    bool bad = ferror(f);
    if (fclose(f) || bad) return qerr_set(err, "%s: write failed: %s", path, strerror(errno));
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Field readers: null counts as absent; every message names the file and the field.           */

typedef struct Src {
    const char *path;
    QErr *err;
} Src;

static json_t *field(json_t *obj, const char *key) {
    json_t *v = json_object_get(obj, key);
    return json_is_null(v) ? NULL : v;
}

static int get_int(const Src *s, json_t *obj, const char *key, bool required, long long def,
                   long long lo, long long hi, int *out) {
    json_t *v = field(obj, key);
    if (!v) {
        if (required) return qerr_set(s->err, "%s: missing required field \"%s\"", s->path, key);
        *out = (int)def;
        return 0;
    }
    if (!json_is_integer(v))
        return qerr_set(s->err, "%s: field \"%s\" must be an integer", s->path, key);
    long long x = json_integer_value(v);
    if (x < lo || x > hi)
        return qerr_set(s->err, "%s: field \"%s\" = %lld is out of range [%lld, %lld]", s->path,
                        key, x, lo, hi);
    *out = (int)x;
    return 0;
}

/* Reads a number; lo/hi bound it, open at an end when the *_open flag is set. */
static int get_num(const Src *s, json_t *obj, const char *key, double def, double lo, bool lo_open,
                   double hi, bool hi_open, double *out) {
    json_t *v = field(obj, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_number(v))
        return qerr_set(s->err, "%s: field \"%s\" must be a number", s->path, key);
    double x = json_number_value(v);
    if (!isfinite(x) || (lo_open ? x <= lo : x < lo) || (hi_open ? x >= hi : x > hi))
        return qerr_set(s->err, "%s: field \"%s\" = %g is out of range %c%g, %g%c", s->path, key,
                        x, lo_open ? '(' : '[', lo, hi, hi_open ? ')' : ']');
    *out = x;
    return 0;
}

static int get_bool(const Src *s, json_t *obj, const char *key, bool def, bool *out) {
    json_t *v = field(obj, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (!json_is_boolean(v))
        return qerr_set(s->err, "%s: field \"%s\" must be true or false", s->path, key);
    *out = json_is_true(v);
    return 0;
}

/* A token id or a list of them (eos_token_id). Absent leaves *n at 0. */
static int get_ids(const Src *s, json_t *obj, const char *key, int *ids, int *n) {
    json_t *v = field(obj, key);
    *n = 0;
    if (!v) return 0;
    if (json_is_integer(v)) {
        v = json_pack("[O]", v);
    } else if (json_is_array(v)) {
        json_incref(v);
    } else {
        return qerr_set(s->err, "%s: field \"%s\" must be an integer or a list of integers",
                        s->path, key);
    }
    int rc = 0;
    if (json_array_size(v) > CONFIG_MAX_EOS) {
        rc = qerr_set(s->err, "%s: field \"%s\" lists %zu ids (at most %d supported)", s->path, key,
                      json_array_size(v), CONFIG_MAX_EOS);
    } else {
        for (size_t i = 0; i < json_array_size(v); i++) {
            json_t *e = json_array_get(v, i);
            if (!json_is_integer(e) || json_integer_value(e) < 0 ||
                json_integer_value(e) > INT_MAX) {
                rc = qerr_set(s->err, "%s: field \"%s\"[%zu] is not a valid token id", s->path,
                              key, i);
                break;
            }
            ids[(*n)++] = (int)json_integer_value(e);
        }
    }
    json_decref(v);
    return rc;
}

static json_t *load_object(const char *path, QErr *err) {
    json_error_t je;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        if (je.line < 0 || !strncmp(je.text, "unable to open", 14))
            qerr_set(err, "%s: cannot read: %s", path, je.text);
        else
            qerr_set(err, "%s: not valid JSON (line %d, column %d): %s", path, je.line, je.column,
                     je.text);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        qerr_set(err, "%s: not a JSON object", path);
        return NULL;
    }
    return root;
}

/* Refuses anything but Qwen3ForCausalLM, by name. */
static int check_architecture(const Src *s, json_t *root) {
    json_t *mt = field(root, "model_type"), *ar = field(root, "architectures");
    if (!mt && !ar)
        return qerr_set(s->err, "%s: neither \"model_type\" nor \"architectures\" is given "
                                "(expected Qwen3ForCausalLM)", s->path);
    if (mt) {
        if (!json_is_string(mt))
            return qerr_set(s->err, "%s: field \"model_type\" must be a string", s->path);
        if (strcmp(json_string_value(mt), "qwen3"))
            return qerr_set(s->err,
                            "%s: model_type '%s' is not supported (quill runs Qwen3 only: "
                            "model_type \"qwen3\")", s->path, json_string_value(mt));
    }
    if (ar) {
        if (!json_is_array(ar) || !json_array_size(ar))
            return qerr_set(s->err, "%s: field \"architectures\" must be a non-empty list",
                            s->path);
        for (size_t i = 0; i < json_array_size(ar); i++) {
            const char *a = json_string_value(json_array_get(ar, i));
            if (!a)
                return qerr_set(s->err, "%s: field \"architectures\"[%zu] must be a string",
                                s->path, i);
            if (strcmp(a, "Qwen3ForCausalLM"))
                return qerr_set(s->err,
                                "%s: architecture '%s' is not supported (quill runs "
                                "Qwen3ForCausalLM only)", s->path, a);
        }
    }
    return 0;
}

/* rope_theta from 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`) keys; any rope
 * type but "default" is refused. */
static int get_rope(const Src *s, json_t *root, double *theta) {
    const char *obj_keys[] = {"rope_parameters", "rope_scaling"};
    for (int i = 0; i < 2; i++) {
        json_t *o = field(root, obj_keys[i]);
        if (!o) continue;
        if (!json_is_object(o))
            return qerr_set(s->err, "%s: field \"%s\" must be an object or null", s->path,
                            obj_keys[i]);
        json_t *t = field(o, "rope_type");
        if (!t) t = field(o, "type");
        if (t && !json_is_string(t))
            return qerr_set(s->err, "%s: field \"%s.rope_type\" must be a string", s->path,
                            obj_keys[i]);
        if (t && strcmp(json_string_value(t), "default"))
            return qerr_set(s->err, "%s: %s type '%s' is not supported (only \"default\" RoPE)",
                            s->path, obj_keys[i], json_string_value(t));
        if (!t && i == 1)
            return qerr_set(s->err, "%s: field \"rope_scaling\" has no rope_type; only null or "
                                    "\"default\" is supported", s->path);
    }
    json_t *rp = field(root, "rope_parameters");
    json_t *holder = rp && field(rp, "rope_theta") ? rp : root;
    Src sub = *s;
    char where[4200];
    if (holder == rp) {
        snprintf(where, sizeof where, "%s: rope_parameters", s->path);
        sub.path = where;
    }
    return get_num(&sub, holder, "rope_theta", 10000.0, 0, true, 1e30, false, theta);
}

static int get_dtype(const Src *s, json_t *root, char *out, size_t n) {
    const char *key = field(root, "dtype") ? "dtype" : "torch_dtype";
    json_t *v = field(root, key);
    const char *d = "bfloat16";
    if (v) {
        d = json_string_value(v);
        if (!d) return qerr_set(s->err, "%s: field \"%s\" must be a string", s->path, key);
        if (strcmp(d, "bfloat16") && strcmp(d, "float16") && strcmp(d, "float32"))
            return qerr_set(s->err, "%s: field \"%s\" = '%s' is not one of bfloat16, float16, "
                                    "float32", s->path, key, d);
    }
    snprintf(out, n, "%s", d);
    return 0;
}

static int get_quant(const Src *s, json_t *root, QwenConfig *cfg) {
    json_t *q = field(root, "quantization_config");
    if (!q) return 0;
    if (!json_is_object(q))
        return qerr_set(s->err, "%s: field \"quantization_config\" must be an object", s->path);
    char where[4200];
    snprintf(where, sizeof where, "%s: quantization_config", s->path);
    Src qs = {where, s->err};
    const char *method = json_string_value(field(q, "quant_method"));
    if (!method || strcmp(method, "int4_weight_only"))
        return qerr_set(s->err, "%s: quant_method '%s' is not supported (only int4_weight_only)",
                        where, method ? method : "(missing)");
    int bits;
    if (get_int(&qs, q, "bits", false, 4, 4, 4, &bits) ||
        get_int(&qs, q, "group_size", true, 0, 32, 256, &cfg->group_size))
        return -1;
    if (cfg->group_size & (cfg->group_size - 1))
        return qerr_set(s->err, "%s: group_size %d is not 32, 64, 128 or 256", where,
                        cfg->group_size);
    json_t *alg = field(q, "algorithm");
    const char *a = alg ? json_string_value(alg) : "hqq";
    if (!a || (strcmp(a, "hqq") && strcmp(a, "minmax")))
        return qerr_set(s->err, "%s: algorithm must be \"hqq\" or \"minmax\"", where);
    snprintf(cfg->quant_algorithm, sizeof cfg->quant_algorithm, "%s", a);
    json_t *dq = field(q, "dequant");
    if (dq && (!json_is_string(dq) || strcmp(json_string_value(dq), "(q - 8) * scale + zero")))
        return qerr_set(s->err, "%s: dequant formula is not \"(q - 8) * scale + zero\"", where);
    json_t *mnq = field(q, "modules_not_quantized");
    cfg->lm_head_quantized = true;
    if (mnq) {
        if (!json_is_array(mnq))
            return qerr_set(s->err, "%s: modules_not_quantized must be a list of names", where);
        for (size_t i = 0; i < json_array_size(mnq); i++) {
            const char *m = json_string_value(json_array_get(mnq, i));
            if (!m) return qerr_set(s->err, "%s: modules_not_quantized[%zu] is not a string", where, i);
            if (!strcmp(m, "lm_head")) cfg->lm_head_quantized = false;
        }
    }
    cfg->quantized = true;
    return 0;
}

int config_load_file(QwenConfig *cfg, const char *path, QErr *err) {
    memset(cfg, 0, sizeof *cfg);
    json_t *root = load_object(path, err);
    if (!root) return -1;
    Src s = {path, err};
    double eps, theta;
    bool flag;
    int rc = -1;
    if (check_architecture(&s, root) ||
        get_int(&s, root, "vocab_size", true, 0, 1, 1 << 30, &cfg->vocab_size) ||
        get_int(&s, root, "hidden_size", true, 0, 1, 1 << 20, &cfg->hidden_size) ||
        get_int(&s, root, "intermediate_size", true, 0, 1, 1 << 22, &cfg->intermediate_size) ||
        get_int(&s, root, "num_hidden_layers", true, 0, 1, 4096, &cfg->num_hidden_layers) ||
        get_int(&s, root, "num_attention_heads", true, 0, 1, 4096, &cfg->num_attention_heads) ||
        get_int(&s, root, "num_key_value_heads", false, cfg->num_attention_heads, 1,
                cfg->num_attention_heads, &cfg->num_key_value_heads))
        goto out;
    if (cfg->num_attention_heads % cfg->num_key_value_heads) {
        qerr_set(err, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d",
                 path, cfg->num_attention_heads, cfg->num_key_value_heads);
        goto out;
    }
    if (!field(root, "head_dim") && cfg->hidden_size % cfg->num_attention_heads) {
        qerr_set(err, "%s: no \"head_dim\" and hidden_size %d is not a multiple of "
                      "num_attention_heads %d", path, cfg->hidden_size, cfg->num_attention_heads);
        goto out;
    }
    if (get_int(&s, root, "head_dim", false, cfg->hidden_size / cfg->num_attention_heads, 2, 4096,
                &cfg->head_dim))
        goto out;
    if (cfg->head_dim % 2) {
        qerr_set(err, "%s: field \"head_dim\" = %d must be even (RoPE rotates pairs)", path,
                 cfg->head_dim);
        goto out;
    }
    if (get_int(&s, root, "max_position_embeddings", false, 32768, 1, 1 << 30,
                &cfg->max_position_embeddings) ||
        get_num(&s, root, "rms_norm_eps", 1e-6, 0, true, 1, true, &eps) ||
        get_rope(&s, root, &theta) ||
        get_bool(&s, root, "tie_word_embeddings", false, &cfg->tie_word_embeddings) ||
        get_int(&s, root, "bos_token_id", false, -1, 0, INT_MAX, &cfg->bos_token_id) ||
        get_ids(&s, root, "eos_token_id", cfg->eos_token_ids, &cfg->n_eos) ||
        get_dtype(&s, root, cfg->dtype, sizeof cfg->dtype) || get_quant(&s, root, cfg))
        goto out;
    cfg->rms_norm_eps = (float)eps;
    cfg->rope_theta = theta;
    json_t *act = field(root, "hidden_act");
    if (act && (!json_is_string(act) || strcmp(json_string_value(act), "silu"))) {
        qerr_set(err, "%s: hidden_act '%s' is not supported (only silu)", path,
                 json_is_string(act) ? json_string_value(act) : "?");
        goto out;
    }
    if (get_bool(&s, root, "attention_bias", false, &flag)) goto out;
    if (flag) {
        qerr_set(err, "%s: attention_bias true is not supported", path);
        goto out;
    }
    if (get_bool(&s, root, "use_sliding_window", false, &flag)) goto out;
    if (flag) {
        qerr_set(err, "%s: use_sliding_window true is not supported", path);
        goto out;
    }
    rc = 0;
out:
    json_decref(root);
    return rc;
}

int config_load(QwenConfig *cfg, const char *dir, QErr *err) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/config.json", dir) >= sizeof path)
        return qerr_set(err, "%s: path too long", dir);
    return config_load_file(cfg, path, err);
}

/* ------------------------------------------------------------------------------------------ */
/* Writing                                                                                     */

static json_t *ids_json(const int *ids, int n, bool list) {
    if (n == 1 && !list) return json_integer(ids[0]);
    json_t *a = json_array();
    for (int i = 0; i < n; i++) json_array_append_new(a, json_integer(ids[i]));
    return a;
}

int config_save(const QwenConfig *cfg, const char *dir, QErr *err) {
    json_t *o = json_object();
    json_t *arch = json_array();
    json_array_append_new(arch, json_string("Qwen3ForCausalLM"));
    json_object_set_new(o, "architectures", arch);
    json_object_set_new(o, "attention_bias", json_false());
    json_object_set_new(o, "attention_dropout", json_real(0.0));
    json_object_set_new(o, "bos_token_id",
                        cfg->bos_token_id >= 0 ? json_integer(cfg->bos_token_id) : json_null());
    json_object_set_new(o, "eos_token_id",
                        cfg->n_eos ? ids_json(cfg->eos_token_ids, cfg->n_eos, false) : json_null());
    json_object_set_new(o, "head_dim", json_integer(cfg->head_dim));
    json_object_set_new(o, "hidden_act", json_string("silu"));
    json_object_set_new(o, "hidden_size", json_integer(cfg->hidden_size));
    json_object_set_new(o, "initializer_range", json_real(0.02));
    json_object_set_new(o, "intermediate_size", json_integer(cfg->intermediate_size));
    json_object_set_new(o, "max_position_embeddings", json_integer(cfg->max_position_embeddings));
    json_object_set_new(o, "max_window_layers", json_integer(cfg->num_hidden_layers));
    json_object_set_new(o, "model_type", json_string("qwen3"));
    json_object_set_new(o, "num_attention_heads", json_integer(cfg->num_attention_heads));
    json_object_set_new(o, "num_hidden_layers", json_integer(cfg->num_hidden_layers));
    json_object_set_new(o, "num_key_value_heads", json_integer(cfg->num_key_value_heads));
    json_object_set_new(o, "rms_norm_eps", json_real(cfg->rms_norm_eps));
    json_object_set_new(o, "rope_scaling", json_null());
    /* Qwen3-8B spells an integral theta as an integer (1000000). */
    if (cfg->rope_theta == floor(cfg->rope_theta) && fabs(cfg->rope_theta) < 9e15)
        json_object_set_new(o, "rope_theta", json_integer((json_int_t)cfg->rope_theta));
    else
        json_object_set_new(o, "rope_theta", json_real(cfg->rope_theta));
    json_object_set_new(o, "sliding_window", json_null());
    json_object_set_new(o, "tie_word_embeddings", json_boolean(cfg->tie_word_embeddings));
    json_object_set_new(o, "torch_dtype", json_string("bfloat16"));
    json_object_set_new(o, "transformers_version", json_string(CONFIG_TRANSFORMERS_VERSION));
    json_object_set_new(o, "use_cache", json_true());
    json_object_set_new(o, "use_sliding_window", json_false());
    json_object_set_new(o, "vocab_size", json_integer(cfg->vocab_size));
    static const char *const f32[] = {"rms_norm_eps", NULL};
    int rc = write_json(dir, "config.json", o, f32, err);
    json_decref(o);
    return rc;
}

int config_save_quantized(const char *src_dir, const char *dst_dir, int group_size,
                          const char *algorithm, bool lm_head_quantized, QErr *err) {
    if (group_size <= 0 || (group_size & (group_size - 1)) || group_size < 32 || group_size > 256)
        return qerr_set(err, "group_size %d is not 32, 64, 128 or 256", group_size);
    if (!algorithm || (strcmp(algorithm, "hqq") && strcmp(algorithm, "minmax")))
        return qerr_set(err, "quantization algorithm '%s' is not hqq or minmax",
                        algorithm ? algorithm : "(null)");
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/config.json", src_dir) >= sizeof path)
        return qerr_set(err, "%s: path too long", src_dir);
    json_t *root = load_object(path, err);
    if (!root) return -1;
    json_t *q = json_object();
    json_object_set_new(q, "quant_method", json_string("int4_weight_only"));
    json_object_set_new(q, "bits", json_integer(4));
    json_object_set_new(q, "group_size", json_integer(group_size));
    json_object_set_new(q, "algorithm", json_string(algorithm));
    json_object_set_new(q, "dequant", json_string("(q - 8) * scale + zero"));
    json_t *mnq = json_array();
    json_array_append_new(mnq, json_string("model.embed_tokens"));
    if (!lm_head_quantized) json_array_append_new(mnq, json_string("lm_head"));
    json_object_set_new(q, "modules_not_quantized", mnq);
    json_object_set_new(root, "quantization_config", q);
    int rc = write_json(dst_dir, "config.json", root, NULL, err);
    json_decref(root);
    return rc;
}

void gen_config_defaults(GenConfig *g) {
    memset(g, 0, sizeof *g);
    g->do_sample = false;
    g->temperature = 1.0f;
    g->top_p = 1.0f;
    g->top_k = 0;
    g->min_p = 0.0f;
    g->repetition_penalty = 1.0f;
    g->pad_token_id = -1;
}

int gen_config_load(GenConfig *g, const QwenConfig *cfg, const char *dir, QErr *err) {
    gen_config_defaults(g);
    memcpy(g->eos_token_ids, cfg->eos_token_ids, sizeof g->eos_token_ids);
    g->n_eos = cfg->n_eos;
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/generation_config.json", dir) >= sizeof path)
        return qerr_set(err, "%s: path too long", dir);
    FILE *probe = fopen(path, "r");
    if (!probe) {
        if (errno == ENOENT) return 0;
        return qerr_set(err, "%s: cannot read: %s", path, strerror(errno));
    }
    fclose(probe);
    json_t *root = load_object(path, err);
    if (!root) return -1;
    Src s = {path, err};
    double temp, top_p, min_p, rep;
    int ids[CONFIG_MAX_EOS], n_ids;
    int rc = -1;
    if (get_bool(&s, root, "do_sample", g->do_sample, &g->do_sample) ||
        get_num(&s, root, "temperature", g->temperature, 0, false, 100, false, &temp) ||
        get_num(&s, root, "top_p", g->top_p, 0, true, 1, false, &top_p) ||
        get_int(&s, root, "top_k", false, g->top_k, 0, INT_MAX, &g->top_k) ||
        get_num(&s, root, "min_p", g->min_p, 0, false, 1, false, &min_p) ||
        get_num(&s, root, "repetition_penalty", g->repetition_penalty, 0, true, 100, false, &rep) ||
        get_int(&s, root, "pad_token_id", false, -1, 0, INT_MAX, &g->pad_token_id) ||
        get_ids(&s, root, "eos_token_id", ids, &n_ids))
        goto out;
    g->temperature = (float)temp;
    g->top_p = (float)top_p;
    g->min_p = (float)min_p;
    g->repetition_penalty = (float)rep;
    if (n_ids) {
        memcpy(g->eos_token_ids, ids, sizeof ids);
        g->n_eos = n_ids;
    }
    rc = 0;
out:
    json_decref(root);
    return rc;
}

int gen_config_save(const GenConfig *g, const QwenConfig *cfg, const char *dir, QErr *err) {
    json_t *o = json_object();
    if (cfg->bos_token_id >= 0) json_object_set_new(o, "bos_token_id", json_integer(cfg->bos_token_id));
    json_object_set_new(o, "do_sample", json_boolean(g->do_sample));
    if (g->n_eos) json_object_set_new(o, "eos_token_id", ids_json(g->eos_token_ids, g->n_eos, true));
    if (g->pad_token_id >= 0) json_object_set_new(o, "pad_token_id", json_integer(g->pad_token_id));
    json_object_set_new(o, "temperature", json_real(g->temperature));
    json_object_set_new(o, "top_k", json_integer(g->top_k));
    json_object_set_new(o, "top_p", json_real(g->top_p));
    if (g->min_p != 0.0f) json_object_set_new(o, "min_p", json_real(g->min_p));
    if (g->repetition_penalty != 1.0f)
        json_object_set_new(o, "repetition_penalty", json_real(g->repetition_penalty));
    json_object_set_new(o, "transformers_version", json_string(CONFIG_TRANSFORMERS_VERSION));
    static const char *const f32[] = {"temperature", "top_p", "min_p", "repetition_penalty", NULL};
    int rc = write_json(dir, "generation_config.json", o, f32, err);
    json_decref(o);
    return rc;
}
