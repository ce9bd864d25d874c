/* cmd_bench.c — `quill bench`: latency of one batch end to end (as `vllm bench latency`), and the
 * dispatcher for `quill bench serve` (bench_serve.c), a client for any OpenAI-compatible server.
 *
 * Latency runs B requests of input_len random prompt tokens, each generating output_len tokens
 * (EOS ignored), through the same engine as everything else, all B at once (the KV pool is sized
 * for the batch, and the report says how many sequences a step ran), and reports the end-to-end
 * latency distribution, prefill and decode speed, the time of one decode step, and the memory
 * bandwidth that step achieved next to a bandwidth probe run in the same process. Every run
 * repeats the same prompts, so automatic prefix caching is off here: with it, each run after the
 * first would find its prompts cached and "prefill" would time a lookup, not a prefill. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_serve.h"
#include "cli/cli_common.h"
#include "cli/commands.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: quill bench latency (MODEL_DIR | --random-weights PRESET [--dtype int4|bf16]) [options]\n"
            "  --random-weights P  build preset P's random weights in memory, no files (tiny-qwen3,\n"
            "                      small-qwen3, qwen3-0.6b, qwen3-8b); --dtype int4 (default) or bf16\n"
            "  --input-len N     prompt tokens per request (default 256)\n"
            "  --output-len N    generated tokens per request (default 256)\n"
            "  --batch-size B    requests run together (default 1)\n"
            "  --iters N         timed runs (default 3); --warmup N untimed runs (default 1); every\n"
            "                    run prefills its prompts in full (prefix caching is off)\n"
            "  --device cpu|cuda, -t/--threads N, --json (one JSON object on stdout)\n"
            "  --kv-cache-dtype auto|fp8  as `quill run --help`\n"
            "  --speculative-config JSON  as `quill run --help` (random prompts rarely repeat)\n"
            "       quill bench serve --help   (serving benchmark client)\n");
}

typedef struct LatRun {
    int n_req, done;
    double t_first_token; /* first token of the batch's last request to start = end of prefill */
    int first_seen;
} LatRun;

