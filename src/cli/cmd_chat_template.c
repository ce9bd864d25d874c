/* cmd_chat_template.c — `quill chat-template`: print the prompt Qwen3's chat template makes of a
 * conversation, to inspect what the model will see (and to test the template from outside).
 *
 * The conversation comes on stdin so that long or generated conversations need no quoting; it
 * is either a messages array or a request-like object with "messages" and "tools" (other keys,
 * such as "model", are ignored so an OpenAI request body can be piped in as is). MODEL_DIR is
 * only checked to exist: the template is built in, so it serves symmetry with the other
 * commands, not input. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/commands.h"
#include "text/chat_template.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: quill chat-template MODEL_DIR [--no-think] [--no-generation-prompt] [--tools FILE]\n"
            "                           < messages.json\n"
            "\n"
            "Prints the prompt Qwen3's chat template renders from the conversation on stdin: a JSON\n"
            "array of OpenAI-style messages, or an object {\"messages\": [...], \"tools\": [...]}.\n"
            "\n"
            "  --no-think               enable_thinking=false (adds the empty think block)\n"
            "  --no-generation-prompt   do not open an assistant turn at the end\n"
            "  --tools FILE             a JSON array of tool definitions\n");
}

static json_t *load_tools_file(const char *path) {
    json_error_t jerr;
    json_t *t = json_load_file(path, JSON_PRESERVE_ORDER, &jerr);
    if (!t) {
        fprintf(stderr, "quill chat-template: %s: line %d, column %d: %s\n", path, jerr.line, jerr.column, jerr.text);
        return NULL;
    }
    if (!json_is_array(t)) {
        fprintf(stderr, "quill chat-template: %s: expected a JSON array of tools\n", path);
        json_decref(t);
        return NULL;
    }
    return t;
}

int cmd_chat_template(int argc, char **argv) {
    const char *model_dir = NULL, *tools_path = NULL;
    bool think = true, gen = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--no-think")) {
            think = false;
        } else if (!strcmp(a, "--no-generation-prompt")) {
            gen = false;
        } else if (!strcmp(a, "--tools") && i + 1 < argc) {
            tools_path = argv[++i];
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "quill chat-template: unknown option or missing value: %s\n\n", a);
            usage(stderr);
            return 2;
        } else if (model_dir) {
            fprintf(stderr, "quill chat-template: more than one MODEL_DIR given ('%s', '%s')\n\n", model_dir, a);
            usage(stderr);
            return 2;
        } else {
            model_dir = a;
        }
    }
    if (!model_dir) {
        fprintf(stderr, "quill chat-template: MODEL_DIR is required\n\n");
        usage(stderr);
        return 2;
    }
    struct stat st;
    if (stat(model_dir, &st) != 0) {
        fprintf(stderr, "quill chat-template: %s: %s\n", model_dir, strerror(errno));
        return 1;
    }
    if (!S_ISDIR(st.st_mode)) {
        fprintf(stderr, "quill chat-template: %s: not a directory\n", model_dir);
        return 1;
    }

    json_error_t jerr;
    json_t *in = json_loadf(stdin, JSON_PRESERVE_ORDER, &jerr);
    if (!in) {
        fprintf(stderr, "quill chat-template: stdin: line %d, column %d: %s\n", jerr.line, jerr.column, jerr.text);
        return 1;
    }
    int rc = 1;
    json_t *file_tools = NULL;
    const json_t *messages = in, *tools = NULL;
    if (json_is_object(in)) {
        messages = json_object_get(in, "messages");
        tools = json_object_get(in, "tools");
        if (!messages) {
            fprintf(stderr, "quill chat-template: stdin: the object has no \"messages\" key\n");
            goto done;
        }
    }
    if (tools_path) {
        if (tools && !json_is_null(tools)) {
            fprintf(stderr, "quill chat-template: tools given twice (stdin's \"tools\" and --tools %s)\n", tools_path);
            goto done;
        }
        if (!(file_tools = load_tools_file(tools_path))) goto done;
        tools = file_tools;
    }
    QErr err = {{0}};
    char *prompt = chat_template_render(messages, tools, gen, think, &err);
    if (!prompt) {
        fprintf(stderr, "quill chat-template: %s\n", err.msg);
        goto done;
    }
    fputs(prompt, stdout);
    free(prompt);
    if (fflush(stdout) != 0) {
        fprintf(stderr, "quill chat-template: writing stdout: %s\n", strerror(errno));
        goto done;
    }
    rc = 0;
done:
    json_decref(file_tools);
    json_decref(in);
    return rc;
}
