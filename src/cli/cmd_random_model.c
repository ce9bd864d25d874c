/* cmd_random_model.c — `quill random-model`: write a random-weight Qwen3 checkpoint directory.
 *
 * Everything is written into OUT_DIR.tmp-XXXXXX beside the target and renamed into place only
 * when complete and fsync'd, so an interrupted or failed run never leaves a directory that looks
 * like a valid checkpoint. The cost is needing the space in the target's filesystem and, with
 * --force, deleting the old directory's contents after the swap. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli/commands.h"
#include "io/assets.h"
#include "io/config.h"
#include "io/random_model.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: quill random-model [--preset NAME | --config FILE] [--seed N]\n"
            "                          [--tokenizer DIR] [--threads N] [--force] OUT_DIR\n"
            "\n"
            "Writes a random-weight Qwen3 checkpoint (../shared/spec/random-weights.md):\n"
            "model.safetensors, config.json, generation_config.json, and the Qwen3 tokenizer\n"
            "files when the vocabulary is 151936 (or --tokenizer is given).\n"
            "\n"
            "  --preset NAME    one of: %s\n"
            "  --config FILE    a Qwen3 config.json giving the shapes instead (seed 0 by default)\n"
            "  --seed N         model seed (default: the preset's)\n"
            "  --tokenizer DIR  where tokenizer.json and tokenizer_config.json come from\n"
            "                   (default: the shipped assets/tokenizer/qwen3)\n"
            "  --threads N      generator threads (default: one per CPU)\n"
            "  --force          replace an existing non-empty OUT_DIR\n",
            rm_preset_names());
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef struct Progress {
    double t0;
    int tty;
} Progress;

static void on_progress(void *ctx, uint64_t done, uint64_t total) {
    const Progress *p = ctx;
    if (!p->tty) return;
    fprintf(stderr, "\r  model.safetensors: %.2f / %.2f GB (%3.0f%%) %.1f s", done / 1e9,
            total / 1e9, total ? 100.0 * done / total : 100.0, now_s() - p->t0);
    fflush(stderr);
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* Removes a directory tree without following symlinks. */
static int remove_tree(const char *path) { return nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* out = DIR/NAME; -1 if that does not fit in PATH_MAX. */
static int join(char *out, const char *dir, const char *name) {
    return (size_t)snprintf(out, PATH_MAX, "%s/%s", dir, name) >= PATH_MAX ? -1 : 0;
}

static int fsync_path(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

/* Copies SRC_DIR/NAME to DST_DIR/NAME. Returns 0, or -1 with a message on stderr. */
static int copy_file(const char *src_dir, const char *dst_dir, const char *name) {
    char src[PATH_MAX], dst[PATH_MAX];
    if (join(src, src_dir, name) || join(dst, dst_dir, name)) {
        fprintf(stderr, "quill random-model: path too long for %s\n", name);
        return -1;
    }
    FILE *in = fopen(src, "rb");
    if (!in) {
        fprintf(stderr, "quill random-model: %s: cannot open: %s\n", src, strerror(errno));
        return -1;
    }
    FILE *out = fopen(dst, "wb");
    if (!out) {
        fprintf(stderr, "quill random-model: %s: cannot create: %s\n", dst, strerror(errno));
        fclose(in);
        return -1;
    }
    char buf[1 << 16];
    size_t n;
    int rc = 0;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, n, out) != n) break;
    if (ferror(in)) {
        fprintf(stderr, "quill random-model: %s: read failed\n", src);
        rc = -1;
    }
    if (ferror(out) | fflush(out) | fsync(fileno(out))) {
        fprintf(stderr, "quill random-model: %s: write failed: %s\n", dst, strerror(errno));
        rc = -1;
    }
    fclose(in);
    fclose(out);
    return rc;
}

/* Whether DIR exists as a directory (1), does not exist (0), or is something else / unreadable
 * (-1). *empty tells whether it has no entries. */
