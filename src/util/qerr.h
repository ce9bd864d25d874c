/* qerr.h — how library code reports failure.
 *
 * Library functions never print or exit: they return -1 (or NULL) and write one human-readable
 * sentence into a caller-owned QErr naming the file, field or parameter at fault. Only main()
 * decides what to do with it (print, answer HTTP 400, ...). */
#ifndef QUILL_QERR_H
#define QUILL_QERR_H

typedef struct QErr {
    char msg[1024];
} QErr;

/* Formats the message into e (if e is non-NULL). Always returns -1 so callers can write
 * `return qerr_set(err, "...: %s", name);`. */
int qerr_set(QErr *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prepends "prefix: " to an existing message (e.g. the file name around a parse error).
 * Always returns -1. */
int qerr_prefix(QErr *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