static void on_event(void *user, const EngineEvent *ev) {
    LatRun *r = user;
    if (ev->token >= 0 && ev->n_output == 1 && ++r->first_seen == r->n_req) r->t_first_token = now_seconds();
    if (ev->finish) r->done++;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(const double *sorted, int n, double p) {
    double idx = p / 100.0 * (n - 1);
    int lo = (int)idx;
    int hi = lo + 1 < n ? lo + 1 : lo;
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (idx - lo);
}

static int bench_latency(int argc, char **argv) {
    const char *dir = NULL;
    int input_len = 256, output_len = 256, batch = 1, iters = 3, warmup = 1;
    bool json_out = false;
    RuntimeArgs ra = {0};
    QErr err;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int *target = NULL;
        long lo = 1, hi = 1 << 20;
        int r = parse_runtime_flag(argc, argv, &i, &ra, &err);
        if (r == 0) r = parse_random_weights_flag(argc, argv, &i, &ra, &err);
        if (r != 0) {
            if (r > 0) continue;
            fprintf(stderr, "quill bench latency: %s\n", err.msg);
            return 2;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--input-len")) {
            target = &input_len;
        } else if (!strcmp(a, "--output-len")) {
            target = &output_len;
        } else if (!strcmp(a, "--batch-size")) {
            target = &batch;
            hi = 4096;
        } else if (!strcmp(a, "--iters")) {
            target = &iters;
        } else if (!strcmp(a, "--warmup")) {
            target = &warmup;
            lo = 0;
        } else if (!strcmp(a, "--json")) {
            json_out = true;
            continue;
        } else if (a[0] != '-' && !dir) {
            dir = a;
            continue;
        } else {
            fprintf(stderr, "quill bench latency: unexpected argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
        if (parse_int(a, v, lo, hi, target, &err)) {
            fprintf(stderr, "quill bench latency: %s\n", err.msg);
            return 2;
        }
        i++;
    }
    if (check_model_source(dir, &ra, &err)) {
        fprintf(stderr, "quill bench latency: %s\n", err.msg);
        usage(stderr);
        return 2;
    }
    ra.max_seqs = batch;
    ra.no_prefix_caching = true; /* the runs repeat the same prompts */
    ra.max_model_len = input_len + output_len;
    /* the whole batch at once, as vLLM's bench latency runs it (the engine's default 1 GiB pool
     * holds only ~9 Qwen3-8B sequences of 768 tokens in bf16) */
    ra.kv_all_seqs = true;
    ra.max_step_tokens = input_len * batch < 2048 ? input_len * batch : 2048;
    if (ra.max_step_tokens < batch) ra.max_step_tokens = batch;
    Runtime rt;
    if (runtime_open(&rt, dir, &ra, &err)) {
        fprintf(stderr, "quill bench latency: %s\n", err.msg);
        return 1;
    }
    const Model *m = rt.model;
    Backend *be = rt.be;
    double probe = be->ops->probe_bandwidth ? be->ops->probe_bandwidth(be) : 0;
    peak_rss_reset(); /* the probe's buffer is not the model's memory */

    /* Random prompts (fixed seed: every run and every engine sees the same work). */
    int32_t *prompts = malloc((size_t)batch * input_len * sizeof *prompts);
    uint64_t s = 12345;
    for (int i = 0; i < batch * input_len; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        prompts[i] = (int32_t)((s >> 33) % (uint64_t)m->cfg.vocab_size);
    }
    EngineParams p = engine_params_default();
    p.max_tokens = output_len;
    p.ignore_eos = true;
    double *lat = calloc((size_t)iters, sizeof *lat), *prefill = calloc((size_t)iters, sizeof *prefill);
    int rc = 0;
    for (int it = -warmup; it < iters && !rc; it++) {
        LatRun run = {.n_req = batch};
        double t0 = now_seconds();
        for (int b = 0; b < batch; b++)
            if (engine_add(rt.engine, prompts + (size_t)b * input_len, input_len, &p, on_event, &run, NULL, &err)) {
                fprintf(stderr, "quill bench latency: %s\n", err.msg);
                rc = 1;
                break;
            }
        engine_run_until_idle(rt.engine);
        double t1 = now_seconds();
        if (it >= 0) {
            lat[it] = t1 - t0;
            prefill[it] = run.t_first_token - t0;
        }
        if (!json_out) fprintf(stderr, "%s %d: %.3f s\n", it < 0 ? "warmup" : "iter", it < 0 ? it + warmup : it, t1 - t0);
    }
    if (!rc) {
        double avg = 0, avg_prefill = 0;
        for (int i = 0; i < iters; i++) avg += lat[i] / iters, avg_prefill += prefill[i] / iters;
        double *sorted = malloc((size_t)iters * sizeof *sorted);
        memcpy(sorted, lat, (size_t)iters * sizeof *sorted);
        qsort(sorted, (size_t)iters, sizeof *sorted, cmp_double);
        double step_ms = output_len > 1 ? (avg - avg_prefill) / (output_len - 1) * 1e3 : 0;
        size_t wbytes = model_weight_bytes_per_step(m);
        /* KV read per decode step: every sequence reads its context (average length). */
        double kv = (double)batch * (input_len + output_len / 2.0) * m->cfg.num_hidden_layers * 2 *
                    m->cfg.num_key_value_heads * m->cfg.head_dim * kv_dtype_bytes(be->ops, m->kv_shape.dtype);
        const char *kv_name = m->kv_shape.dtype == KV_FP8 ? "fp8_e4m3" : "auto";
        double gbs = step_ms > 0 ? ((double)wbytes + kv) / (step_ms * 1e-3) / 1e9 : 0;
        size_t peak_dev = 0;
        if (be->ops->mem_used) be->ops->mem_used(be, &peak_dev);
        const EngineStats st = engine_stats(rt.engine); /* warmup runs included */
        static const double pcts[] = {10, 25, 50, 75, 90, 99};
        if (json_out) {
            json_t *o = json_pack("{s:s, s:i, s:i, s:i, s:i, s:f, s:f, s:f, s:f, s:f, s:I, s:f, s:f, s:I, s:I, s:I, s:I}",
                                  "device", be->ops->name, "batch_size", batch, "input_len", input_len, "output_len",
                                  output_len, "iters", iters, "avg_latency_s", avg, "avg_prefill_s", avg_prefill,
                                  "prefill_tokens_per_s", batch * input_len / avg_prefill, "decode_tokens_per_s",
                                  batch * 1e3 / step_ms, "decode_step_ms", step_ms, "weight_bytes_per_step",
                                  (json_int_t)wbytes, "achieved_gb_per_s", gbs, "probe_gb_per_s", probe,
                                  "peak_device_bytes", (json_int_t)peak_dev, "peak_rss_bytes",
                                  (json_int_t)peak_rss_bytes(), "prompt_tokens", (json_int_t)st.prompt_tokens,
                                  "prefix_hit_tokens", (json_int_t)st.prefix_hit_tokens);
            json_object_set_new(o, "peak_step_seqs", json_integer(st.peak_step_seqs));
            json_object_set_new(o, "kv_cache_dtype", json_string(kv_name));
            json_object_set_new(o, "kv_bytes_per_step", json_integer((json_int_t)kv));
            json_t *pc = json_object();
            for (size_t i = 0; i < sizeof pcts / sizeof pcts[0]; i++) {
                char k[16];
                snprintf(k, sizeof k, "%g", pcts[i]);
                json_object_set_new(pc, k, json_real(percentile(sorted, iters, pcts[i])));
            }
            json_object_set_new(o, "percentiles_s", pc);
            spec_stats_json(&rt, o); /* warmup runs included */
            char *str = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
            puts(str);
            free(str);
            json_decref(o);
        } else {
            printf("device %s | KV cache %s | batch %d | input %d | output %d | %d iters\n", be->ops->name, kv_name, batch,
                   input_len, output_len, iters);
            printf("Avg latency: %.4f s\n", avg);
            for (size_t i = 0; i < sizeof pcts / sizeof pcts[0]; i++)
                printf("%g%% percentile latency: %.4f s\n", pcts[i], percentile(sorted, iters, pcts[i]));
            printf("prefill: %.4f s, %.1f tokens/s\n", avg_prefill, batch * input_len / avg_prefill);
            printf("decode: %.3f ms/step, %.1f tokens/s\n", step_ms, batch * 1e3 / step_ms);
            printf("decode reads %.3f GB/step (weights %.3f + KV %.3f): %.1f GB/s achieved, probe %.1f GB/s (%.0f%%)\n",
                   (wbytes + kv) / 1e9, wbytes / 1e9, kv / 1e9, gbs, probe, probe > 0 ? 100 * gbs / probe : 0);
            printf("peak memory: device %.3f GB, RSS %.3f GB\n", peak_dev / 1e9, peak_rss_bytes() / 1e9);
            printf("sequences per step: at most %d\n", st.peak_step_seqs);
            if (rt.eopt.spec_tokens)
                printf("speculative decoding: %llu of %llu draft tokens kept (%.0f%%); decode figures are per "
                       "token, a step may make several\n",
                       (unsigned long long)st.spec_accepted_tokens, (unsigned long long)st.spec_draft_tokens,
                       st.spec_draft_tokens ? 100.0 * st.spec_accepted_tokens / st.spec_draft_tokens : 0.0);
        }
        free(sorted);
    }
    free(lat);
    free(prefill);
    free(prompts);
    runtime_close(&rt);
    return rc;
}

int cmd_bench(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "latency")) return bench_latency(argc - 1, argv + 1);
    if (!strcmp(argv[1], "serve")) return bench_serve_main(argc - 1, argv + 1);
    fprintf(stderr, "quill bench: unknown benchmark '%s' (latency, serve)\n", argv[1]);
    return 2;
}