static int dir_state(const char *dir, int *empty) {
    struct stat st;
    if (stat(dir, &st)) return errno == ENOENT ? 0 : -1;
    if (!S_ISDIR(st.st_mode)) return -1;
    DIR *d = opendir(dir);
    if (!d) return -1;
    *empty = 1;
    for (struct dirent *e; (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            *empty = 0;
            break;
        }
    closedir(d);
    return 1;
}

int cmd_random_model(int argc, char **argv) {
    const char *preset = NULL, *config = NULL, *tok_dir = NULL, *out_arg = NULL;
    uint64_t seed = 0;
    int have_seed = 0, force = 0, threads = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_val = i + 1 < argc;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--force")) {
            force = 1;
        } else if (!strcmp(a, "--preset") && has_val) {
            preset = argv[++i];
        } else if (!strcmp(a, "--config") && has_val) {
            config = argv[++i];
        } else if (!strcmp(a, "--tokenizer") && has_val) {
            tok_dir = argv[++i];
        } else if ((!strcmp(a, "--seed") || !strcmp(a, "--threads")) && has_val) {
            const char *v = argv[++i];
            char *end;
            errno = 0;
            unsigned long long x = strtoull(v, &end, 0);
            if (errno || end == v || *end || *v == '-' ||
                (!strcmp(a, "--threads") && (x < 1 || x > 1024))) {
                fprintf(stderr, "quill random-model: %s '%s' is not a valid number\n", a, v);
                return 2;
            }
            if (!strcmp(a, "--seed")) {
                seed = x;
                have_seed = 1;
            } else {
                threads = (int)x;
            }
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "quill random-model: unknown option or missing value: %s\n\n", a);
            usage(stderr);
            return 2;
        } else if (!out_arg) {
            out_arg = a;
        } else {
            fprintf(stderr, "quill random-model: more than one OUT_DIR given ('%s', '%s')\n",
                    out_arg, a);
            return 2;
        }
    }
    if (!out_arg || !!preset == !!config) {
        fprintf(stderr, "quill random-model: %s\n\n",
                !out_arg ? "OUT_DIR is missing" : "give exactly one of --preset or --config");
        usage(stderr);
        return 2;
    }

    QErr err = {{0}};
    QwenConfig cfg;
    uint64_t preset_seed = 0;
    if (preset ? rm_preset(preset, &cfg, &preset_seed, &err) : config_load_file(&cfg, config, &err)) {
        fprintf(stderr, "quill random-model: %s\n", err.msg);
        return preset ? 2 : 1;
    }
    if (cfg.quantized) {
        fprintf(stderr, "quill random-model: %s has a quantization_config; random models are "
                        "written in bf16 only\n", config);
        return 1;
    }
    if (!have_seed) seed = preset_seed;

    /* Tokenizer: explicit, or the shipped one when the vocabulary is Qwen3's. */
    char tok_buf[PATH_MAX];
    if (!tok_dir && cfg.vocab_size == 151936) {
        if (assets_tokenizer_dir(tok_buf, sizeof tok_buf, &err)) {
            fprintf(stderr, "quill random-model: %s (or pass --tokenizer DIR)\n", err.msg);
            return 1;
        }
        tok_dir = tok_buf;
    }
    static const char *const tok_files[] = {"tokenizer.json", "tokenizer_config.json"};
    if (tok_dir)
        for (size_t i = 0; i < 2; i++) {
            char p[PATH_MAX];
            if (join(p, tok_dir, tok_files[i]) || access(p, R_OK)) {
                fprintf(stderr, "quill random-model: tokenizer file %s/%s: %s\n", tok_dir,
                        tok_files[i], strerror(errno));
                return 1;
            }
        }

    char out[PATH_MAX];
    size_t olen = strlen(out_arg);
    while (olen > 1 && out_arg[olen - 1] == '/') olen--;
    if (olen + 64 >= sizeof out) {
        fprintf(stderr, "quill random-model: OUT_DIR is too long\n");
        return 2;
    }
    memcpy(out, out_arg, olen);
    out[olen] = '\0';
    int empty = 1, state = dir_state(out, &empty);
    if (state < 0) {
        fprintf(stderr, "quill random-model: %s exists and is not a usable directory\n", out);
        return 1;
    }
    if (state == 1 && !empty && !force) {
        fprintf(stderr, "quill random-model: %s exists and is not empty (use --force to replace "
                        "it)\n", out);
        return 1;
    }

    char tmp[PATH_MAX];
    memcpy(tmp, out, olen);
    memcpy(tmp + olen, ".tmp-XXXXXX", 12);
    if (!mkdtemp(tmp)) {
        fprintf(stderr, "quill random-model: cannot create %s: %s\n", tmp, strerror(errno));
        return 1;
    }
    chmod(tmp, 0755);

    size_t n_specs;
    StSpec *specs = rm_tensor_specs(&cfg, &n_specs, &err);
    uint64_t params = 0;
    for (size_t i = 0; specs && i < n_specs; i++)
        params += (uint64_t)specs[i].shape[0] * (specs[i].ndim > 1 ? specs[i].shape[1] : 1);
    rm_specs_free(specs, n_specs);
    fprintf(stderr, "quill random-model: %s, seed %" PRIu64 ", %.3f B parameters (%.2f GB) -> %s\n",
            preset ? preset : config, seed, params / 1e9, params * 2 / 1e9, out);

    Progress prog = {now_s(), isatty(2)};
    char path[PATH_MAX];
    GenConfig gen;
    rm_gen_config(&gen);
    int rc = join(path, tmp, "model.safetensors")
                 ? qerr_set(&err, "%s: path too long", tmp)
                 : rm_write_safetensors(path, &cfg, seed, threads, on_progress, &prog, &err);
    double t_model = now_s() - prog.t0;
    if (prog.tty) fputc('\n', stderr);
    if (!rc) rc = config_save(&cfg, tmp, &err);
    if (!rc) rc = gen_config_save(&gen, &cfg, tmp, &err);
    if (rc) {
        fprintf(stderr, "quill random-model: %s\n", err.msg);
        goto fail;
    }
    if (tok_dir) {
        for (size_t i = 0; i < 2; i++)
            if (copy_file(tok_dir, tmp, tok_files[i])) goto fail;
        if (!join(path, tok_dir, "NOTICE") && !access(path, F_OK) &&
            copy_file(tok_dir, tmp, "NOTICE"))
            goto fail;
    }
    const char *small[] = {"config.json", "generation_config.json"};
    for (size_t i = 0; i < 2; i++) {
        if (join(path, tmp, small[i]) || fsync_path(path)) {
            fprintf(stderr, "quill random-model: %s: fsync failed: %s\n", path, strerror(errno));
            goto fail;
        }
    }

    /* Into place: a plain rename replaces a missing or empty OUT_DIR; a non-empty one (--force)
     * is swapped atomically and its old contents deleted afterwards. */
    if (state == 1 && !empty) {
        if (renameat2(AT_FDCWD, tmp, AT_FDCWD, out, RENAME_EXCHANGE)) {
            fprintf(stderr, "quill random-model: cannot replace %s: %s\n", out, strerror(errno));
            goto fail;
        }
        if (remove_tree(tmp))
            fprintf(stderr, "quill random-model: warning: could not delete the old contents "
                            "now at %s\n", tmp);
    } else if (rename(tmp, out)) {
        fprintf(stderr, "quill random-model: cannot rename %s to %s: %s\n", tmp, out,
                strerror(errno));
        goto fail;
    }
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", out);
    char *slash = strrchr(parent, '/');
    if (slash == parent) slash[1] = '\0';
    else if (slash) *slash = '\0';
    else snprintf(parent, sizeof parent, ".");
    fsync_path(parent); /* best effort: makes the rename durable */
    fprintf(stderr, "quill random-model: wrote %s in %.2f s (model.safetensors %.2f GB at %.2f GB/s)\n",
            out, now_s() - prog.t0, params * 2 / 1e9, t_model > 0 ? params * 2 / 1e9 / t_model : 0);
    return 0;
fail:
    remove_tree(tmp);
    return 1;
}
