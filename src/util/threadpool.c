/* threadpool.c — the worker pool behind every parallel CPU kernel.
 *
 * Workload: a single caller (the engine thread) issues many short parallel loops back to back
 * (matmuls of tens to hundreds of microseconds, ~10 per layer per token), separated by short
 * single-threaded stretches. So the pool favours wake-up latency over CPU thrift: idle workers
 * spin for a while (SPIN_NS) on the job word before blocking on a condition variable, and the
 * caller spins likewise before blocking while the last tasks finish.
 *
 * One 64-bit word holds the job generation (high half) and the next unclaimed task (low half).
 * Threads claim tasks by compare-and-swap on it, so uneven tasks balance themselves, and a claim
 * can only succeed for the current job. The task count travels with its generation in a second
 * word (`job_n`), written before the job is published: a worker still looking at a finished job
 * reads either that job's own count (all its tasks claimed: nothing to take) or a newer
 * generation (it stops), never the next job's count against the old job's counter. The caller waits for the tasks to be done, not for the
 * workers to check in: a worker the OS has descheduled (an oversubscribed machine) never delays
 * a job it took no task of; when it runs again it finds the job over, or helps with a later one.
 * A job's fn and ctx are only read after claiming one of its tasks, i.e. while the job cannot
 * end. The mutex/condvar pairs are only touched when someone actually sleeps: the waker checks a
 * sleeper flag after publishing (both sequentially consistent) and the sleeper re-checks its
 * condition under the mutex, so no wake-up is lost. */
#include "util/threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* How long a thread busy-waits before it sleeps: longer than the gaps between the kernels of a
 * decode step, short enough that pools of several processes sharing a few cores (tests, a
 * desktop) do not starve one another for long; a wake-up from sleep costs ~5-20 us, once per
 * longer gap (e.g. per token). Yielding the CPU while spinning was tried for oversubscribed
 * machines; it made waits longer, handing the slice to unrelated processes. */
#define SPIN_NS 50000L

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
    pthread_cond_t done_cv; /* the caller waits here for the last task */

    /* The current job: written by the caller before it publishes the generation. */
    TpTaskFn fn;
    void *ctx;
    _Atomic uint64_t job_n; /* generation << 32 | the job's number of tasks */

    _Alignas(64) _Atomic uint64_t job; /* generation << 32 | next task to claim */
    _Alignas(64) atomic_int done;      /* tasks of the current job finished */
    atomic_int sleepers;               /* workers blocked (or about to block) on wake_cv */
    atomic_int caller_sleeping;        /* the caller is blocked (or about to block) on done_cv */
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

static inline uint32_t job_gen(uint64_t job) { return (uint32_t)(job >> 32); }

/* Claims and runs tasks of generation gen until none is left or the job has moved on. */
static void run_tasks(ThreadPool *p, uint32_t gen, int thread) {
    for (;;) {
        uint64_t j = atomic_load(&p->job);
        int n;
        do {
            uint64_t jn = atomic_load(&p->job_n);
            if (job_gen(jn) != gen) return;
            n = (int)(uint32_t)jn;
            if (job_gen(j) != gen || (uint32_t)j >= (uint32_t)n) return;
        } while (!atomic_compare_exchange_weak(&p->job, &j, j + 1));
        /* The claim succeeded, so n is this job's count and the job cannot end before this
         * task is counted done: fn and ctx are stable. */
        p->fn(p->ctx, (int)(uint32_t)j, thread);
        if (atomic_fetch_add(&p->done, 1) + 1 == n && atomic_load(&p->caller_sleeping)) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

/* Returns the generation once it differs from `seen`: spins up to SPIN_NS, then sleeps. */
static uint32_t wait_for_gen(ThreadPool *p, uint32_t seen) {
    long start = 0;
    for (unsigned i = 0;; i++) {
        uint32_t g = job_gen(atomic_load_explicit(&p->job, memory_order_acquire));
        if (g != seen) return g;
        if ((i & 63) == 0) {
            long t = now_ns();
            if (i == 0) start = t;
            else if (t - start > SPIN_NS) break;
        }
        cpu_relax();
    }
    uint32_t g;
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->sleepers, 1);
    while ((g = job_gen(atomic_load(&p->job))) == seen) pthread_cond_wait(&p->wake_cv, &p->mu);
    atomic_fetch_sub(&p->sleepers, 1);
    pthread_mutex_unlock(&p->mu);
    return g;
}

static void *worker_main(void *arg) {
    Worker *w = arg;
    ThreadPool *p = w->pool;
    uint32_t seen = 0;
    for (;;) {
        seen = wait_for_gen(p, seen);
        if (atomic_load(&p->stop)) return NULL;
        run_tasks(p, seen, w->index);
    }
}

/* Publishes generation gen (a job, or the stop request) and wakes sleeping workers. */
static void publish(ThreadPool *p, uint32_t gen) {
    atomic_store(&p->job, (uint64_t)gen << 32);
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
        publish(pool, job_gen(atomic_load(&pool->job)) + 1);
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
    uint32_t gen = job_gen(atomic_load(&pool->job)) + 1;
    atomic_store(&pool->job_n, (uint64_t)gen << 32 | (uint32_t)n_tasks);
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store(&pool->done, 0);
    publish(pool, gen);
    run_tasks(pool, gen, 0);

    long start = 0;
    for (unsigned i = 0;; i++) {
        if (atomic_load_explicit(&pool->done, memory_order_acquire) == n_tasks) return;
        if ((i & 63) == 0) {
            long t = now_ns();
            if (i == 0) start = t;
            else if (t - start > SPIN_NS) break;
        }
        cpu_relax();
    }
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->caller_sleeping, 1);
    while (atomic_load(&pool->done) != n_tasks) pthread_cond_wait(&pool->done_cv, &pool->mu);
    atomic_store(&pool->caller_sleeping, 0);
    pthread_mutex_unlock(&pool->mu);
}
