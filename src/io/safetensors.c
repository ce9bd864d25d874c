/* safetensors.c — the checkpoint container: mmap'd reader with full header validation, and a
 * writer that lays a file out up front and hands out writable memory for each tensor.
 *
 * Why it is shaped this way: checkpoints are tens of gigabytes, so neither side copies tensor
 * bytes more than it must — the reader maps the file and points into it, the writer maps the
 * (pre-allocated) file and lets any number of threads fill tensors in place, or, for producers
 * that can generate any byte range, composes aligned blocks and writes them with O_DIRECT (the
 * page cache halved the speed of 16 GB writes and competes with everything else for memory; the
 * price is one bounce buffer per thread). The price of mapping is that every header byte
 * must be distrusted before a pointer is formed from it: offsets, sizes and alignment are all
 * checked here so that a truncated or hostile file is an error message, never a SIGBUS or an
 * out-of-bounds read. Holes between tensors are tolerated (they are harmless); overlaps are not.
 * The writer emits no holes, so its files are also valid for the stricter Rust reader. */
#include "io/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Headers beyond this are refused (the Rust implementation uses the same bound). */
#define ST_MAX_HEADER (100u * 1024 * 1024)

static const struct {
    const char *name;
    size_t size;
} DTYPES[DT_COUNT] = {
    [DT_BF16] = {"BF16", 2}, [DT_F16] = {"F16", 2}, [DT_F32] = {"F32", 4}, [DT_U8] = {"U8", 1},
    [DT_I8] = {"I8", 1},     [DT_I32] = {"I32", 4}, [DT_I64] = {"I64", 8},
};

size_t dtype_size(DType dt) { return (unsigned)dt < DT_COUNT ? DTYPES[dt].size : 0; }

const char *dtype_name(DType dt) { return (unsigned)dt < DT_COUNT ? DTYPES[dt].name : "?"; }

int dtype_from_name(const char *name, DType *out) {
    for (int i = 0; i < DT_COUNT; i++)
        if (!strcmp(name, DTYPES[i].name)) {
            *out = (DType)i;
            return 0;
        }
    return -1;
}

/* Element count of a shape, or -1 on overflow (bounded by SIZE_MAX / 8 so byte counts fit). */
static int shape_numel(int ndim, const int64_t *shape, uint64_t *out) {
    uint64_t n = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0 || __builtin_mul_overflow(n, (uint64_t)shape[d], &n)) return -1;
    }
    if (n > SIZE_MAX / 8) return -1;
    *out = n;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Reader                                                                                      */

typedef struct StFile {
    char *path;
    uint8_t *map;
    size_t size;
} StFile;

struct StModel {
    StFile *files;
    size_t n_files;
    StTensor *tensors; /* sorted by name; names owned */
    size_t n;
    json_t *meta; /* __metadata__ of files[0], or NULL */
};

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const StTensor *)a)->name, ((const StTensor *)b)->name);
}

static int cmp_tensor_offset(const void *a, const void *b) {
    const StTensor *x = *(const StTensor *const *)a, *y = *(const StTensor *const *)b;
    uintptr_t px = (uintptr_t)x->data, py = (uintptr_t)y->data;
    if (px != py) return px < py ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

static void model_free(StModel *m) {
    if (!m) return;
    for (size_t i = 0; i < m->n; i++) free((char *)m->tensors[i].name);
    free(m->tensors);
    for (size_t i = 0; i < m->n_files; i++) {
        if (m->files[i].map) munmap(m->files[i].map, m->files[i].size);
        free(m->files[i].path);
    }
    free(m->files);
    json_decref(m->meta);
    free(m);
}

void st_close(StModel *m) { model_free(m); }

/* Reads a non-negative integer that fits int64 from a JSON value. */
static int json_nonneg(const json_t *v, int64_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0) return -1;
    *out = json_integer_value(v);
    return 0;
}

/* Validates one header entry and appends the tensor to m. The data region starts at `data`, which
 * is data_off bytes into the file, and is data_size bytes long. */
