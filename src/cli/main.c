/* main.c — the `quill` binary: dispatch to a subcommand. Everything else lives in the library so
 * tests can link it; this file only picks the command. */
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"

static int cmd_version(int argc, char **argv) {
    (void)argc;
    (void)argv;
    printf("quill 0.1.0\n");
    return 0;
}

typedef struct Command {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
} Command;

static const Command COMMANDS[] = {
    {"run", cmd_run, "generate from one prompt (streams thinking and answer; --json)"},
    {"chat", cmd_chat, "interactive multi-turn chat"},
    {"serve", cmd_serve, "OpenAI-compatible HTTP server (vLLM's serve)"},
    {"bench", cmd_bench, "benchmarks: latency (vllm bench latency), serve (vllm bench serve)"},
    {"eval", cmd_eval, "quality: perplexity, compare (KL divergence, top-1 agreement)"},
    {"version", cmd_version, "print the version"},
    {"tokenize", cmd_tokenize, "print the token ids of a text as a JSON array"},
    {"detokenize", cmd_detokenize, "print the text of token ids"},
    {"random-model", cmd_random_model, "write a random-weight Qwen3 checkpoint"},
    {"chat-template", cmd_chat_template, "render messages (JSON on stdin) with Qwen3's chat template"},
    {"quantize", cmd_quantize, "quantize a checkpoint to int4 (HQQ or minmax, group 128)"},
};

static void usage(FILE *f) {
    fprintf(f, "usage: quill COMMAND [ARGS...]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
        fprintf(f, "  %-14s %s\n", COMMANDS[i].name, COMMANDS[i].help);
    fprintf(f, "\n`quill COMMAND --help` describes each.\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
        if (!strcmp(argv[1], COMMANDS[i].name)) return COMMANDS[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "quill: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
