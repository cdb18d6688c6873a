/* transcript.h: records what an http1_parser run reports (events, header
 * strings, body bytes, the final state) as bytes, so that two runs over the
 * same input fed differently can be compared with memcmp. Header-only: each
 * harness is one translation unit. */
#ifndef TESTS_FUZZ_TRANSCRIPT_H
#define TESTS_FUZZ_TRANSCRIPT_H

#include "gateway/http1.h"

#include <stdlib.h>
#include <string.h>

typedef struct transcript {
    char *b;
    size_t len, cap;
    size_t body; /* body bytes seen */
} transcript;

static void ts_put(transcript *t, const void *p, size_t n)
{
    if (t->len + n > t->cap) {
        size_t cap = t->cap ? t->cap : 256;
        while (cap < t->len + n)
            cap *= 2;
        t->b = realloc(t->b, cap);
        if (!t->b) abort();
        t->cap = cap;
    }
    memcpy(t->b + t->len, p, n);
    t->len += n;
}

/* One event; body bytes of consecutive events are merged (how a body is cut
 * into events depends on the reads, its bytes do not). */
static void ts_event(transcript *t, const http1_parser *p, enum http1_ev e, const http1_event *ev)
{
    char tag = (char)('A' + e);
    /* The final event is compared apart (see ts_prefix). */
    if (e == HTTP1_MORE || e == HTTP1_DONE || e == HTTP1_TOO_LARGE || e == HTTP1_MALFORMED) return;
    if (e == HTTP1_BODY) {
        t->body += ev->len;
        ts_put(t, ev->data, ev->len);
        return;
    }
    ts_put(t, "\n", 1);
    ts_put(t, &tag, 1);
    if (e == HTTP1_HEADER) {
        ts_put(t, ev->name, ev->name_len);
        ts_put(t, ":", 1);
        ts_put(t, ev->value, ev->value_len);
    } else if (e == HTTP1_HEAD_DONE) {
        int v[5] = {p->status, p->minor, (int)p->framing, p->keep_alive, (int)p->keepalive_s};
        ts_put(t, v, sizeof v);
        ts_put(t, &p->content_length, sizeof p->content_length);
    }
    ts_put(t, "\n", 1);
}

static int ts_same(const transcript *a, const transcript *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->b, b->b, a->len) == 0);
}

/* 1 if A is a prefix of B: a parser that has the whole input may see a
 * close-delimited body past its bound at once and refuse it before
 * handing out any of it, where one reading byte by byte hands out what
 * fits first. Both refuse; the caller drops what it got. */
static int ts_prefix(const transcript *a, const transcript *b)
{
    return a->len <= b->len && (a->len == 0 || memcmp(a->b, b->b, a->len) == 0);
}

static int ts_final(enum http1_ev e)
{
    return e == HTTP1_DONE || e == HTTP1_TOO_LARGE || e == HTTP1_MALFORMED;
}

/* Runs P over IN[0..N) as a caller that has all of it: calls again after
 * every event until HTTP1_MORE or a final one. Returns the last event;
 * *CONSUMED is how many bytes the parser took. CHECK sees every event. */
static enum http1_ev
ts_run_whole(http1_parser *p, const char *in, size_t n, transcript *t, size_t *consumed,
             void (*check)(const http1_parser *, enum http1_ev, const http1_event *))
{
    size_t off = 0;
    enum http1_ev e;
    for (;;) {
        http1_event ev;
        size_t used = 0;
        memset(&ev, 0, sizeof ev);
        e = http1_next(p, in + off, n - off, &used, &ev);
        if (used > n - off) abort();
        off += used;
        if (check) check(p, e, &ev);
        ts_event(t, p, e, &ev);
        if (e == HTTP1_MORE || ts_final(e)) break;
    }
    *consumed = off;
    return e;
}

/* The same, the input arriving one byte at a time into a buffer that keeps
 * the bytes not consumed (as server.c and proxy.c do). */
static enum http1_ev ts_run_bytewise(http1_parser *p, const char *in, size_t n, transcript *t,
                                     size_t *consumed)
{
    size_t taken = 0; /* consumed by the parser */
    enum http1_ev e = HTTP1_MORE;
    for (size_t have = 1; have <= n; have++) {
        for (;;) {
            http1_event ev;
            size_t used = 0;
            /* An exact-size copy of what is pending: a read past it is an
             * ASan report, not a silent look at the next byte. */
            size_t pend = have - taken;
            char *buf = malloc(pend ? pend : 1);
            if (!buf) abort();
            memcpy(buf, in + taken, pend);
            memset(&ev, 0, sizeof ev);
            e = http1_next(p, buf, pend, &used, &ev);
            if (used > pend) abort();
            ts_event(t, p, e, &ev);
            free(buf);
            taken += used;
            if (e == HTTP1_MORE || ts_final(e)) break;
        }
        if (ts_final(e)) break;
    }
    *consumed = taken;
    return e;
}

#endif
