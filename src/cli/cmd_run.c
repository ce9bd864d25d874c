/* cmd_run.c — `quill run`: one prompt, one generation, streamed to the terminal (thinking dimmed,
 * answer plain) or reported as one JSON object with --json. It drives the same engine as the
 * server, with a single request; `quill chat` (cmd_chat.c) reuses the generation part. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "cli/generate.h"
#include "text/chat_template.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: quill run MODEL_DIR (-p PROMPT | --ids 1,2,3) [options]\n"
            "  -p, --prompt TEXT      user message (chat-formatted unless --raw)\n"
            "  --ids LIST             prompt as comma-separated token ids (no template)\n"
            "  --raw                  use PROMPT as-is, without the chat template\n"
            "  --no-think             disable Qwen3's thinking (enable_thinking=false)\n"
            "  -n, --max-tokens N     tokens to generate at most (default 256)\n"
            "  --ignore-eos           keep generating past end-of-sequence tokens\n"
            "  --greedy | --temperature T --top-k K --top-p P --min-p P\n"
            "  --repetition-penalty R --presence-penalty P --frequency-penalty F --seed S\n"
            "  --logit-bias ID=BIAS   add BIAS in [-100, 100] to token ID's logit (repeatable)\n"
            "                         sampling (defaults from generation_config.json)\n"
            "  --json-object          hold the answer to a JSON object (after the reasoning)\n"
            "  --json-schema FILE     hold the answer to a JSON value valid under the schema in FILE\n"
            "  --choice TEXT          hold the answer to one of the --choice texts (repeatable)\n"
            "  --json                 print one JSON object instead of streaming text\n"
            "  --device cpu|cuda      where to run (default: cuda if available)\n"
            "  -t, --threads N        CPU threads (default: all cores)\n"
            "  --kv-cache-dtype auto|fp8|fp8_e4m3  what the KV cache stores: auto, the device's own\n"
            "                         type (float32 on the CPU, bf16 on a GPU), or float8 e4m3 (fp8)\n"
            "  --speculative-config JSON  speculative decoding by n-gram lookup, as vLLM's:\n"
            "                         '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'\n"
            "                         (prompt_lookup_max 4, prompt_lookup_min 2 by default)\n");
}

static int parse_ids(const char *s, int32_t **out, int *n, QErr *err) {
    int cap = 16, k = 0;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    const char *p = s;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 0x7fffffff || (*end && *end != ',')) {
            free(ids);
            return qerr_set(err, "--ids must be comma-separated non-negative integers (bad at '%s')", p);
        }
        if (k == cap) ids = realloc(ids, (size_t)(cap *= 2) * sizeof *ids);
        ids[k++] = (int32_t)v;
        p = *end ? end + 1 : end;
    }
    if (!k) {
        free(ids);
        return qerr_set(err, "--ids is empty");
    }
    *out = ids;
    *n = k;
    return 0;
}

/* Renders one user message with the chat template. */
static char *chat_prompt(const char *user, bool think, QErr *err) {
    json_t *msgs = json_pack("[{s:s, s:s}]", "role", "user", "content", user);
    char *s = chat_template_render(msgs, NULL, true, think, err);
    json_decref(msgs);
    return s;
}

int cmd_run(int argc, char **argv) {
    const char *dir = NULL, *prompt = NULL, *ids_arg = NULL;
    bool raw = false, think = true, json_out = false;
    RuntimeArgs ra = {0};
    GenRequest g = {.max_tokens = 256};
    bool sampling_set = false;
    SamplingParams sp = sampling_greedy();
    QErr err;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int r = parse_generation_flag(argc, argv, &i, &sp, &sampling_set, &ra, &err);
        if (r == 0) r = parse_format_flag(argc, argv, &i, &g.format, &err);
        if (r < 0) goto bad;
        if (r > 0) continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            if (!v) goto missing;
            prompt = argv[++i];
        } else if (!strcmp(a, "--ids")) {
            if (!v) goto missing;
            ids_arg = argv[++i];
        } else if (!strcmp(a, "--raw")) {
            raw = true;
        } else if (!strcmp(a, "--no-think")) {
            think = false;
        } else if (!strcmp(a, "--json")) {
            json_out = true;
        } else if (!strcmp(a, "--ignore-eos")) {
            g.ignore_eos = true;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--max-tokens")) {
            if (parse_int(a, v, 1, 1 << 30, &g.max_tokens, &err)) goto bad;
            i++;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "quill run: unknown option '%s'\n", a);
            usage(stderr);
            return 2;
        } else if (!dir) {
            dir = a;
        } else {
            fprintf(stderr, "quill run: unexpected argument '%s'\n", a);
            return 2;
        }
        continue;
    missing:
        fprintf(stderr, "quill run: %s needs a value\n", a);
        return 2;
    }
    if (!dir || (!prompt == !ids_arg)) {
        fprintf(stderr, "quill run: give MODEL_DIR and exactly one of -p PROMPT or --ids LIST\n");
        usage(stderr);
        return 2;
    }

    Runtime rt;
    ra.need_tokenizer = ids_arg == NULL;
    int32_t *ids = NULL;
    int n_ids = 0;
    if (ids_arg && parse_ids(ids_arg, &ids, &n_ids, &err)) goto bad;
    if (runtime_open(&rt, dir, &ra, &err)) {
        free(ids);
        fprintf(stderr, "quill run: %s\n", err.msg);
        return 1;
    }
    int rc = 1;
    if (!ids) {
        char *text = raw ? strdup(prompt) : chat_prompt(prompt, think, &err);
        size_t n = 0;
        int e = !text || tok_encode(rt.tok, text, strlen(text), &ids, &n, &err);
        free(text);
        if (e) goto out;
        n_ids = (int)n;
    }
    g.sampling = sampling_set ? sp : sampling_from_gen_config(&rt.model->gen);
    g.thinking = think && !raw && !ids_arg;
    g.stream = !json_out;
    g.color = g.stream && isatty(STDOUT_FILENO);
    GenResult res;
    if (generate(&rt, ids, n_ids, &g, &res, &err)) goto out;
    if (json_out) {
        json_t *o = json_object();
        json_t *pa = json_array(), *oa = json_array();
        for (int i = 0; i < n_ids; i++) json_array_append_new(pa, json_integer(ids[i]));
        for (int i = 0; i < res.n_ids; i++) json_array_append_new(oa, json_integer(res.ids[i]));
        json_object_set_new(o, "prompt_ids", pa);
        json_object_set_new(o, "ids", oa);
        json_object_set_new(o, "reasoning", json_string(res.reasoning ? res.reasoning : ""));
        json_object_set_new(o, "content", json_string(res.content ? res.content : ""));
        json_object_set_new(o, "finish_reason", json_string(finish_reason_name(res.finish)));
        json_object_set_new(o, "prompt_tokens_per_s", json_real(res.prompt_tps));
        json_object_set_new(o, "tokens_per_s", json_real(res.gen_tps));
        json_object_set_new(o, "peak_rss_bytes", json_integer((json_int_t)peak_rss_bytes()));
        spec_stats_json(&rt, o);
        char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
        puts(s);
        free(s);
        json_decref(o);
    }
    gen_result_free(&res);
    rc = 0;
out:
    if (rc) fprintf(stderr, "quill run: %s\n", err.msg);
    free(ids);
    runtime_close(&rt);
    return rc;
bad:
    fprintf(stderr, "quill run: %s\n", err.msg);
    return 2;
}
