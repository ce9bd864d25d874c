/* bench_serve.h — `quill bench serve`: a load generator and latency meter for any
 * OpenAI-compatible server (quill serve, vLLM, ...), reporting what `vllm bench serve` reports. */
#ifndef QUILL_BENCH_SERVE_H
#define QUILL_BENCH_SERVE_H

/* Runs the benchmark. argv[0] is "serve"; the rest are its flags (--help lists them). Prints the
 * result table on stdout (and a JSON file with --json FILE). Returns the process exit code: 0 when
 * at least one request succeeded, 1 when none did or a file could not be read/written, 2 on bad
 * arguments. */
int bench_serve_main(int argc, char **argv);

#endif
