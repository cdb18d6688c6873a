/* buf.c: the bounded byte buffer (see buf.h). */
#include "common/buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef BUF_TESTING
/* Test builds only (tests/unit/test_buf.c): the next allocations fail. */
int buf_test_fail_allocs;
#endif

void buf_init(struct buf *b, size_t max)
{
    b->p = NULL;
    b->len = b->cap = 0;
    b->max = max;
}

/* Reallocates B to exactly CAP bytes (len <= CAP <= max); B unchanged on failure. */
static int buf_realloc(struct buf *b, size_t cap)
{
    char *np;
#ifdef BUF_TESTING
    if (buf_test_fail_allocs > 0) {
        buf_test_fail_allocs--;
        return BUF_NOMEM;
    }
#endif
    np = realloc(b->p, cap);
    if (!np) return BUF_NOMEM;
    b->p = np;
    b->cap = cap;
    return BUF_OK;
}

/* The bound, checked without overflow: len + N within max. */
static int buf_fits(const struct buf *b, size_t n)
{
    return b->len <= b->max && n <= b->max - b->len;
}

int buf_reserve(struct buf *b, size_t n)
{
    size_t need, cap;
    if (n <= b->cap - b->len) return BUF_OK;
    if (!buf_fits(b, n)) return BUF_TOO_LARGE;
    need = b->len + n; /* <= max */
    cap = b->cap ? b->cap : BUF_MIN_CAP;
    while (cap < need) {
        if (cap > b->max / 2) { /* doubling would pass the bound (or overflow) */
            cap = b->max;
            break;
        }
        cap *= 2;
    }
    if (cap > b->max) cap = b->max; /* a bound below BUF_MIN_CAP */
    return buf_realloc(b, cap);
}

int buf_reserve_exact(struct buf *b, size_t n)
{
    if (n <= b->cap - b->len) return BUF_OK;
    if (!buf_fits(b, n)) return BUF_TOO_LARGE;
    return buf_realloc(b, b->len + n);
}

int buf_append(struct buf *b, const void *data, size_t n)
{
    int rc = buf_reserve(b, n);
    if (rc != BUF_OK) return rc;
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
    return BUF_OK;
}

int buf_terminate(struct buf *b)
{
    int rc = buf_reserve(b, 1);
    if (rc != BUF_OK) return rc;
    b->p[b->len] = '\0';
    return BUF_OK;
}

int buf_vprintf(struct buf *b, const char *fmt, va_list ap)
{
    va_list again;
    int n, rc;
    size_t room = b->cap - b->len;
    /* One try into the room there is; only a longer text pays a second
     * formatting, into exactly the room it said it needs. */
    va_copy(again, ap);
    n = vsnprintf(room ? b->p + b->len : NULL, room, fmt, ap);
    if (n < 0) {
        rc = BUF_NOMEM;
    } else if ((size_t)n < room) {
        b->len += (size_t)n;
        rc = BUF_OK;
    } else if ((rc = buf_reserve(b, (size_t)n + 1)) != BUF_OK) {
        /* The first try may have written into the room: the data is as it
         * was, and the NUL after it too. */
        if (b->cap > b->len) b->p[b->len] = '\0';
    } else {
        n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, again);
        if (n < 0) {
            b->p[b->len] = '\0';
            rc = BUF_NOMEM;
        } else {
            b->len += (size_t)n;
        }
    }
    va_end(again);
    return rc;
}

int buf_printf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    int rc;
    va_start(ap, fmt);
    rc = buf_vprintf(b, fmt, ap);
    va_end(ap);
    return rc;
}

void buf_shrink(struct buf *b, size_t cap)
{
    if (cap >= b->cap || cap < b->len) return;
    if (cap == 0) {
        free(b->p);
        b->p = NULL;
        b->cap = 0;
        return;
    }
    /* A refused shrink keeps the larger buffer, which holds the same data:
     * nothing to report. */
    buf_realloc(b, cap);
}

void buf_reset(struct buf *b)
{
    b->len = 0;
}

void buf_free(struct buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

char *buf_detach(struct buf *b, size_t *len)
{
    char *p = b->p;
    if (len) *len = b->len;
    b->p = NULL;
    b->len = b->cap = 0;
    return p;
}
