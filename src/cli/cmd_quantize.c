/* cmd_quantize.c — `quill quantize SRC_DIR DST_DIR`: argument parsing, a progress bar and a
 * summary around quantize_checkpoint(), which does the work. The bar is drawn only when stderr
 * is a terminal (logs get the summary lines alone). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "quant/quantize.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: quill quantize SRC_DIR DST_DIR [--group-size N] [--algorithm hqq|minmax]\n"
            "                      [--quantize-lm-head] [--threads N] [--max-shard-size SIZE]\n"
            "                      [--force]\n"
            "\n"
            "Writes an int4 weight-only copy of the bf16 Qwen3 checkpoint SRC_DIR to DST_DIR\n"
            "(format: ../shared/spec/int4-checkpoint.md): every *_proj.weight becomes\n"
            "NAME.qweight (4-bit codes) + NAME.scales + NAME.zeros (bf16, one per group).\n"
            "\n"
            "  --group-size N    input columns per scale/zero: 32, 64, 128 (default) or 256\n"
            "  --algorithm A     hqq (default: torchao's HQQ, float32) or minmax (torchao's\n"
            "                    plain tinygemm scale and zero)\n"
            "  --quantize-lm-head  quantize lm_head.weight too (kept in bf16 by default)\n"
            "  --threads N       worker threads (default: one per CPU)\n"
            "  --max-shard-size SIZE  split model.safetensors into files of at most SIZE bytes\n"
            "                    of tensors (suffix KB, MB or GB, decimal; default 5GB), with\n"
            "                    model.safetensors.index.json\n"
            "  --force           replace DST_DIR if it exists and is not empty\n");
}

/* "5GB", "200MB", "4096": a positive size in bytes (decimal suffixes, as Hugging Face writes
 * max_shard_size). */
static int parse_size(const char *s, uint64_t *out, QErr *err) {
    if (!s) return qerr_set(err, "--max-shard-size needs a value");
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    uint64_t mult = 1;
    if (!strcasecmp(end, "KB"))
        mult = 1000;
    else if (!strcasecmp(end, "MB"))
        mult = 1000 * 1000;
    else if (!strcasecmp(end, "GB"))
        mult = 1000 * 1000 * 1000;
    else if (*end && strcasecmp(end, "B"))
        mult = 0;
    if (errno || end == s || *s == '-' || !mult || v == 0 || v > UINT64_MAX / mult)
        return qerr_set(err, "--max-shard-size must be a positive size like 5GB (got '%s')", s);
    *out = v * mult;
    return 0;
}

typedef struct Bar {
    double t0;
    int tty;
} Bar;

static void fmt_duration(char *out, size_t n, double s) {
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(out, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else
        snprintf(out, n, "%ld:%02ld", t / 60, t % 60);
}

static void on_progress(void *ctx, const QuantizeProgress *p) {
    const Bar *b = ctx;
    if (!b->tty) return;
    double frac = p->weights_total ? (double)p->weights_done / (double)p->weights_total : 1.0;
    double el = now_seconds() - b->t0;
    char eta[32] = "--:--", bar[31];
    if (frac > 0.0 && frac < 1.0) fmt_duration(eta, sizeof eta, el * (1.0 - frac) / frac);
    if (frac >= 1.0) fmt_duration(eta, sizeof eta, 0.0);
    int fill = (int)(frac * 30.0 + 0.5);
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = '\0';
    fprintf(stderr, "\r[%s] %3.0f%%  %d/%d tensors  ETA %s ", bar, 100.0 * frac,
            p->tensors_done, p->tensors_total, eta);
    fflush(stderr);
}

int cmd_quantize(int argc, char **argv) {
    QuantizeOptions opt;
    quantize_options_default(&opt);
    const char *src = NULL, *dst = NULL;
    QErr err = {{0}};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int rc = 0;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--force")) {
            opt.force = true;
        } else if (!strcmp(a, "--quantize-lm-head")) {
            opt.quantize_lm_head = true;
        } else if (!strcmp(a, "--group-size")) {
            rc = parse_int(a, v, 1, 1 << 20, &opt.group_size, &err);
            i++;
        } else if (!strcmp(a, "--threads")) {
            rc = parse_int(a, v, 1, 4096, &opt.n_threads, &err);
            i++;
        } else if (!strcmp(a, "--max-shard-size")) {
            rc = parse_size(v, &opt.max_shard_bytes, &err);
            i++;
        } else if (!strcmp(a, "--algorithm")) {
            rc = v ? q4_algorithm_from_name(v, &opt.algorithm, &err)
                   : qerr_set(&err, "--algorithm needs a value");
            i++;
        } else if (a[0] == '-' && a[1]) {
            rc = qerr_set(&err, "unknown option %s", a);
        } else if (!src) {
            src = a;
        } else if (!dst) {
            dst = a;
        } else {
            rc = qerr_set(&err, "unexpected argument '%s' (SRC_DIR and DST_DIR already given)", a);
        }
        if (rc) {
            fprintf(stderr, "quill quantize: %s\n\n", err.msg);
            usage(stderr);
            return 2;
        }
    }
    if (!src || !dst) {
        fprintf(stderr, "quill quantize: %s is missing\n\n", !src ? "SRC_DIR" : "DST_DIR");
        usage(stderr);
        return 2;
    }
    if (q4_check_shape(1, opt.group_size, opt.group_size, &err)) {
        fprintf(stderr, "quill quantize: --group-size: %s\n", err.msg);
        return 2;
    }

    Bar bar = {now_seconds(), isatty(2)};
    opt.progress = on_progress;
    opt.progress_ctx = &bar;
    fprintf(stderr, "quill quantize: %s -> %s (%s, group %d)\n", src, dst,
            q4_algorithm_name(opt.algorithm), opt.group_size);
    QuantizeReport rep;
    int rc = quantize_checkpoint(src, dst, &opt, &rep, &err);
    if (bar.tty) fputc('\n', stderr);
    if (rc) {
        fprintf(stderr, "quill quantize: %s\n", err.msg);
        return 1;
    }
    double el = now_seconds() - bar.t0;
    fprintf(stderr,
            "quill quantize: %d matrices, %.3f G weights in %.1f s (%.1f M weights/s), peak RSS "
            "%.0f MB\n"
            "quill quantize: relative error %.5f mean, %.5f max (%s)\n"
            "quill quantize: wrote %s (%.2f GB of tensors in %d file%s)\n",
            rep.n_quantized, rep.n_weights / 1e9, el, el > 0 ? rep.n_weights / el / 1e6 : 0.0,
            peak_rss_bytes() / 1e6, rep.mean_rel_err, rep.max_rel_err, rep.worst, dst,
            rep.bytes_written / 1e9, rep.n_shards, rep.n_shards == 1 ? "" : "s");
    return 0;
}