static int parse_entry(StModel *m, const char *path, const char *name, json_t *e, uint8_t *data,
                       size_t data_off, size_t data_size, QErr *err) {
    if (!*name) return qerr_set(err, "%s: header has a tensor with an empty name", path);
    if (!json_is_object(e))
        return qerr_set(err, "%s: tensor '%s': header entry is not a JSON object", path, name);
    const char *key;
    json_t *val;
    json_object_foreach(e, key, val) {
        if (strcmp(key, "dtype") && strcmp(key, "shape") && strcmp(key, "data_offsets"))
            return qerr_set(err, "%s: tensor '%s': unexpected key '%s' in header entry", path,
                            name, key);
    }
    StTensor t = {0};
    t.file = path;

    json_t *jd = json_object_get(e, "dtype");
    if (!json_is_string(jd))
        return qerr_set(err, "%s: tensor '%s': missing or non-string \"dtype\"", path, name);
    if (dtype_from_name(json_string_value(jd), &t.dtype))
        return qerr_set(err, "%s: tensor '%s': unsupported dtype '%s'", path, name,
                        json_string_value(jd));

    json_t *js = json_object_get(e, "shape");
    if (!json_is_array(js))
        return qerr_set(err, "%s: tensor '%s': missing or non-array \"shape\"", path, name);
    if (json_array_size(js) > ST_MAX_DIMS)
        return qerr_set(err, "%s: tensor '%s': %zu dimensions (at most %d supported)", path, name,
                        json_array_size(js), ST_MAX_DIMS);
    t.ndim = (int)json_array_size(js);
    for (int d = 0; d < t.ndim; d++)
        if (json_nonneg(json_array_get(js, d), &t.shape[d]))
            return qerr_set(err, "%s: tensor '%s': shape[%d] is not a non-negative integer", path,
                            name, d);
    uint64_t numel;
    if (shape_numel(t.ndim, t.shape, &numel))
        return qerr_set(err, "%s: tensor '%s': shape is too large", path, name);

    json_t *jo = json_object_get(e, "data_offsets");
    int64_t begin, end;
    if (!json_is_array(jo) || json_array_size(jo) != 2 ||
        json_nonneg(json_array_get(jo, 0), &begin) || json_nonneg(json_array_get(jo, 1), &end))
        return qerr_set(err,
                        "%s: tensor '%s': \"data_offsets\" must be two non-negative integers",
                        path, name);
    if (begin > end)
        return qerr_set(err, "%s: tensor '%s': data_offsets [%lld, %lld] end before they begin",
                        path, name, (long long)begin, (long long)end);
    if ((uint64_t)end > data_size)
        return qerr_set(err,
                        "%s: tensor '%s': data_offsets [%lld, %lld] extend past the data region "
                        "(%zu bytes; truncated file?)",
                        path, name, (long long)begin, (long long)end, data_size);
    t.nbytes = (size_t)(end - begin);
    size_t es = dtype_size(t.dtype);
    if (t.nbytes != numel * es)
        return qerr_set(err,
                        "%s: tensor '%s': holds %zu bytes but shape x %s needs %llu", path, name,
                        t.nbytes, dtype_name(t.dtype), (unsigned long long)(numel * es));
    t.data = data + begin;
    if ((uintptr_t)t.data % es) /* the map is page-aligned, so this is the file offset's */
        return qerr_set(err, "%s: tensor '%s': data at file offset %zu is not aligned to its "
                        "%zu-byte elements", path, name, data_off + (size_t)begin, es);
    t.name = strdup(name);
    if (!t.name) return qerr_set(err, "%s: out of memory", path);
    m->tensors[m->n++] = t;
    return 0;
}

/* Maps PATH, validates its header and appends its tensors to m (which must have room for them:
 * the array is grown here). If meta_out is non-NULL it receives a reference to __metadata__. */
