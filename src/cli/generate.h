/* generate.h — one generation on the engine for the terminal commands (run, chat): streams the
 * decoded text as it comes (reasoning dimmed on a terminal), and reports ids, the split of
 * reasoning and answer, the finish reason and speed (also printed to stderr, as llama.cpp does). */
#ifndef QUILL_GENERATE_H
#define QUILL_GENERATE_H

#include <stdbool.h>

#include "cli/cli_common.h"

typedef struct GenRequest {
    SamplingParams sampling;
    int max_tokens;
    bool ignore_eos;
    bool thinking;  /* the output starts in reasoning mode (chat prompt, thinking enabled) */
    bool stream;    /* print text to stdout as it is generated */
    bool color;     /* dim the reasoning (ANSI) */
    OutputFormat format; /* structured output (after the reasoning when thinking) */
} GenRequest;

/* --json-object, --json-schema FILE (compiled here: err names a bad file or an unsupported
 * keyword) or --choice TEXT (repeatable, at most 64) into f: 1 consumed, 0 none of them, -1 with
 * err. The choices point into argv, listed in static storage, and the schema is held there too
 * (one command line's). */
int parse_format_flag(int argc, char **argv, int *i, OutputFormat *f, QErr *err);

typedef struct GenResult {
    int32_t *ids;
    int n_ids;
    char *reasoning;   /* malloc'd, "" when none */
    char *content;     /* malloc'd, "" when none */
    FinishReason finish;
    double prompt_tps, gen_tps;
} GenResult;

/* Runs the request to completion. Returns 0, or -1 with err set (bad parameters). Text needs
 * rt->tok; without a tokenizer only ids are produced. */
int generate(Runtime *rt, const int32_t *prompt, int n_prompt, const GenRequest *g, GenResult *res, QErr *err);
void gen_result_free(GenResult *res);

#endif
