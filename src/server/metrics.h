/* metrics.h — the server's Prometheus metrics (GET /metrics): HTTP requests by status code,
 * finished engine requests by finish reason, prompt and generated tokens, and latency histograms
 * (time to first token, inter-token latency, end-to-end), plus gauges read from the engine at
 * render time (running and waiting sequences, KV-cache usage) and the number of HTTP requests the
 * server still holds state for. Names follow vLLM's (`vllm:` becomes `quill:`), so dashboards
 * built for one read the other.
 *
 * Every function is thread-safe (one mutex) and cheap enough to call from the engine callback. */
#ifndef QUILL_SERVER_METRICS_H
#define QUILL_SERVER_METRICS_H

#include "engine/engine.h"

typedef struct Metrics Metrics;

/* A new, zeroed set; NULL on out of memory. model_name labels every series (copied). */
Metrics *metrics_new(const char *model_name);
void metrics_free(Metrics *m); /* NULL is allowed */

/* One HTTP response sent with this status code. */
void metrics_http_status(Metrics *m, int status);
/* One engine request finished: its reason ("stop", "length", "abort"), prompt length and the
 * number of tokens it generated. */
void metrics_request_done(Metrics *m, const char *finish_reason, int prompt_tokens, int generated_tokens);
/* Latency observations, in seconds. */
void metrics_ttft(Metrics *m, double seconds);
void metrics_itl(Metrics *m, double seconds);
void metrics_e2e(Metrics *m, double seconds);
/* HTTP requests holding generation state (+1 when one starts, -1 when its state is freed). */
void metrics_active_add(Metrics *m, int delta);
int metrics_active(Metrics *m);

/* The Prometheus text exposition (format 0.0.4) of everything, with the engine's gauges from st.
 * Returns a malloc'd string the caller frees (never NULL; out of memory aborts, as StrBuf). */
char *metrics_render(Metrics *m, const EngineStats *st);

#endif
