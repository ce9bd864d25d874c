/* cmd_serve.c — `quill serve`: the OpenAI-compatible HTTP server (src/server) over one engine,
 * with vLLM's flag names. SIGINT and SIGTERM are blocked in every thread and taken by sigwait() on
 * the main thread, so shutdown runs as ordinary code (no async-signal-safety games): stop
 * listening, cut open streams, let the engine drop their requests, free everything. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "io/config.h"
#include "server/server.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: quill serve (MODEL_DIR | --random-weights PRESET [--dtype int4|bf16]) [options]\n"
            "  --random-weights PRESET      serve preset PRESET's random weights built in memory, no files\n"
            "                               (vLLM's --load-format dummy; tiny-qwen3, small-qwen3, qwen3-0.6b,\n"
            "                               qwen3-8b), with the Qwen3 tokenizer quill ships\n"
            "  --dtype int4|bf16            weights of --random-weights (default int4)\n"
            "  --host HOST                  address to bind (default 127.0.0.1)\n"
            "  --port PORT                  port (default 8000; 0 picks a free one)\n"
            "  --api-key KEY                require \"Authorization: Bearer KEY\" on /v1/*\n"
            "  --served-model-name NAME     the model name clients use (default MODEL_DIR)\n"
            "  --max-model-len N            prompt + output tokens per request (default: the model's)\n"
            "  --max-num-seqs N             sequences in the running batch (default 256)\n"
            "  --max-num-batched-tokens N   tokens per engine step, the prefill chunk (default, as vLLM's:\n"
            "                               8192 on a GPU of 70 GiB or more, 2048 on a smaller one; 512\n"
            "                               on the CPU)\n"
            "  --kv-cache-memory BYTES      KV-cache pool size, e.g. 8G (default: on a GPU, what\n"
            "                               --gpu-memory-utilization leaves; on the CPU 1G)\n"
            "  --gpu-memory-utilization F   fraction of the GPU's memory the server may use: the KV cache\n"
            "                               takes what the weights and scratch leave (default 0.9)\n"
            "  --no-enable-prefix-caching   do not reuse the KV blocks of shared prompt prefixes\n"
            "  --device cpu|cuda            where to run (default: cuda if available)\n"
            "  -t, --threads N              CPU threads (default: all cores)\n"
            "  --kv-cache-dtype auto|fp8|fp8_e4m3  what the KV cache stores: auto, the device's own type\n"
            "                               (float32 on the CPU, bf16 on a GPU), or float8 e4m3 (fp8,\n"
            "                               unit scale): one byte a value, so more blocks in the memory\n"
            "  --speculative-config JSON    speculative decoding by n-gram lookup, e.g.\n"
            "                               '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'\n"
            "                               (prompt_lookup_max 4, _min 2 by default); while at most 4\n"
            "                               sequences run; outputs unchanged, fewer steps\n"
            "  --disable-log-requests       do not log one line per request\n"
            "\n"
            "Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,\n"
            "POST /tokenize, POST /detokenize, GET /health, GET /metrics. SIGINT or SIGTERM stops\n"
            "the server.\n");
}

int cmd_serve(int argc, char **argv) {
    const char *dir = NULL;
    RuntimeArgs ra = {.max_seqs = 256, .need_tokenizer = true, .serve_steps = true, .embed_resident = true};
    ServerOptions so = {.host = "127.0.0.1", .port = 8000, .log = stderr};
    QErr err;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool takes_value = true;
        int r;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--host")) {
            so.host = v;
        } else if (!strcmp(a, "--port")) {
            if (parse_int(a, v, 0, 65535, &so.port, &err)) goto bad;
        } else if (!strcmp(a, "--api-key")) {
            so.api_key = v;
        } else if (!strcmp(a, "--served-model-name")) {
            so.model_name = v;
        } else if (!strcmp(a, "--max-model-len")) {
            if (parse_int(a, v, 2, 1 << 24, &ra.max_model_len, &err)) goto bad;
        } else if (!strcmp(a, "--max-num-seqs")) {
            if (parse_int(a, v, 1, 4096, &ra.max_seqs, &err)) goto bad;
        } else if (!strcmp(a, "--max-num-batched-tokens")) {
            if (parse_int(a, v, 16, 1 << 20, &ra.max_step_tokens, &err)) goto bad;
        } else if ((r = parse_random_weights_flag(argc, argv, &i, &ra, &err)) != 0 ||
                   (r = parse_runtime_flag(argc, argv, &i, &ra, &err)) != 0) { /* --device, -t, ... */
            if (r < 0) {
                fprintf(stderr, "quill serve: %s\n", err.msg);
                return 2;
            }
            continue;
        } else if (!strcmp(a, "--kv-cache-memory")) {
            if (parse_bytes(a, v, &ra.kv_bytes, &err)) goto bad;
        } else if (!strcmp(a, "--gpu-memory-utilization")) {
            float f;
            if (parse_float(a, v, 0.01, 1.0, &f, &err)) goto bad;
            ra.gpu_mem_util = f;
        } else if (!strcmp(a, "--no-enable-prefix-caching")) {
            ra.no_prefix_caching = true;
            takes_value = false;
        } else if (!strcmp(a, "--disable-log-requests")) {
            so.log = NULL;
            takes_value = false;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "quill serve: unknown option '%s'\n", a);
            usage(stderr);
            return 2;
        } else if (!dir) {
            dir = a;
            takes_value = false;
        } else {
            fprintf(stderr, "quill serve: unexpected argument '%s'\n", a);
            return 2;
        }
        if (takes_value) {
            if (!v) {
                fprintf(stderr, "quill serve: %s needs a value\n", a);
                return 2;
            }
            i++;
        }
    }
    if (check_model_source(dir, &ra, &err)) {
        fprintf(stderr, "quill serve: %s\n", err.msg);
        usage(stderr);
        return 2;
    }
    if (!dir) dir = ra.random_preset;
    if (!so.model_name) so.model_name = dir;
    so.model_root = dir;
    if (!ra.max_model_len && !ra.random_preset) {
        /* vLLM's default: the model's whole context, not the CLI's 32768 cap. */
        QwenConfig cfg;
        if (config_load(&cfg, dir, &err)) {
            fprintf(stderr, "quill serve: %s\n", err.msg);
            return 1;
        }
        ra.max_model_len = cfg.max_position_embeddings;
    }

    /* an explicit --kv-cache-memory wins, as in vLLM */
    if (ra.kv_bytes) ra.gpu_mem_util = 0;
    else if (ra.gpu_mem_util == 0) ra.gpu_mem_util = 0.9;

    /* Block the stop signals before any thread exists, so every thread inherits the mask. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);

    Runtime rt;
    if (runtime_open(&rt, dir, &ra, &err)) {
        fprintf(stderr, "quill serve: %s\n", err.msg);
        return 1;
    }
    so.max_model_len = rt.eopt.max_model_len;
    Server *s = server_start(rt.engine, rt.tok, &so, &err);
    if (!s) {
        fprintf(stderr, "quill serve: %s\n", err.msg);
        runtime_close(&rt);
        return 1;
    }
    fprintf(stderr,
            "quill serve: model %s (max_model_len %d, max_num_seqs %d, max_num_batched_tokens %d, %d KV blocks "
            "of %d tokens%s)\n"
            "quill serve: listening on http://%s%s%s:%d\n",
            so.model_name, rt.eopt.max_model_len, rt.eopt.max_seqs, rt.eopt.max_step_tokens,
            engine_stats(rt.engine).kv_blocks_total, rt.eopt.block_size,
            rt.eopt.kv_dtype == KV_FP8 ? ", kv_cache_dtype fp8_e4m3" : "", strchr(so.host, ':') ? "[" : "", so.host,
            strchr(so.host, ':') ? "]" : "",
            server_port(s));
    fflush(stderr);
    int sig = 0;
    sigwait(&stop, &sig);
    fprintf(stderr, "quill serve: %s received, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    server_stop(s);
    runtime_close(&rt);
    fprintf(stderr, "quill serve: stopped\n");
    return 0;
bad:
    fprintf(stderr, "quill serve: %s\n", err.msg);
    return 2;
}
