/* cmd_random_model.c — `quill random-model`: write a random-weight Qwen3 checkpoint directory.
 *
 * Argument handling and progress output only: the weights come from io/random_model, and the
 * directory is staged by io/ckpt_dir (written beside the target, fsync'd, renamed into place), so
 * an interrupted or failed run never leaves a directory that looks like a valid checkpoint.
 * Tokenizer files are checked before the (possibly 16 GB) model is written, not after. */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/commands.h"
#include "io/assets.h"
#include "io/ckpt_dir.h"
#include "io/config.h"
#include "io/random_model.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: quill random-model [--preset NAME | --config FILE] [--seed N]\n"
            "                          [--tokenizer DIR] [--threads N] [--force] OUT_DIR\n"
            "\n"
            "Writes a random-weight Qwen3 checkpoint, bit-exact to the random-weights spec:\n"
            "model.safetensors, config.json, generation_config.json, and the Qwen3 tokenizer\n"
            "files when the vocabulary is 151936 (or --tokenizer is given).\n"
            "\n"
            "  --preset NAME    one of: %s\n"
            "  --config FILE    a Qwen3 config.json giving the shapes instead (seed 0 by default)\n"
            "  --seed N         model seed (default: the preset's)\n"
            "  --tokenizer DIR  where tokenizer.json and tokenizer_config.json come from\n"
            "                   (default: the shipped assets/tokenizer/qwen3)\n"
            "  --threads N      generator threads (default: two per CPU)\n"
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
            if ((size_t)snprintf(p, sizeof p, "%s/%s", tok_dir, tok_files[i]) >= sizeof p ||
                access(p, R_OK)) {
                fprintf(stderr, "quill random-model: tokenizer file %s/%s: %s\n", tok_dir,
                        tok_files[i], strerror(errno));
                return 1;
            }
        }

    CkptStage st;
    if (ckpt_stage_begin(&st, out_arg, force, &err)) {
        fprintf(stderr, "quill random-model: %s\n", err.msg);
        return 1;
    }

    size_t n_specs;
    StSpec *specs = rm_tensor_specs(&cfg, &n_specs, &err);
    uint64_t params = 0;
    for (size_t i = 0; specs && i < n_specs; i++)
        params += (uint64_t)specs[i].shape[0] * (specs[i].ndim > 1 ? specs[i].shape[1] : 1);
    rm_specs_free(specs, n_specs);
    fprintf(stderr, "quill random-model: %s, seed %" PRIu64 ", %.3f B parameters (%.2f GB) -> %s\n",
            preset ? preset : config, seed, params / 1e9, params * 2 / 1e9, st.out);

    Progress prog = {now_s(), isatty(2)};
    char path[PATH_MAX];
    GenConfig gen;
    rm_gen_config(&gen);
    int rc = ckpt_stage_path(&st, "model.safetensors", path, sizeof path, &err) ||
             rm_write_safetensors(path, &cfg, seed, threads, on_progress, &prog, &err);
    double t_model = now_s() - prog.t0;
    if (prog.tty) fputc('\n', stderr);
    rc = rc || config_save(&cfg, st.tmp, &err) || gen_config_save(&gen, &cfg, st.tmp, &err);
    if (tok_dir)
        rc = rc || ckpt_stage_copy(&st, tok_dir, "tokenizer.json", false, &err) ||
             ckpt_stage_copy(&st, tok_dir, "tokenizer_config.json", false, &err) ||
             ckpt_stage_copy(&st, tok_dir, "NOTICE", true, &err);
    rc = rc || ckpt_stage_commit(&st, &err);
    if (rc) {
        fprintf(stderr, "quill random-model: %s\n", err.msg);
        ckpt_stage_abort(&st);
        return 1;
    }
    fprintf(stderr, "quill random-model: wrote %s in %.2f s (model.safetensors %.2f GB at %.2f GB/s)\n",
            st.out, now_s() - prog.t0, params * 2 / 1e9, t_model > 0 ? params * 2 / 1e9 / t_model : 0);
    return 0;
}