static int load_file(StModel *m, const char *path, json_t **meta_out, QErr *err) {
    StFile *nf = realloc(m->files, (m->n_files + 1) * sizeof *nf);
    if (!nf) return qerr_set(err, "%s: out of memory", path);
    m->files = nf;
    StFile *f = &m->files[m->n_files];
    *f = (StFile){0};
    f->path = strdup(path);
    if (!f->path) return qerr_set(err, "%s: out of memory", path);
    m->n_files++;
    path = f->path; /* tensors point at the owned copy */

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return qerr_set(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st)) {
        int e = errno;
        close(fd);
        return qerr_set(err, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return qerr_set(err, "%s: not a regular file", path);
    }
    if (st.st_size < 8) {
        close(fd);
        return qerr_set(err, "%s: file is %lld bytes, too short for a safetensors header", path,
                        (long long)st.st_size);
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED) return qerr_set(err, "%s: cannot mmap: %s", path, strerror(map_errno));
    f->map = map;
    f->size = (size_t)st.st_size;

    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | f->map[i];
    if (hlen > f->size - 8)
        return qerr_set(err,
                        "%s: header length %llu runs past the end of the file (%zu bytes; "
                        "truncated file?)", path, (unsigned long long)hlen, f->size);
    if (hlen > ST_MAX_HEADER)
        return qerr_set(err, "%s: header length %llu is over the %u-byte limit", path,
                        (unsigned long long)hlen, ST_MAX_HEADER);
    json_error_t je;
    json_t *root = json_loadb((const char *)f->map + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return qerr_set(err, "%s: header is not valid JSON (byte %d): %s", path, je.position,
                        je.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return qerr_set(err, "%s: header is not a JSON object", path);
    }

    size_t n_new = json_object_size(root);
    StTensor *nt = realloc(m->tensors, (m->n + n_new + 1) * sizeof *nt);
    if (!nt) {
        json_decref(root);
        return qerr_set(err, "%s: out of memory", path);
    }
    m->tensors = nt;
    size_t first = m->n;
    uint8_t *data = f->map + 8 + hlen;
    size_t data_size = f->size - 8 - (size_t)hlen;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (!strcmp(key, "__metadata__")) {
            const char *mk;
            json_t *mv;
            if (!json_is_object(val)) goto bad_meta;
            json_object_foreach(val, mk, mv) {
                if (!json_is_string(mv)) goto bad_meta;
            }
            if (meta_out) *meta_out = json_incref(val);
            continue;
        bad_meta:
            json_decref(root);
            return qerr_set(err, "%s: \"__metadata__\" must be an object of strings", path);
        }
        if (parse_entry(m, path, key, val, data, 8 + (size_t)hlen, data_size, err)) {
            json_decref(root);
            return -1;
        }
    }
    json_decref(root);

    /* Overlap check within this file: sort pointers by start and compare neighbours. */
    size_t cnt = m->n - first;
    if (cnt > 1) {
        const StTensor **by_off = malloc(cnt * sizeof *by_off);
        if (!by_off) return qerr_set(err, "%s: out of memory", path);
        for (size_t i = 0; i < cnt; i++) by_off[i] = &m->tensors[first + i];
        qsort(by_off, cnt, sizeof *by_off, cmp_tensor_offset);
        for (size_t i = 1; i < cnt; i++) {
            const StTensor *a = by_off[i - 1], *b = by_off[i];
            if ((const uint8_t *)b->data < (const uint8_t *)a->data + a->nbytes) {
                int rc = qerr_set(err, "%s: tensors '%s' and '%s' overlap in the data region",
                                  path, a->name, b->name);
                free(by_off);
                return rc;
            }
        }
        free(by_off);
    }
    return 0;
}

/* Sorts the tensors by name and refuses duplicates (possible only across shards). */
static int finish_model(StModel *m, QErr *err) {
    qsort(m->tensors, m->n, sizeof *m->tensors, cmp_tensor_name);
    for (size_t i = 1; i < m->n; i++)
        if (!strcmp(m->tensors[i - 1].name, m->tensors[i].name))
            return qerr_set(err, "tensor '%s' appears in both %s and %s", m->tensors[i].name,
                            m->tensors[i - 1].file, m->tensors[i].file);
    return 0;
}

