/* strbuf.h — a growable byte string (for building prompts, responses, JSON fragments). Always
 * NUL-terminated; out-of-memory aborts the process, since no caller could do better. */
#ifndef QUILL_STRBUF_H
#define QUILL_STRBUF_H

#include <stddef.h>

typedef struct StrBuf {
    char *s;    /* NULL until the first append */
    size_t len, cap;
} StrBuf;

void sb_append(StrBuf *b, const char *s, size_t n);
void sb_puts(StrBuf *b, const char *s);
void sb_printf(StrBuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The contents ("" when empty); valid until the next append. */
const char *sb_str(const StrBuf *b);
/* Hands the malloc'd string to the caller (never NULL) and resets b. */
char *sb_take(StrBuf *b);
void sb_free(StrBuf *b);

#endif
