/* cmd_chat.c — `quill chat`: an interactive multi-turn conversation on the terminal. The whole
 * history is re-rendered with the chat template every turn (the template drops earlier turns'
 * reasoning), and the answer streams with its thinking dimmed. */
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
            "usage: quill chat MODEL_DIR [options]\n"
            "  -s, --system TEXT      system prompt\n"
            "  --no-think             disable Qwen3's thinking\n"
            "  -n, --max-tokens N     tokens per answer at most (default 2048)\n"
            "  sampling flags, --json-object, --json-schema, --choice as in `quill run --help`;\n"
            "  --device, --threads, --kv-cache-dtype, --speculative-config\n"
            "Type a message and press Enter. /reset clears the history, /exit (or Ctrl-D) quits.\n");
}

int cmd_chat(int argc, char **argv) {
    const char *dir = NULL, *system_prompt = NULL;
    bool think = true, sampling_set = false;
    RuntimeArgs ra = {.need_tokenizer = true};
    GenRequest g = {.max_tokens = 2048, .stream = true};
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
        } else if ((!strcmp(a, "-s") || !strcmp(a, "--system")) && v) {
            system_prompt = argv[++i];
        } else if (!strcmp(a, "--no-think")) {
            think = false;
        } else if (!strcmp(a, "-n") || !strcmp(a, "--max-tokens")) {
            if (parse_int(a, v, 1, 1 << 30, &g.max_tokens, &err)) goto bad;
            i++;
        } else if (a[0] != '-' && !dir) {
            dir = a;
        } else {
            fprintf(stderr, "quill chat: unexpected argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!dir) {
        usage(stderr);
        return 2;
    }
    Runtime rt;
    if (runtime_open(&rt, dir, &ra, &err)) {
        fprintf(stderr, "quill chat: %s\n", err.msg);
        return 1;
    }
    g.sampling = sampling_set ? sp : sampling_from_gen_config(&rt.model->gen);
    g.thinking = think;
    g.color = isatty(STDOUT_FILENO);
    bool tty = isatty(STDIN_FILENO);
    json_t *history = json_array();
    if (system_prompt) json_array_append_new(history, json_pack("{s:s, s:s}", "role", "system", "content", system_prompt));
    char *line = NULL;
    size_t cap = 0;
    int rc = 0;
    for (;;) {
        if (tty) fputs("\n> ", stdout), fflush(stdout);
        ssize_t n = getline(&line, &cap, stdin);
        if (n < 0) break;
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
        if (!n) continue;
        if (!strcmp(line, "/exit") || !strcmp(line, "/quit")) break;
        if (!strcmp(line, "/reset")) {
            json_array_clear(history);
            if (system_prompt)
                json_array_append_new(history, json_pack("{s:s, s:s}", "role", "system", "content", system_prompt));
            continue;
        }
        json_array_append_new(history, json_pack("{s:s, s:s}", "role", "user", "content", line));
        char *prompt = chat_template_render(history, NULL, true, think, &err);
        int32_t *ids = NULL;
        size_t n_ids = 0;
        GenResult res;
        if (!prompt || tok_encode(rt.tok, prompt, strlen(prompt), &ids, &n_ids, &err) ||
            generate(&rt, ids, (int)n_ids, &g, &res, &err)) {
            fprintf(stderr, "quill chat: %s\n", err.msg);
            free(prompt);
            free(ids);
            json_array_remove(history, json_array_size(history) - 1);
            rc = 1;
            continue;
        }
        json_array_append_new(history, json_pack("{s:s, s:s, s:s}", "role", "assistant", "content", res.content,
                                                 "reasoning_content", res.reasoning));
        gen_result_free(&res);
        free(prompt);
        free(ids);
    }
    free(line);
    json_decref(history);
    runtime_close(&rt);
    return rc;
bad:
    fprintf(stderr, "quill chat: %s\n", err.msg);
    return 2;
}