StModel *st_open_file(const char *path, QErr *err) {
    StModel *m = calloc(1, sizeof *m);
    if (!m) {
        qerr_set(err, "%s: out of memory", path);
        return NULL;
    }
    if (load_file(m, path, &m->meta, err) || finish_model(m, err)) {
        model_free(m);
        return NULL;
    }
    return m;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Opens the shards listed by an index file and cross-checks them against its weight_map. */
static StModel *open_index(const char *dir, const char *index_path, QErr *err) {
    json_error_t je;
    json_t *root = json_load_file(index_path, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        qerr_set(err, "%s: not valid JSON (line %d): %s", index_path, je.line, je.text);
        return NULL;
    }
    StModel *m = NULL;
    const char **shards = NULL;
    size_t n_shards = 0;
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm)) {
        qerr_set(err, "%s: missing or non-object \"weight_map\"", index_path);
        goto fail;
    }
    shards = malloc((json_object_size(wm) + 1) * sizeof *shards);
    m = calloc(1, sizeof *m);
    if (!shards || !m) {
        qerr_set(err, "%s: out of memory", index_path);
        goto fail;
    }
    const char *name;
    json_t *v;
    json_object_foreach(wm, name, v) {
        const char *s = json_string_value(v);
        if (!s) {
            qerr_set(err, "%s: weight_map entry for tensor '%s' is not a string", index_path, name);
            goto fail;
        }
        if (!*s || strchr(s, '/') || !strcmp(s, ".") || !strcmp(s, "..")) {
            qerr_set(err, "%s: tensor '%s': shard name '%s' is not a plain file name", index_path,
                     name, s);
            goto fail;
        }
        shards[n_shards++] = s;
    }
    qsort(shards, n_shards, sizeof *shards, cmp_str);
    for (size_t i = 0; i < n_shards; i++) {
        if (i && !strcmp(shards[i], shards[i - 1])) continue;
        char path[4096];
        if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, shards[i]) >= sizeof path) {
            qerr_set(err, "%s: shard path too long", index_path);
            goto fail;
        }
        if (access(path, F_OK)) {
            /* Name one tensor that lives there so the message points at what is lost. */
            const char *who = "";
            json_object_foreach(wm, name, v) {
                if (!strcmp(json_string_value(v), shards[i])) {
                    who = name;
                    break;
                }
            }
            qerr_set(err, "%s: shard %s (holding tensor '%s') is missing: %s", index_path, path,
                     who, strerror(errno));
            goto fail;
        }
        if (load_file(m, path, m->meta ? NULL : &m->meta, err)) goto fail;
    }
    if (finish_model(m, err)) goto fail;
    /* Every tensor in the index must be in the shard it names, and no shard may hold more. */
    json_object_foreach(wm, name, v) {
        const StTensor *t = st_find(m, name);
        const char *want = json_string_value(v);
        if (!t) {
            qerr_set(err, "%s: tensor '%s' is listed for %s but that shard does not hold it",
                     index_path, name, want);
            goto fail;
        }
        const char *base = strrchr(t->file, '/');
        base = base ? base + 1 : t->file;
        if (strcmp(base, want)) {
            qerr_set(err, "%s: tensor '%s' is listed for %s but found in %s", index_path, name,
                     want, t->file);
            goto fail;
        }
    }
    if (m->n != json_object_size(wm)) {
        for (size_t i = 0; i < m->n; i++)
            if (!json_object_get(wm, m->tensors[i].name)) {
                qerr_set(err, "%s: tensor '%s' in %s is not listed in the index", index_path,
                         m->tensors[i].name, m->tensors[i].file);
                break;
            }
        goto fail;
    }
    free(shards);
    json_decref(root);
    return m;
fail:
    free(shards);
    model_free(m);
    json_decref(root);
    return NULL;
}

