/* test_util.h — the tiny harness every C unit test uses: CHECK() records a failure and goes on,
 * test_finish() prints "N passed, N failed" and returns the exit code. shared_path() finds
 * ../shared (or $QUILL_SHARED). Header-only so each test is a single file. */
#ifndef QUILL_TEST_UTIL_H
#define QUILL_TEST_UTIL_H

#include <stdio.h>
#include <stdlib.h>

static int test_passed, test_failed;

#define CHECK(cond, ...)                                                                  \
    do {                                                                                  \
        if (cond) {                                                                       \
            test_passed++;                                                                \
        } else {                                                                          \
            test_failed++;                                                                \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond);       \
            fprintf(stderr, __VA_ARGS__);                                                 \
            fputc('\n', stderr);                                                          \
        }                                                                                 \
    } while (0)

/* Path of a file under the shared reference folder, in a static buffer (valid until next call). */
static inline const char *shared_path(const char *rel) {
    static char buf[4096];
    const char *root = getenv("QUILL_SHARED");
    snprintf(buf, sizeof buf, "%s/%s", root ? root : "../shared", rel);
    return buf;
}

static inline int test_finish(void) {
    printf("%d passed, %d failed\n", test_passed, test_failed);
    return test_failed ? 1 : 0;
}

#endif
