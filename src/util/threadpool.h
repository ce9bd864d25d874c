/* threadpool.h — a fixed pool of worker threads that runs one parallel loop at a time.
 *
 * Built for the CPU backend's kernels: tp_run() is called about ten times per layer per token, so
 * a call costs a few microseconds when the workers are awake (they spin briefly after each loop
 * before sleeping on a condition variable). One thread at a time may call tp_run() on a pool (the
 * engine thread that owns the backend); tasks must not call tp_run() on their own pool. */
#ifndef QUILL_THREADPOOL_H
#define QUILL_THREADPOOL_H

#include "util/qerr.h"

typedef struct ThreadPool ThreadPool;

/* The body of a parallel loop: called once for every task index in [0, n_tasks), on the thread
 * with index `thread` in [0, tp_size()) (0 is the thread that called tp_run). Tasks of one call
 * may run in any order and concurrently; `thread` lets a task use per-thread scratch. */
typedef void (*TpTaskFn)(void *ctx, int task, int thread);

/* Creates a pool of n_threads threads in all, the calling thread included (so n_threads - 1
 * workers are started); n_threads == 0 means the number of online CPUs. Returns NULL with a
 * message in err if n_threads is negative or a thread cannot be started. Free with tp_free. */
ThreadPool *tp_create(int n_threads, QErr *err);

/* Stops and joins the workers and frees the pool. NULL is a no-op. Must not be called while a
 * tp_run on the same pool is in progress. */
void tp_free(ThreadPool *pool);

/* Number of threads that run tasks (the caller included): the bound of the `thread` argument. */
int tp_size(const ThreadPool *pool);

/* Calls fn(ctx, t, thread) for every t in [0, n_tasks) across the pool's threads, the caller
 * included, and returns when all calls have returned; their memory effects are then visible to
 * the caller. n_tasks <= 0 returns at once. Cannot fail. */
void tp_run(ThreadPool *pool, int n_tasks, TpTaskFn fn, void *ctx);

#endif
