/* buf.h: one bounded, growable byte buffer, for every place that collects
 * bytes of a size not known up front (request and response heads and
 * bodies, answers being written, text being rendered).
 *
 * Owns the memory and its bound: a buffer never grows past the max it was
 * given, and a failed growth (past the bound, or the allocator said no)
 * leaves it exactly as it was, so a caller can still answer with what it
 * holds or free it. Does not know what the bytes are, and keeps no NUL
 * after them unless asked (buf_terminate, buf_printf). Not thread-safe: a
 * buffer belongs to whoever holds it.
 *
 * Growth doubles (from BUF_MIN_CAP) and is clamped at the bound, so
 * appending N bytes one by one costs O(N) copies; buf_reserve_exact is for
 * a size known in advance (a Content-Length), where doubling would waste
 * up to half. p may move on any growth: a caller that keeps pointers into
 * a buffer must not grow it while they live. */
#ifndef POINTGATE_BUF_H
#define POINTGATE_BUF_H

#include <stdarg.h>
#include <stddef.h>

#define BUF_MIN_CAP 1024

/* Every function that can fail says why; none of them leaves a partial
 * change behind. */
enum buf_err {
    BUF_OK = 0,
    BUF_TOO_LARGE = -1, /* the bytes would pass the buffer's max */
    BUF_NOMEM = -2,     /* the allocator refused: the buffer is unchanged */
};

#define BUF_MUST_USE __attribute__((warn_unused_result))

/* P: CAP bytes allocated (NULL while CAP is 0), of which LEN hold data;
 * CAP never exceeds MAX. The fields are for reading; change them only
 * through these functions (len may be lowered by a caller that consumes
 * bytes from the end, or raised after writing into reserved room). */
struct buf {
    char *p;
    size_t len, cap, max;
};

/* An empty buffer bounded at MAX bytes; allocates nothing. A zeroed buf is
 * an empty buffer with max 0 (every growth fails) until buf_init. */
void buf_init(struct buf *b, size_t max);
/* Room for N more bytes (cap >= len + N), growing by doubling within max. */
int buf_reserve(struct buf *b, size_t n) BUF_MUST_USE;
/* The same, but a growth allocates exactly len + N. */
int buf_reserve_exact(struct buf *b, size_t n) BUF_MUST_USE;
/* Appends N bytes of DATA (DATA may be NULL when N is 0). */
int buf_append(struct buf *b, const void *data, size_t n) BUF_MUST_USE;
/* Appends the formatted text and keeps a NUL after it (not counted in len;
 * the room for it counts against max). BUF_NOMEM too for a format error. */
int buf_printf(struct buf *b, const char *fmt, ...) BUF_MUST_USE
    __attribute__((format(printf, 2, 3)));
/* buf_printf with a va_list (AP is used, not ended: the caller's va_end). */
int buf_vprintf(struct buf *b, const char *fmt, va_list ap) BUF_MUST_USE
    __attribute__((format(printf, 2, 0)));
/* Puts a NUL after the data (not counted in len), growing for it if need be. */
int buf_terminate(struct buf *b) BUF_MUST_USE;
/* Gives memory back down to CAP bytes when the data fits in them; keeps the
 * larger allocation if the allocator will not shrink it (nothing is lost). */
void buf_shrink(struct buf *b, size_t cap);
/* Empties the buffer, keeping its memory for reuse. */
void buf_reset(struct buf *b);
/* Frees the memory; the buffer is empty, with the same max, and reusable. */
void buf_free(struct buf *b);
/* Hands the memory to the caller (free it with free(); NULL if none was
 * allocated) and its length in *LEN (if LEN); the buffer is left empty. */
char *buf_detach(struct buf *b, size_t *len);

#endif
