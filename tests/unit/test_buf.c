/* test_buf.c: the bounded byte buffer (common/buf.c, built with BUF_TESTING
 * for its allocation-failure hook): growth by doubling and exact growth,
 * the bound (never passed, by any path, with no overflow near SIZE_MAX),
 * allocation failure leaving the buffer unchanged, printf-style appends,
 * shrink, reset, detach and zero-length edge cases. Needs no service. Exit
 * 0 when every check holds. */
#include "common/buf.h"
#include "tests/unit/check.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern int buf_test_fail_allocs;

static void growth(void)
{
    struct buf b;
    char chunk[300];
    memset(chunk, 'x', sizeof chunk);
    buf_init(&b, 1 << 20);
    CHECK(b.p == NULL && b.len == 0 && b.cap == 0 && b.max == 1 << 20);
    CHECK(buf_append(&b, "abc", 3) == BUF_OK);
    CHECK(b.len == 3 && b.cap == BUF_MIN_CAP && memcmp(b.p, "abc", 3) == 0);
    /* Doubling: many appends, few sizes, the data intact. */
    for (int i = 0; i < 20; i++)
        CHECK(buf_append(&b, chunk, sizeof chunk) == BUF_OK);
    CHECK(b.len == 3 + 20 * sizeof chunk);
    CHECK(b.cap == 8192); /* 1024 -> 2048 -> 4096 -> 8192 */
    CHECK(memcmp(b.p, "abc", 3) == 0 && b.p[b.len - 1] == 'x');
    /* Reserve without appending: room, no length. */
    CHECK(buf_reserve(&b, 10000) == BUF_OK);
    CHECK(b.cap >= b.len + 10000 && b.len == 3 + 20 * sizeof chunk);
    buf_free(&b);
    CHECK(b.p == NULL && b.len == 0 && b.cap == 0 && b.max == 1 << 20);

    /* Exact growth: just what was asked for. */
    buf_init(&b, 1 << 20);
    CHECK(buf_reserve_exact(&b, 5000) == BUF_OK && b.cap == 5000 && b.len == 0);
    CHECK(buf_reserve_exact(&b, 4000) == BUF_OK && b.cap == 5000); /* room is there */
    CHECK(buf_append(&b, chunk, 100) == BUF_OK && b.cap == 5000);
    CHECK(buf_reserve_exact(&b, 4950) == BUF_OK && b.cap == 5050);
    buf_free(&b);
}

static void bound(void)
{
    struct buf b;
    char big[700];
    memset(big, 'y', sizeof big);
    /* A bound below the first size: clamped to it. */
    buf_init(&b, 100);
    CHECK(buf_append(&b, big, 60) == BUF_OK && b.cap == 100);
    CHECK(buf_append(&b, big, 41) == BUF_TOO_LARGE);
    CHECK(b.len == 60 && b.cap == 100);
    CHECK(buf_append(&b, big, 40) == BUF_OK && b.len == 100);
    CHECK(buf_append(&b, big, 1) == BUF_TOO_LARGE && b.len == 100);
    CHECK(buf_reserve(&b, 1) == BUF_TOO_LARGE && buf_reserve_exact(&b, 1) == BUF_TOO_LARGE);
    CHECK(buf_terminate(&b) == BUF_TOO_LARGE); /* the NUL counts too */
    buf_free(&b);

    /* Doubling clamped at a bound that is not a power of two. */
    buf_init(&b, 3000);
    CHECK(buf_append(&b, big, 700) == BUF_OK && b.cap == 1024);
    CHECK(buf_append(&b, big, 700) == BUF_OK && b.cap == 2048);
    CHECK(buf_append(&b, big, 700) == BUF_OK && b.cap == 3000);
    CHECK(buf_append(&b, big, 450) == BUF_OK && buf_append(&b, big, 451) == BUF_TOO_LARGE);
    CHECK(b.len == 2550 && b.cap == 3000);
    CHECK(buf_append(&b, big, 450) == BUF_OK && b.len == 3000 && b.cap == 3000);
    buf_free(&b);

    /* No overflow past SIZE_MAX: refused for the bound, nothing allocated. */
    buf_init(&b, 64);
    CHECK(buf_append(&b, "ab", 2) == BUF_OK);
    CHECK(buf_reserve(&b, SIZE_MAX) == BUF_TOO_LARGE);
    CHECK(buf_reserve(&b, SIZE_MAX - 1) == BUF_TOO_LARGE);
    CHECK(buf_reserve_exact(&b, SIZE_MAX) == BUF_TOO_LARGE);
    CHECK(b.len == 2 && b.cap == 64 && memcmp(b.p, "ab", 2) == 0);
    buf_free(&b);

    /* A zeroed buffer (max 0) refuses every growth, but not zero bytes. */
    memset(&b, 0, sizeof b);
    CHECK(buf_append(&b, "a", 1) == BUF_TOO_LARGE && b.p == NULL);
    CHECK(buf_append(&b, NULL, 0) == BUF_OK && b.p == NULL && b.len == 0);
}

