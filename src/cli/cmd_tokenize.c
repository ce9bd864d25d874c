/* cmd_tokenize.c — `quill tokenize` and `quill detokenize`: the tokenizer from the shell.
 *
 * They exist to check quill's ids against other tools and to time the tokenizer (`--bench`), so
 * the output is plain and exact: tokenize prints one JSON array, detokenize prints the text with
 * nothing added. Text comes from the argument or, without one, from stdin byte for byte. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "text/tokenizer.h"

static void tokenize_usage(FILE *f) {
    fprintf(f,
            "usage: quill tokenize MODEL_DIR [TEXT] [--bench N]\n"
            "  Prints the token ids of TEXT (or of stdin) as a JSON array, as Hugging Face\n"
            "  tokenizers' encode(text, add_special_tokens=False) gives them. MODEL_DIR holds\n"
            "  tokenizer.json (or is the path of the file itself).\n"
            "  --bench N  encode N times and print a JSON object with the load time and the\n"
            "             fastest encode (seconds, MB/s, tokens/s) instead of the ids\n");
}

int cmd_tokenize(int argc, char **argv) {
    const char *dir = NULL, *text = NULL;
    long bench = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            tokenize_usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--bench")) {
            char *end;
            if (i + 1 >= argc || (bench = strtol(argv[i + 1], &end, 10)) < 1 || *end) {
                fprintf(stderr, "quill tokenize: --bench needs a positive count\n");
                return 2;
            }
            i++;
        } else if (!dir) {
            dir = argv[i];
        } else if (!text) {
            text = argv[i];
        } else {
            tokenize_usage(stderr);
            return 2;
        }
    }
    if (!dir) {
        tokenize_usage(stderr);
        return 2;
    }
    QErr err;
    double t0 = now_seconds();
    Tok *tok = tok_load(dir, &err);
    double load_s = now_seconds() - t0;
    if (!tok) {
        fprintf(stderr, "quill tokenize: %s\n", err.msg);
        return 1;
    }
    char *input = NULL;
    size_t len;
    if (text) {
        len = strlen(text);
    } else {
        input = read_stream(stdin, &len);
        if (!input) {
            fprintf(stderr, "quill tokenize: cannot read stdin: %s\n", strerror(errno));
            tok_free(tok);
            return 1;
        }
        text = input;
    }
    int rc = 0;
    int32_t *ids = NULL;
    size_t n = 0;
    double best = 0;
    for (long r = 0; r < (bench ? bench : 1); r++) {
        free(ids);
        ids = NULL;
        t0 = now_seconds();
        if (tok_encode(tok, text, len, &ids, &n, &err)) {
            fprintf(stderr, "quill tokenize: %s\n", err.msg);
            rc = 1;
            break;
        }
        double dt = now_seconds() - t0;
        if (r == 0 || dt < best) best = dt;
    }
    if (!rc && bench) {
        printf("{\"bytes\": %zu, \"tokens\": %zu, \"runs\": %ld, \"load_s\": %.6f, \"encode_s\": %.6f, "
               "\"mb_per_s\": %.3f, \"tokens_per_s\": %.1f}\n",
               len, n, bench, load_s, best, best > 0 ? (double)len / best / 1e6 : 0.0,
               best > 0 ? (double)n / best : 0.0);
    } else if (!rc) {
        fputc('[', stdout);
        for (size_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
        fputs("]\n", stdout);
    }
    free(ids);
    free(input);
    tok_free(tok);
    return rc;
}

static void detokenize_usage(FILE *f) {
    fprintf(f,
            "usage: quill detokenize MODEL_DIR [--skip-special] [ID...]\n"
            "  Prints the text of the token ids, exactly (no newline is added). Without ID\n"
            "  arguments the ids are read from stdin, as a JSON array or separated by spaces.\n"
            "  --skip-special  leave out special tokens such as <|im_end|>\n");
}

/* Parses one id; returns 0, or -1 after printing an error naming it. */
static int parse_id(const char *s, size_t n, int32_t *out) {
    char buf[32];
    if (n == 0 || n >= sizeof buf) goto bad;
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *end;
    errno = 0;
    long v = strtol(buf, &end, 10);
    if (*end || errno || v < INT32_MIN || v > INT32_MAX) goto bad;
    *out = (int32_t)v;
    return 0;
bad:
    fprintf(stderr, "quill detokenize: invalid token id '%.*s'\n", (int)(n > 40 ? 40 : n), s);
    return -1;
}

int cmd_detokenize(int argc, char **argv) {
    const char *dir = NULL;
    int skip = 0;
    int32_t *ids = malloc(((size_t)argc + 1) * sizeof *ids);
    size_t n = 0, cap = (size_t)argc + 1;
    int from_args = 0, rc = 0;
    char *input = NULL;
    Tok *tok = NULL;
    if (!ids) return 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            detokenize_usage(stdout);
            goto out;
        } else if (!strcmp(argv[i], "--skip-special")) {
            skip = 1;
        } else if (!dir) {
            dir = argv[i];
        } else {
            from_args = 1;
            if (parse_id(argv[i], strlen(argv[i]), &ids[n++])) {
                rc = 1;
                goto out;
            }
        }
    }
    if (!dir) {
        detokenize_usage(stderr);
        rc = 2;
        goto out;
    }
    QErr err;
    tok = tok_load(dir, &err);
    if (!tok) {
        fprintf(stderr, "quill detokenize: %s\n", err.msg);
        rc = 1;
        goto out;
    }
    if (!from_args) {
        size_t len;
        input = read_stream(stdin, &len);
        if (!input) {
            fprintf(stderr, "quill detokenize: cannot read stdin: %s\n", strerror(errno));
            rc = 1;
            goto out;
        }
        for (size_t i = 0; i < len;) {
            if (strchr(" \t\r\n,[]", input[i])) {
                i++;
                continue;
            }
            size_t j = i;
            while (j < len && !strchr(" \t\r\n,[]", input[j])) j++;
            if (n == cap) {
                int32_t *p = realloc(ids, (cap *= 2) * sizeof *p);
                if (!p) {
                    rc = 1;
                    goto out;
                }
                ids = p;
            }
            if (parse_id(input + i, j - i, &ids[n++])) {
                rc = 1;
                goto out;
            }
            i = j;
        }
    }
    size_t len;
    char *s = tok_decode(tok, ids, n, skip, &len, &err);
    if (!s) {
        fprintf(stderr, "quill detokenize: %s\n", err.msg);
        rc = 1;
        goto out;
    }
    fwrite(s, 1, len, stdout);
    free(s);
out:
    free(ids);
    free(input);
    tok_free(tok);
    return rc;
}
