/* threadpool.c — the worker pool behind every parallel CPU kernel.
 *
 * Workload: a single caller (the engine thread) issues many short parallel loops back to back
 * (matmuls of tens to hundreds of microseconds, ~10 per layer per token), separated by short
 * single-threaded stretches. So the pool favours wake-up latency over CPU thrift: a job is
 * published by bumping a generation counter that idle workers spin on for a while (SPIN_NS), and
 * only then do they block on a condition variable; the caller likewise spins before blocking
 * while it waits for stragglers. Tasks are handed out by an atomic counter, so uneven tasks
 * balance themselves. The mutex/condvar pair is only touched when someone actually sleeps: the
 * waker checks a sleeper count after publishing (both sequentially consistent), and the sleeper
 * re-checks the condition under the mutex, so no wake-up is lost. */
#include "util/threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* How long a thread busy-waits before it sleeps: about the gap between two kernels of a decode
 * step, much less than an idle server's gaps. (Yielding the CPU while spinning was tried for
 * oversubscribed machines; it made waits longer, handing the slice to unrelated processes.) */
#define SPIN_NS 200000L

typedef struct Worker {
    ThreadPool *pool;
    int index;
} Worker;

struct ThreadPool {
    int n_threads; /* the caller included */
    int n_started; /* workers actually started (tp_free joins these) */
    pthread_t *threads;
    Worker *workers;

    pthread_mutex_t mu;
    pthread_cond_t wake_cv; /* workers wait here for a new generation */
    pthread_cond_t done_cv; /* the caller waits here for busy == 0 */

    /* The current job: written by the caller before it bumps gen, read by workers after. */
    TpTaskFn fn;
    void *ctx;
    int n_tasks;

    _Alignas(64) atomic_int next_task;
    _Alignas(64) atomic_uint gen;
    atomic_int busy;            /* workers that have not finished the current job */
    atomic_int sleepers;        /* workers blocked (or about to block) on wake_cv */
    atomic_int caller_sleeping; /* the caller is blocked (or about to block) on done_cv */
    atomic_int stop;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void run_tasks(ThreadPool *p, int thread) {
    for (;;) {
        int t = atomic_fetch_add_explicit(&p->next_task, 1, memory_order_relaxed);
        if (t >= p->n_tasks) return;
        p->fn(p->ctx, t, thread);
    }
}

/* Spins until gen differs from `seen`, up to SPIN_NS; returns the last value read. */
static unsigned spin_for_gen(ThreadPool *p, unsigned seen) {
    long start = 0;
    for (unsigned i = 0;; i++) {
        unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g != seen) return g;
        if ((i & 63) == 0) {
            long t = now_ns();
            if (i == 0) start = t;
            else if (t - start > SPIN_NS) return g;
        }
        cpu_relax();
    }
}

static void *worker_main(void *arg) {
    Worker *w = arg;
    ThreadPool *p = w->pool;
    unsigned seen = 0;
    for (;;) {
        unsigned g = spin_for_gen(p, seen);
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleepers, 1);
            while ((g = atomic_load(&p->gen)) == seen) pthread_cond_wait(&p->wake_cv, &p->mu);
            atomic_fetch_sub(&p->sleepers, 1);
            pthread_mutex_unlock(&p->mu);
        }
        seen = g;
        if (atomic_load(&p->stop)) return NULL;
        run_tasks(p, w->index);
        if (atomic_fetch_sub(&p->busy, 1) == 1 && atomic_load(&p->caller_sleeping)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

/* Publishes a new generation (job or stop) and wakes sleeping workers. */
static void publish(ThreadPool *p) {
    atomic_fetch_add(&p->gen, 1);
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->wake_cv);
        pthread_mutex_unlock(&p->mu);
    }
}

ThreadPool *tp_create(int n_threads, QErr *err) {
    if (n_threads < 0) {
        qerr_set(err, "tp_create: n_threads must be >= 0 (0 = all CPUs), got %d", n_threads);
        return NULL;
    }
    if (n_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }
    ThreadPool *p = calloc(1, sizeof *p);
    if (!p) {
        qerr_set(err, "tp_create: out of memory");
        return NULL;
    }
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    if (n_threads > 1) {
        p->threads = calloc((size_t)n_threads - 1, sizeof *p->threads);
        p->workers = calloc((size_t)n_threads - 1, sizeof *p->workers);
        if (!p->threads || !p->workers) {
            qerr_set(err, "tp_create: out of memory for %d threads", n_threads);
            tp_free(p);
            return NULL;
        }
    }
    for (int i = 0; i < n_threads - 1; i++) {
        p->workers[i] = (Worker){p, i + 1};
        int rc = pthread_create(&p->threads[i], NULL, worker_main, &p->workers[i]);
        if (rc != 0) {
            qerr_set(err, "tp_create: cannot start worker thread %d of %d: %s", i + 1, n_threads - 1,
                     strerror(rc));
            tp_free(p);
            return NULL;
        }
        p->n_started++;
    }
    return p;
}

void tp_free(ThreadPool *pool) {
    if (!pool) return;
    if (pool->n_started > 0) {
        atomic_store(&pool->stop, 1);
        publish(pool);
        for (int i = 0; i < pool->n_started; i++) pthread_join(pool->threads[i], NULL);
    }
    pthread_cond_destroy(&pool->done_cv);
    pthread_cond_destroy(&pool->wake_cv);
    pthread_mutex_destroy(&pool->mu);
    free(pool->threads);
    free(pool->workers);
    free(pool);
}

int tp_size(const ThreadPool *pool) { return pool->n_threads; }

void tp_run(ThreadPool *pool, int n_tasks, TpTaskFn fn, void *ctx) {
    if (n_tasks <= 0) return;
    if (pool->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    pool->n_tasks = n_tasks;
    atomic_store_explicit(&pool->next_task, 0, memory_order_relaxed);
    atomic_store_explicit(&pool->busy, pool->n_threads - 1, memory_order_relaxed);
    publish(pool);
    run_tasks(pool, 0);

    long start = 0;
    for (unsigned i = 0;; i++) {
        if (atomic_load_explicit(&pool->busy, memory_order_acquire) == 0) return;
        if ((i & 63) == 0) {
            long t = now_ns();
            if (i == 0) start = t;
            else if (t - start > SPIN_NS) break;
        }
        cpu_relax();
    }
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->caller_sleeping, 1);
    while (atomic_load(&pool->busy) != 0) pthread_cond_wait(&pool->done_cv, &pool->mu);
    atomic_store(&pool->caller_sleeping, 0);
    pthread_mutex_unlock(&pool->mu);
}
