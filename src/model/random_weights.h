/* random_weights.h — a whole model built in memory from the random-weight spec, with no files:
 * what `quill bench latency --random-weights PRESET --dtype int4|bf16` runs on (vLLM's
 * `--load-format dummy`). The bf16 tensors are bit-identical to `quill random-model`'s; int4
 * linears are those tensors quantized with min-max (fast; HQQ would only change the values). */
#ifndef QUILL_RANDOM_WEIGHTS_H
#define QUILL_RANDOM_WEIGHTS_H

#include <stdbool.h>

#include "io/config.h"
#include "io/safetensors.h"

/* Fills *cfg and *gen for PRESET and returns its checkpoint in memory (caller closes it, or hands
 * it to model_create). int4: every *_proj.weight becomes qweight/scales/zeros, group 128.
 * Returns NULL with err set (unknown preset, out of memory). */
StModel *random_weights_build(const char *preset, bool int4, QwenConfig *cfg, GenConfig *gen, QErr *err);

#endif