StModel *st_open_dir(const char *dir, QErr *err) {
    char path[4096];
    if ((size_t)snprintf(path, sizeof path, "%s/model.safetensors", dir) >= sizeof path) {
        qerr_set(err, "%s: path too long", dir);
        return NULL;
    }
    if (!access(path, F_OK)) return st_open_file(path, err);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (!access(path, F_OK)) return open_index(dir, path, err);
    qerr_set(err, "%s: neither model.safetensors nor model.safetensors.index.json exists", dir);
    return NULL;
}

size_t st_count(const StModel *m) { return m->n; }

const StTensor *st_at(const StModel *m, size_t i) { return i < m->n ? &m->tensors[i] : NULL; }

static StTensor *find_sorted(StTensor *v, size_t n, const char *name) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(v[mid].name, name);
        if (!c) return &v[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const StTensor *st_find(const StModel *m, const char *name) {
    return find_sorted(m->tensors, m->n, name);
}

const char *st_metadata(const StModel *m, const char *key) {
    return m->meta ? json_string_value(json_object_get(m->meta, key)) : NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Writer                                                                                      */

struct StWriter {
    char *path;
    int fd;
    int dfd;              /* the same file opened O_DIRECT, or -1 where that is unsupported */
    atomic_int no_direct; /* set when an O_DIRECT write was refused: use fd from then on */
    size_t data_off;      /* file offset of the data region */
    uint8_t *map;
    size_t size;
    StTensor *tensors; /* sorted by name; names owned */
    size_t n;
};

static void writer_free(StWriter *w) {
    if (w->map) munmap(w->map, w->size);
    if (w->fd >= 0) close(w->fd);
    if (w->dfd >= 0) close(w->dfd);
    for (size_t i = 0; i < w->n; i++) free((char *)w->tensors[i].name);
    free(w->tensors);
    free(w->path);
    free(w);
}

/* Appends s to the growing buffer as a JSON string literal. */
static int append_json_string(char **buf, size_t *len, size_t *cap, const char *s) {
    json_t *j = json_string(s);
    char *enc = j ? json_dumps(j, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
    json_decref(j);
    if (!enc) return -1;
    size_t n = strlen(enc);
    if (*len + n + 1 > *cap) {
        size_t nc = (*cap + n + 1) * 2;
        char *nb = realloc(*buf, nc);
        if (!nb) {
            free(enc);
            return -1;
        }
        *buf = nb;
        *cap = nc;
    }
    memcpy(*buf + *len, enc, n + 1);
    *len += n;
    free(enc);
    return 0;
}

static int append_raw(char **buf, size_t *len, size_t *cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int append_raw(char **buf, size_t *len, size_t *cap, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(*buf + *len, *cap - *len, fmt, ap);
        va_end(ap);
        if (n < 0) return -1;
        if (*len + (size_t)n < *cap) {
            *len += (size_t)n;
            return 0;
        }
        size_t nc = (*cap + (size_t)n + 1) * 2;
        char *nb = realloc(*buf, nc);
        if (!nb) return -1;
        *buf = nb;
        *cap = nc;
    }
}

typedef struct MetaPair {
    const char *k, *v;
} MetaPair;

static int cmp_meta(const void *a, const void *b) {
    return strcmp(((const MetaPair *)a)->k, ((const MetaPair *)b)->k);
}

/* Builds the header text (unpadded): `__metadata__` first, then the tensors in w's order. */
static char *build_header(const StWriter *w, const char *const *meta_kv, size_t n_meta,
                          size_t *len_out) {
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap);
    MetaPair *mp = malloc((n_meta + 1) * sizeof *mp);
    if (!buf || !mp) goto fail;
    buf[0] = '\0';
    for (size_t i = 0; i < n_meta; i++) mp[i] = (MetaPair){meta_kv[2 * i], meta_kv[2 * i + 1]};
    qsort(mp, n_meta, sizeof *mp, cmp_meta);
    if (append_raw(&buf, &len, &cap, "{")) goto fail;
    if (n_meta) {
        if (append_raw(&buf, &len, &cap, "\"__metadata__\":{")) goto fail;
        for (size_t i = 0; i < n_meta; i++) {
            if ((i && append_raw(&buf, &len, &cap, ",")) ||
                append_json_string(&buf, &len, &cap, mp[i].k) ||
                append_raw(&buf, &len, &cap, ":") ||
                append_json_string(&buf, &len, &cap, mp[i].v))
                goto fail;
        }
        if (append_raw(&buf, &len, &cap, "}")) goto fail;
    }
    size_t off = 0;
    for (size_t i = 0; i < w->n; i++) {
        const StTensor *t = &w->tensors[i];
        if (((n_meta || i) && append_raw(&buf, &len, &cap, ",")) ||
            append_json_string(&buf, &len, &cap, t->name) ||
            append_raw(&buf, &len, &cap, ":{\"data_offsets\":[%zu,%zu],\"dtype\":\"%s\",\"shape\":[",
                       off, off + t->nbytes, dtype_name(t->dtype)))
            goto fail;
        for (int d = 0; d < t->ndim; d++)
            if (append_raw(&buf, &len, &cap, "%s%lld", d ? "," : "", (long long)t->shape[d]))
                goto fail;
        if (append_raw(&buf, &len, &cap, "]}")) goto fail;
        off += t->nbytes;
    }
    if (append_raw(&buf, &len, &cap, "}")) goto fail;
    free(mp);
    *len_out = len;
    return buf;
fail:
    free(mp);
    free(buf);
    return NULL;
}

StWriter *st_writer_create(const char *path, const StSpec *specs, size_t n,
                           const char *const *meta_kv, size_t n_meta, QErr *err) {
    StWriter *w = calloc(1, sizeof *w);
    if (!w) {
        qerr_set(err, "%s: out of memory", path);
        return NULL;
    }
    w->fd = w->dfd = -1;
    atomic_init(&w->no_direct, 0);
    w->path = strdup(path);
    w->tensors = calloc(n + 1, sizeof *w->tensors);
    if (!w->path || !w->tensors) {
        qerr_set(err, "%s: out of memory", path);
        goto fail;
    }
    for (size_t i = 0; i < n; i++) {
        const StSpec *s = &specs[i];
        StTensor *t = &w->tensors[w->n];
        if (!s->name || !*s->name) {
            qerr_set(err, "%s: tensor %zu has an empty name", path, i);
            goto fail;
        }
        if ((unsigned)s->dtype >= DT_COUNT || s->ndim < 0 || s->ndim > ST_MAX_DIMS) {
            qerr_set(err, "%s: tensor '%s': bad dtype or dimension count", path, s->name);
            goto fail;
        }
        uint64_t numel;
        if (shape_numel(s->ndim, s->shape, &numel)) {
            qerr_set(err, "%s: tensor '%s': shape is negative or too large", path, s->name);
            goto fail;
        }
        t->name = strdup(s->name);
        if (!t->name) {
            qerr_set(err, "%s: out of memory", path);
            goto fail;
        }
        w->n++;
        t->dtype = s->dtype;
        t->ndim = s->ndim;
        memcpy(t->shape, s->shape, sizeof t->shape);
        t->nbytes = (size_t)numel * dtype_size(s->dtype);
        t->file = w->path;
    }
    qsort(w->tensors, w->n, sizeof *w->tensors, cmp_tensor_name);
    size_t data_size = 0;
    for (size_t i = 0; i < w->n; i++) {
        if (i && !strcmp(w->tensors[i - 1].name, w->tensors[i].name)) {
            qerr_set(err, "%s: tensor '%s' given twice", path, w->tensors[i].name);
            goto fail;
        }
        if (data_size % dtype_size(w->tensors[i].dtype)) {
            qerr_set(err, "%s: tensor '%s' would start at unaligned offset %zu", path,
                     w->tensors[i].name, data_size);
            goto fail;
        }
        if (__builtin_add_overflow(data_size, w->tensors[i].nbytes, &data_size)) {
            qerr_set(err, "%s: tensors too large", path);
            goto fail;
        }
    }

    size_t hlen;
    char *header = build_header(w, meta_kv, n_meta, &hlen);
    if (!header) {
        qerr_set(err, "%s: out of memory building the header", path);
        goto fail;
    }
    size_t padded = (hlen + 7) & ~(size_t)7;
    /* Header starts at 8 and is a multiple of 8 long, so the data region is 8-aligned. */
    w->size = 8 + padded + data_size;

    w->fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        qerr_set(err, "%s: cannot create: %s", path, strerror(errno));
        free(header);
        goto fail;
    }
    int rc = posix_fallocate(w->fd, 0, (off_t)w->size);
    if (rc) {
        if (rc == ENOSPC)
            qerr_set(err, "%s: no space left on the device for %zu bytes", path, w->size);
        else
            qerr_set(err, "%s: cannot reserve %zu bytes: %s", path, w->size, strerror(rc));
        free(header);
        goto fail_unlink;
    }
    w->map = mmap(NULL, w->size, PROT_READ | PROT_WRITE, MAP_SHARED, w->fd, 0);
    if (w->map == MAP_FAILED) {
        w->map = NULL;
        qerr_set(err, "%s: cannot mmap %zu bytes: %s", path, w->size, strerror(errno));
        free(header);
        goto fail_unlink;
    }
    uint64_t h64 = padded;
    for (int i = 0; i < 8; i++) w->map[i] = (uint8_t)(h64 >> (8 * i));
    memcpy(w->map + 8, header, hlen);
    memset(w->map + 8 + hlen, ' ', padded - hlen);
    free(header);
    w->data_off = 8 + padded;
    w->dfd = open(path, O_WRONLY | O_DIRECT | O_CLOEXEC); /* -1 is fine: buffered writes */
    size_t off = w->data_off;
    for (size_t i = 0; i < w->n; i++) {
        w->tensors[i].data = w->map + off;
        off += w->tensors[i].nbytes;
    }
    return w;
fail_unlink:
    unlink(path);
fail:
    writer_free(w);
    return NULL;
}

size_t st_writer_count(const StWriter *w) { return w->n; }

StTensor *st_writer_tensor(StWriter *w, size_t i) { return i < w->n ? &w->tensors[i] : NULL; }

StTensor *st_writer_find(StWriter *w, const char *name) {
    return find_sorted(w->tensors, w->n, name);
}

size_t st_writer_block_count(const StWriter *w) {
    return (w->size + ST_WRITER_BLOCK - 1) / ST_WRITER_BLOCK;
}

static int pwrite_all(int fd, const uint8_t *p, size_t n, off_t pos) {
    while (n) {
        ssize_t k = pwrite(fd, p, n, pos);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return k < 0 ? errno : EIO;
        p += k;
        pos += k;
        n -= (size_t)k;
    }
    return 0;
}

int st_writer_write_block(StWriter *w, size_t b, StProduceFn produce, void *ctx, void *scratch,
                          QErr *err) {
    size_t start = b * ST_WRITER_BLOCK;
    if (b >= st_writer_block_count(w)) return qerr_set(err, "%s: no block %zu", w->path, b);
    size_t end = w->size - start < ST_WRITER_BLOCK ? w->size : start + ST_WRITER_BLOCK;
    uint8_t *buf = scratch;
    if (start < w->data_off)
        memcpy(buf, w->map + start, (end < w->data_off ? end : w->data_off) - start);
    /* Tensors are laid out contiguously in name order: find the first one ending after start. */
    size_t lo = 0, hi = w->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        size_t t_end = (size_t)((uint8_t *)w->tensors[mid].data - w->map) + w->tensors[mid].nbytes;
        if (t_end <= start)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (size_t i = lo; i < w->n; i++) {
        size_t ts = (size_t)((uint8_t *)w->tensors[i].data - w->map);
        if (ts >= end) break;
        size_t a = ts > start ? ts : start, z = ts + w->tensors[i].nbytes;
        if (z > end) z = end;
        if (a < z) produce(ctx, i, a - ts, buf + (a - start), z - a);
    }
    /* Whole blocks past the header go out with O_DIRECT. A block holding header bytes (stored
     * through the mapping at create time) and the short last block are written through the page
     * cache, which keeps direct and buffered I/O on disjoint pages. */
    int rc = EINVAL;
    if (start >= w->data_off && end - start == ST_WRITER_BLOCK && w->dfd >= 0 &&
        !atomic_load(&w->no_direct)) {
        rc = pwrite_all(w->dfd, buf, end - start, (off_t)start);
        if (rc == EINVAL) atomic_store(&w->no_direct, 1); /* e.g. a filesystem without it */
    }
    if (rc == EINVAL) rc = pwrite_all(w->fd, buf, end - start, (off_t)start);
    if (rc)
        return qerr_set(err, "%s: write of bytes %zu..%zu failed: %s", w->path, start, end,
                        strerror(rc));
    return 0;
}

int st_writer_finish(StWriter *w, QErr *err) {
    int rc = 0;
    if (munmap(w->map, w->size))
        rc = qerr_set(err, "%s: munmap failed: %s", w->path, strerror(errno));
    w->map = NULL;
    /* fsync writes the mapping's dirty pages; an I/O error surfaces here, not as silent loss. */
    if (!rc && fsync(w->fd)) rc = qerr_set(err, "%s: fsync failed: %s", w->path, strerror(errno));
    if (close(w->fd) && !rc) rc = qerr_set(err, "%s: close failed: %s", w->path, strerror(errno));
    w->fd = -1;
    if (w->dfd >= 0) close(w->dfd);
    w->dfd = -1;
    if (rc) unlink(w->path);
    writer_free(w);
    return rc;
}

void st_writer_abort(StWriter *w) {
    if (!w) return;
    unlink(w->path);
    writer_free(w);
}

StModel *st_create_memory(const StSpec *specs, size_t n, const char *name, QErr *err) {
    StModel *m = calloc(1, sizeof *m);
    size_t total = 0;
    if (!m || !(m->files = calloc(1, sizeof *m->files)) || !(m->tensors = calloc(n ? n : 1, sizeof *m->tensors)) ||
        !(m->files[0].path = strdup(name)))
        goto oom;
    m->n_files = 1;
    for (size_t i = 0; i < n; i++) {
        StTensor *t = &m->tensors[i];
        if (specs[i].ndim < 1 || specs[i].ndim > ST_MAX_DIMS) {
            qerr_set(err, "%s: tensor '%s' has %d dimensions", name, specs[i].name, specs[i].ndim);
            model_free(m);
            return NULL;
        }
        size_t count = 1;
        t->ndim = specs[i].ndim;
        for (int d = 0; d < t->ndim; d++) count *= (size_t)(t->shape[d] = specs[i].shape[d]);
        t->dtype = specs[i].dtype;
        t->nbytes = count * dtype_size(t->dtype);
        t->file = m->files[0].path;
        if (!(t->name = strdup(specs[i].name))) goto oom;
        m->n++;
        total += (t->nbytes + 63) & ~(size_t)63;
    }
    /* Anonymous pages: untouched ones cost nothing, and munmap in st_close frees them. */
    m->files[0].size = total ? total : 1;
    m->files[0].map = mmap(NULL, m->files[0].size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m->files[0].map == MAP_FAILED) {
        m->files[0].map = NULL;
        goto oom;
    }
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        m->tensors[i].data = m->files[0].map + off;
        off += (m->tensors[i].nbytes + 63) & ~(size_t)63;
    }
    qsort(m->tensors, m->n, sizeof *m->tensors, cmp_tensor_name);
    for (size_t i = 1; i < m->n; i++)
        if (!strcmp(m->tensors[i - 1].name, m->tensors[i].name)) {
            qerr_set(err, "%s: tensor '%s' appears twice", name, m->tensors[i].name);
            model_free(m);
            return NULL;
        }
    return m;
oom:
    qerr_set(err, "%s: out of memory for %zu bytes of tensors", name, total);
    model_free(m);
    return NULL;
}
