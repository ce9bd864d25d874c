/* assets.h — finding the files quill ships beside its binary (assets/, e.g. the Qwen3 tokenizer).
 *
 * The binary has no compiled-in install prefix, so it looks where a build or an install puts
 * them: $QUILL_ASSETS first (an explicit override), then <dir of the executable>/../assets and
 * <dir of the executable>/assets. */
#ifndef QUILL_ASSETS_H
#define QUILL_ASSETS_H

#include <stddef.h>

#include "util/qerr.h"

/* Finds the directory REL (e.g. "tokenizer/qwen3") under the first assets folder that has it and
 * writes its path into out (n bytes). Returns 0, or -1 with err listing the places tried. */
int assets_find(const char *rel, char *out, size_t n, QErr *err);

/* assets_find("tokenizer/qwen3", ...): the shipped Qwen3 tokenizer.json + tokenizer_config.json. */
int assets_tokenizer_dir(char *out, size_t n, QErr *err);

#endif
