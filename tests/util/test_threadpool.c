/* test_threadpool.c — tp_run runs every task exactly once, on valid thread indices, with its
 * writes visible afterwards; across many back-to-back calls (spinning workers), after idle gaps
 * (sleeping workers), with slow tasks (sleeping caller), fewer tasks than threads, and none. */
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../test_util.h"
#include "util/threadpool.h"

typedef struct Count {
    atomic_int *hits;   /* per task: times called */
    int *plain;         /* per task: written without atomics, read by the caller after tp_run */
    atomic_int bad_thread;
    int size;
    int slow_task;      /* task index that sleeps 3 ms, or -1 */
} Count;

static void count_task(void *ctx, int task, int thread) {
    Count *c = ctx;
    if (thread < 0 || thread >= c->size) atomic_fetch_add(&c->bad_thread, 1);
    if (task == c->slow_task) {
        struct timespec ts = {0, 3000000};
        nanosleep(&ts, NULL);
    }
    atomic_fetch_add(&c->hits[task], 1);
    c->plain[task] = task * 3 + 1;
}

/* Runs n_tasks tasks `reps` times on pool and checks each ran once per call. Returns the number of
 * tasks that ran a wrong number of times in any call. */
static int run_and_check(ThreadPool *pool, int n_tasks, int reps, int slow_task, int gap_us) {
    int cap = n_tasks > 0 ? n_tasks : 1;
    atomic_int *hits = calloc((size_t)cap, sizeof *hits);
    int *plain = calloc((size_t)cap, sizeof *plain);
    Count c = {hits, plain, 0, tp_size(pool), slow_task};
    int wrong = 0;
    for (int rep = 0; rep < reps; rep++) {
        for (int t = 0; t < n_tasks; t++) {
            atomic_store(&hits[t], 0);
            plain[t] = 0;
        }
        tp_run(pool, n_tasks, count_task, &c);
        for (int t = 0; t < n_tasks; t++)
            if (atomic_load(&hits[t]) != 1 || plain[t] != t * 3 + 1) wrong++;
        if (gap_us) usleep((useconds_t)gap_us);
    }
    CHECK(atomic_load(&c.bad_thread) == 0, "thread index out of [0, %d)", c.size);
    free(hits);
    free(plain);
    return wrong;
}

static int zero_calls;
static void never_task(void *ctx, int task, int thread) {
    (void)ctx, (void)task, (void)thread;
    zero_calls++;
}

int main(void) {
    QErr err = {{0}};

    CHECK(tp_create(-1, &err) == NULL, "negative thread count accepted");
    CHECK(strstr(err.msg, "n_threads") != NULL, "message names the parameter: %s", err.msg);

    ThreadPool *all = tp_create(0, &err);
    CHECK(all != NULL, "tp_create(0): %s", err.msg);
    if (all) {
        CHECK(tp_size(all) == (int)sysconf(_SC_NPROCESSORS_ONLN), "tp_create(0) size %d", tp_size(all));
        tp_free(all);
    }
    tp_free(NULL);

    int sizes[] = {1, 2, 4};
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
        ThreadPool *p = tp_create(sizes[si], &err);
        CHECK(p != NULL, "tp_create(%d): %s", sizes[si], err.msg);
        if (!p) continue;
        CHECK(tp_size(p) == sizes[si], "size %d != %d", tp_size(p), sizes[si]);

        /* Many small tasks, many times in a row (workers stay spinning). */
        CHECK(run_and_check(p, 1000, 300, -1, 0) == 0, "many tasks, %d threads", sizes[si]);
        /* Fewer tasks than threads, and a single task. */
        for (int n = 1; n <= 3; n++)
            CHECK(run_and_check(p, n, 200, -1, 0) == 0, "%d tasks, %d threads", n, sizes[si]);
        /* Zero and negative task counts call nothing. */
        zero_calls = 0;
        tp_run(p, 0, never_task, NULL);
        tp_run(p, -5, never_task, NULL);
        CHECK(zero_calls == 0, "fn called %d times for 0 tasks", zero_calls);
        /* Gaps longer than the spin window: workers go to sleep and must be woken. */
        CHECK(run_and_check(p, 64, 5, -1, 2000) == 0, "after idle gaps, %d threads", sizes[si]);
        /* A slow task: whoever waits for it outlasts its spin and sleeps. */
        CHECK(run_and_check(p, 8, 3, 0, 0) == 0, "slow first task, %d threads", sizes[si]);
        CHECK(run_and_check(p, 8, 3, 7, 0) == 0, "slow last task, %d threads", sizes[si]);
        tp_free(p);
    }

    /* A pool freed right after creation, and one freed while its workers sleep. */
    ThreadPool *p = tp_create(3, &err);
    CHECK(p != NULL, "tp_create(3): %s", err.msg);
    tp_free(p);
    p = tp_create(3, &err);
    CHECK(p != NULL, "tp_create(3): %s", err.msg);
    if (p) {
        CHECK(run_and_check(p, 10, 1, -1, 0) == 0, "before sleep");
        usleep(5000);
        tp_free(p);
    }
    return test_finish();
}
