/* server.h — quill's OpenAI-compatible HTTP server (libmicrohttpd) over one engine.
 *
 * Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming or not), GET /v1/models,
 * POST /tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus). With an API key, every
 * /v1/ route and /tokenize, /detokenize need "Authorization: Bearer KEY"; /health and /metrics
 * stay open, as in vLLM. Errors are {"error": {...}} with 400, 401,
 * 404, 405, 413 or 500, and never stop the server. A client that disconnects has its engine
 * requests aborted at once (their KV blocks are freed at the engine's next step). */
#ifndef QUILL_SERVER_H
#define QUILL_SERVER_H

#include <stddef.h>
#include <stdio.h>

#include "engine/engine.h"
#include "text/tokenizer.h"

typedef struct ServerOptions {
    const char *host;          /* address or name to bind ("127.0.0.1", "0.0.0.0", "::1", ...) */
    int port;                  /* 0: any free port (see server_port) */
    const char *api_key;       /* NULL: no authentication */
    const char *model_name;    /* the served model name (requests naming another get 404) */
    const char *model_root;    /* MODEL_DIR, shown by /v1/models */
    int max_model_len;         /* the engine's limit (prompt + max_tokens) */
    size_t max_body_bytes;     /* larger bodies get 413; 0: 16 MiB */
    FILE *log;                 /* one line per request, and HTTP-layer errors; NULL: silent */
} ServerOptions;

typedef struct Server Server;

/* Starts the engine's loop thread and listens. The engine and the tokenizer must outlive the
 * server. Returns NULL with err naming the cause (bad host, port in use, ...); the engine loop is
 * then not left running by this call. */
Server *server_start(Engine *e, const Tok *tok, const ServerOptions *o, QErr *err);
/* The port actually bound. */
int server_port(const Server *s);
/* Stops listening, ends every open request (streams are cut, engine requests aborted), waits up
 * to a few seconds for the engine to release them, stops the engine loop and frees the server.
 * NULL is allowed. */
void server_stop(Server *s);

#endif