static void alloc_failure(void)
{
    struct buf b;
    char *before;
    buf_init(&b, 1 << 20);
    /* The first allocation refused: still nothing. */
    buf_test_fail_allocs = 1;
    CHECK(buf_append(&b, "hello", 5) == BUF_NOMEM);
    CHECK(b.p == NULL && b.len == 0 && b.cap == 0);
    CHECK(buf_append(&b, "hello", 5) == BUF_OK && b.len == 5);
    /* A growth refused: same memory, same bytes, same size. */
    before = b.p;
    buf_test_fail_allocs = 1;
    CHECK(buf_reserve(&b, 5000) == BUF_NOMEM);
    CHECK(b.p == before && b.len == 5 && b.cap == BUF_MIN_CAP && memcmp(b.p, "hello", 5) == 0);
    buf_test_fail_allocs = 1;
    CHECK(buf_reserve_exact(&b, 5000) == BUF_NOMEM && b.cap == BUF_MIN_CAP);
    buf_test_fail_allocs = 1;
    CHECK(buf_printf(&b, "%05000d", 1) == BUF_NOMEM);
    CHECK(b.p == before && b.len == 5 && b.cap == BUF_MIN_CAP && memcmp(b.p, "hello", 5) == 0);
    /* Room already there: no allocation, so no failure. */
    buf_test_fail_allocs = 1;
    CHECK(buf_append(&b, " you", 4) == BUF_OK && b.len == 9);
    buf_test_fail_allocs = 0;
    /* A refused shrink keeps the data in the larger buffer. */
    CHECK(buf_reserve(&b, 5000) == BUF_OK && b.cap == 8192);
    buf_test_fail_allocs = 1;
    buf_shrink(&b, BUF_MIN_CAP);
    CHECK(b.cap == 8192 && b.len == 9 && memcmp(b.p, "hello you", 9) == 0);
    buf_test_fail_allocs = 0;
    buf_free(&b);
}

static void printf_append(void)
{
    struct buf b;
    buf_init(&b, 1 << 16);
    CHECK(buf_printf(&b, "%s=%d", "a", 1) == BUF_OK);
    CHECK(b.len == 3 && strcmp(b.p, "a=1") == 0);
    CHECK(buf_printf(&b, "%s", "") == BUF_OK && b.len == 3 && strcmp(b.p, "a=1") == 0);
    /* Longer than the room there is: formatted again, whole. */
    CHECK(buf_printf(&b, ",%03000d", 7) == BUF_OK);
    CHECK(b.len == 3 + 1 + 3000 && b.p[b.len] == '\0' && b.p[b.len - 1] == '7');
    CHECK(strncmp(b.p, "a=1,000", 7) == 0);
    buf_free(&b);

    /* Past the bound: the data as it was, still NUL-terminated. */
    buf_init(&b, 16);
    CHECK(buf_printf(&b, "%s", "0123456789") == BUF_OK && b.len == 10);
    CHECK(buf_printf(&b, "%s", "abcdef") == BUF_TOO_LARGE); /* 16 + NUL */
    CHECK(b.len == 10 && strcmp(b.p, "0123456789") == 0);
    CHECK(buf_printf(&b, "%s", "abcde") == BUF_OK && b.len == 15);
    CHECK(strcmp(b.p, "0123456789abcde") == 0);
    buf_free(&b);
}

static void reset_shrink_detach(void)
{
    struct buf b;
    char *p;
    size_t len = 99;
    buf_init(&b, 1 << 20);
    /* Detaching an empty buffer hands out nothing. */
    CHECK(buf_detach(&b, &len) == NULL && len == 0);
    CHECK(buf_append(&b, "xyz", 3) == BUF_OK && buf_terminate(&b) == BUF_OK);
    CHECK(b.len == 3 && b.p[3] == '\0');
    /* Reset keeps the memory. */
    p = b.p;
    buf_reset(&b);
    CHECK(b.len == 0 && b.p == p && b.cap == BUF_MIN_CAP);
    CHECK(buf_append(&b, "12345", 5) == BUF_OK && b.p == p);
    /* Shrink: not below the data, not above the allocation. */
    CHECK(buf_reserve(&b, 20000) == BUF_OK && b.cap == 32768);
    buf_shrink(&b, 4);
    CHECK(b.cap == 32768);
    buf_shrink(&b, 1 << 20);
    CHECK(b.cap == 32768);
    buf_shrink(&b, BUF_MIN_CAP);
    CHECK(b.cap == BUF_MIN_CAP && memcmp(b.p, "12345", 5) == 0);
    /* Detach: the caller owns the bytes; the buffer is empty and reusable. */
    p = buf_detach(&b, &len);
    CHECK(p && len == 5 && memcmp(p, "12345", 5) == 0);
    CHECK(b.p == NULL && b.len == 0 && b.cap == 0 && b.max == 1 << 20);
    free(p);
    CHECK(buf_append(&b, "again", 5) == BUF_OK && b.len == 5);
    p = buf_detach(&b, NULL);
    CHECK(p && memcmp(p, "again", 5) == 0 && b.p == NULL);
    free(p);
    /* Shrink to zero frees; empty buffer, zero bytes. */
    CHECK(buf_append(&b, NULL, 0) == BUF_OK && b.p == NULL);
    CHECK(buf_reserve(&b, 0) == BUF_OK && buf_reserve_exact(&b, 0) == BUF_OK && b.p == NULL);
    CHECK(buf_terminate(&b) == BUF_OK && b.p && b.p[0] == '\0' && b.len == 0);
    buf_shrink(&b, 0);
    CHECK(b.p == NULL && b.cap == 0);
    buf_free(&b);
    buf_free(&b); /* twice: harmless */
}

int main(void)
{
    growth();
    bound();
    alloc_failure();
    printf_append();
    reset_shrink_detach();
    return failures ? 1 : 0;
}
