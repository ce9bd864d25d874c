/* cuda_backend.h — the CUDA backend behind the table of backend.h (plain C; no CUDA types).
 *
 * Activations are float32 on the device; bf16 weights stay bf16, int4 weights keep their 4-bit
 * codes (scale and zero packed side by side) and are dequantized in registers by the matmul
 * kernels; the KV cache is bf16. The token embedding table stays in host memory (rows are
 * gathered on the host and uploaded), lm_head lives on the device. Everything runs on one stream
 * of the chosen device, so ops are ordered as issued; decode steps can be captured and replayed
 * as CUDA graphs (graph_begin / graph_end / graph_replay). */
#ifndef QUILL_CUDA_BACKEND_H
#define QUILL_CUDA_BACKEND_H

#include <stdbool.h>

#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* True when a CUDA device is present and the runtime can talk to it (driver loaded, not in an
 * error state). Cheap enough to call once at start-up; never fails loudly. */
bool cuda_backend_available(void);

/* The CUDA backend on `device` (0-based). Returns NULL with err set when the device does not
 * exist, cannot be initialised, or cuBLAS / the stream / the pinned staging buffers cannot be
 * created. The backend's ops must be called from one thread at a time (the engine thread); the
 * device is made current on that thread by every op that launches work. Destroy with
 * be->ops->destroy(be).
 * Kernels are launched with programmatic dependent launch (sm_90) so each overlaps the end of the
 * previous one; the environment variable QUILL_CUDA_PDL=0 turns that off and QUILL_CUDA_PDL=eager
 * keeps it out of CUDA graphs, and QUILL_CUDA_WGMMA=0 keeps the int4 GEMM off its Hopper (wgmma)
 * kernel (for debugging, timing comparisons and tests; each read here, at creation). The KV
 * block size must be a power of two and head_dim 64, 128 or 256 (kv_alloc says so otherwise). */
Backend *cuda_backend_create(int device, QErr *err);

/* Whether the CUDA attention runs a step whose longest sequence has max_q new tokens, of a model
 * with these heads, on its tensor-core kernels, which round q and the softmax weights to bf16 as
 * a bf16 model's attention does (the other kernels keep them float): what a reference that
 * mirrors the kernels' rounding must know. */
bool cuda_attention_tensor_cores(int head_dim, int n_heads, int n_kv_heads, int max_q);

/* The first CUDA error any op of this backend ran into (ops themselves cannot report failure),
 * as "op: message", or NULL while there has been none. The string belongs to the backend. */
const char *cuda_backend_error(Backend *be);

#ifdef __cplusplus
}
#endif

#endif
