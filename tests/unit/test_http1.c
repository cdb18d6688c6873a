/* test_http1.c: the upstream response parser (gateway/http1.c) on byte
 * strings: Content-Length, chunked (with extensions and trailers, CRLF
 * only), close-delimited bodies, 1xx skipping, HEAD/204/304, the head and body bounds,
 * malformed status lines, chunk sizes and lengths, conflicting framing, and
 * keep-alive decisions; and the syntax checks shared with proxy.c and
 * request.c (lists, tokens, field values, targets, authorities). Every well-formed case
 * is also fed split at every byte boundary and one byte at a time, the way
 * reads can cut it. Needs no service. Exit 0 when every check holds. */
#include "gateway/http1.h"
#include "tests/unit/check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEAD 4096
#define MAX_BODY 1024

typedef struct result {
    int ev; /* HTTP1_DONE, HTTP1_TOO_LARGE, HTTP1_MALFORMED, or HTTP1_MORE if unfinished */
    int status;
    int keep_alive;
    int framing;
    int64_t content_length;
    unsigned keepalive_s;
    char hdrs[2048]; /* "name=value\n" per header */
    size_t hlen;
    char body[4096];
    size_t blen;
    size_t leftover; /* bytes after the response */
} result;

typedef struct opts {
    int head;
    size_t max_head;
    uint64_t max_body;
    int eof; /* the server closes after the input */
} opts;

static void append(char *dst, size_t *len, size_t cap, const char *s, size_t n)
{
    if (*len + n >= cap) n = cap - 1 - *len;
    memcpy(dst + *len, s, n);
    *len += n;
    dst[*len] = '\0';
}

/* Feeds IN in pieces ending at CUTS (ascending, the last one == len), the
 * way proxy.c does: unconsumed bytes are kept and offered again with more. */
static void run_cuts(const char *in, size_t len, const size_t *cuts, int ncuts, const opts *o,
                     result *r)
{
    http1_parser p;
    char *buf = malloc(len + 1);
    size_t have = 0, fed = 0;
    memset(r, 0, sizeof *r);
    r->ev = HTTP1_MORE;
    http1_init(&p, o->head, o->max_head ? o->max_head : MAX_HEAD,
               o->max_body ? o->max_body : MAX_BODY);
    for (int i = 0; i < ncuts; i++) {
        size_t off = 0;
        memcpy(buf + have, in + fed, cuts[i] - fed);
        have += cuts[i] - fed;
        fed = cuts[i];
        for (;;) {
            size_t used = 0;
            http1_event ev;
            enum http1_ev e = http1_next(&p, buf + off, have - off, &used, &ev);
            CHECK(used <= have - off);
            off += used;
            if (e == HTTP1_MORE) break;
            if (e == HTTP1_HEADER) {
                append(r->hdrs, &r->hlen, sizeof r->hdrs, ev.name, ev.name_len);
                append(r->hdrs, &r->hlen, sizeof r->hdrs, "=", 1);
                append(r->hdrs, &r->hlen, sizeof r->hdrs, ev.value, ev.value_len);
                append(r->hdrs, &r->hlen, sizeof r->hdrs, "\n", 1);
                continue;
            }
            if (e == HTTP1_HEAD_DONE) {
                r->status = p.status;
                r->framing = p.framing;
                r->content_length = p.content_length;
                continue;
            }
            if (e == HTTP1_BODY) {
                CHECK(ev.len > 0);
                append(r->body, &r->blen, sizeof r->body, ev.data, ev.len);
                continue;
            }
            /* Final: it repeats, and consumes nothing more. */
            r->ev = e;
            r->keep_alive = p.keep_alive;
            r->keepalive_s = p.keepalive_s;
            r->leftover = (have - off) + (len - fed);
            {
                size_t u = 99;
                http1_event ev2;
                CHECK(http1_next(&p, buf + off, have - off, &u, &ev2) == e);
                CHECK(u == 0);
            }
            free(buf);
            return;
        }
        memmove(buf, buf + off, have - off);
        have -= off;
    }
    if (o->eof) {
        r->ev = http1_eof(&p);
        r->keep_alive = p.keep_alive;
    }
    free(buf);
}

static void run(const char *in, size_t len, const opts *o, result *r)
{
    size_t cut = len;
    run_cuts(in, len, &cut, 1, o, r);
}

static int same(const result *a, const result *b)
{
    return a->ev == b->ev && a->status == b->status && a->keep_alive == b->keep_alive &&
           a->framing == b->framing && a->hlen == b->hlen &&
           memcmp(a->hdrs, b->hdrs, a->hlen) == 0 && a->blen == b->blen &&
           memcmp(a->body, b->body, a->blen) == 0 && a->leftover == b->leftover;
}

/* Parses IN whole, then split in two at every byte, then a byte at a time:
 * all must agree. Returns the whole-input result in R. */
static void run_all(const char *in, size_t len, const opts *o, result *r)
{
    result s;
    size_t *cuts = malloc((len + 1) * sizeof *cuts);
    run(in, len, o, r);
    for (size_t at = 1; at < len; at++) {
        size_t two[2] = {at, len};
        run_cuts(in, len, two, 2, o, &s);
        if (!same(r, &s)) {
            fprintf(stderr, "split at %zu of %zu differs: %.60s\n", at, len, in);
            failures++;
            break;
        }
    }
    for (size_t i = 0; i < len; i++)
        cuts[i] = i + 1;
    if (len > 0) {
        run_cuts(in, len, cuts, (int)len, o, &s);
        if (!same(r, &s)) {
            fprintf(stderr, "byte at a time differs: %.60s\n", in);
            failures++;
        }
    }
    free(cuts);
}

#define S(lit) lit, sizeof(lit) - 1

static const opts plain = {0, 0, 0, 0};
static const opts with_eof = {0, 0, 0, 1};

static void test_content_length(void)
{
    result r;
    run_all(S("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"),
            &plain, &r);
    CHECK(r.ev == HTTP1_DONE);
    CHECK(r.status == 200 && r.keep_alive == 1 && r.framing == HTTP1_LENGTH);
    CHECK(strcmp(r.body, "hello") == 0);
    CHECK(strcmp(r.hdrs, "Content-Type=text/plain\nContent-Length=5\n") == 0);
    CHECK(r.leftover == 0);
    /* Bytes after the response are left to the caller (it will not reuse). */
    run(S("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && strcmp(r.body, "ok") == 0 && r.leftover == 8);
    /* Zero length: done at the end of the head. */
    run_all(S("HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.status == 201 && r.blen == 0 && r.keep_alive == 1);
    /* Lone LF line ends, no reason phrase, OWS trimmed. */
    run_all(S("HTTP/1.1 200\nX-A: \t v w \t\nContent-Length: 1\n\nz"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.status == 200 && strcmp(r.body, "z") == 0);
    CHECK(strcmp(r.hdrs, "X-A=v w\nContent-Length=1\n") == 0);
    /* Repeats of one value are one length, in one header or several. */
    run_all(S("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && strcmp(r.body, "abc") == 0);
    run_all(S("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && strcmp(r.body, "abc") == 0);
    /* Empty list elements beside a real one are ignored (RFC 9110 5.6.1). */
    run_all(S("HTTP/1.1 200 OK\r\nContent-Length: ,3,\r\n\r\nabc"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.framing == HTTP1_LENGTH && strcmp(r.body, "abc") == 0);
    /* Cut short: the end of file is an error, not the end of the body. */
    run(S("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"), &with_eof, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
    run(S("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n"), &with_eof, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
    run(S(""), &with_eof, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
}

static void test_bad_lengths(void)
{
    static const char *const bad[] = {
        "HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 5 5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551621\r\n\r\nhello",
        /* Two different lengths: two framings, refused. */
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
        /* A list with no element gives no length: not "no header" (which
         * would read the body to the close). */
        "HTTP/1.1 200 OK\r\nContent-Length: ,\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: \t, ,,\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: ,\r\n\r\nhello",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        result r;
        run(bad[i], strlen(bad[i]), &plain, &r);
        if (r.ev != HTTP1_MALFORMED) {
            fprintf(stderr, "not refused: %s\n", bad[i]);
            failures++;
        }
    }
}

static void test_chunked(void)
{
    result r;
    run_all(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-B: 1\r\n\r\n"
              "5\r\nhello\r\n"
              "6;name=value;flag\r\n world\r\n"
              "a ; ext=\"q\"\r\n0123456789\r\n"
              "0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n"),
            &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.status == 200 && r.framing == HTTP1_CHUNKED);
    CHECK(strcmp(r.body, "hello world0123456789") == 0);
    CHECK(r.keep_alive == 1);
    /* Trailers are not reported as headers. */
    CHECK(strcmp(r.hdrs, "Transfer-Encoding=chunked\nX-B=1\n") == 0);
    CHECK(r.leftover == 0);
    /* Upper-case hex, leading zeros, LF-only head lines, mixed case coding. */
    run_all(S("HTTP/1.1 200 OK\nTransfer-Encoding: Chunked\n\n00A\r\n0123456789\r\n000\r\n\r\n"),
            &plain, &r);
    CHECK(r.ev == HTTP1_DONE && strcmp(r.body, "0123456789") == 0);
    /* The chunked body's own lines end in CRLF only (RFC 9112 7.1): a lone
     * LF after a chunk size, after chunk data, after a trailer or as the
     * final line is refused, whichever way the bytes arrive. */
    {
        static const char *const lf[] = {
            "00A\n0123456789\r\n0\r\n\r\n",    /* chunk-size line */
            "5;ext=1\nhello\r\n0\r\n\r\n",     /* ... with an extension */
            "5\r\nhello\n0\r\n\r\n",           /* after the data */
            "5\r\nhello\r\n0\n\r\n",           /* the last chunk */
            "5\r\nhello\r\n0\r\n\n",           /* the final empty line */
            "5\r\nhello\r\n0\r\nX-T: 1\n\r\n", /* a trailer */
            "5\r\nhello\r\n0\r\nX-T: 1\r\n\n", /* the empty line after trailers */
        };
        for (size_t i = 0; i < sizeof lf / sizeof lf[0]; i++) {
            char in[256];
            int n = snprintf(in, sizeof in,
                             "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s", lf[i]);
            run_all(in, (size_t)n, &plain, &r);
            if (r.ev != HTTP1_MALFORMED) {
                fprintf(stderr, "lone LF in a chunked body not refused (%d): case %zu\n", r.ev, i);
                failures++;
            }
        }
    }
    /* An empty chunked body. */
    run_all(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.blen == 0 && r.keep_alive == 1);
    /* Cut in the middle of a chunk. */
    run(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"), &with_eof, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
    run(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"), &with_eof, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
}

static void test_bad_chunks(void)
{
    static const char *const bad[] = {
        "zz\r\nhello\r\n0\r\n\r\n",               /* not hex */
        "\r\nhello\r\n0\r\n\r\n",                 /* empty size */
        "-5\r\nhello\r\n0\r\n\r\n",               /* sign */
        "0x5\r\nhello\r\n0\r\n\r\n",              /* C notation */
        " 5\r\nhello\r\n0\r\n\r\n",               /* leading space */
        "5 x\r\nhello\r\n0\r\n\r\n",              /* junk after the size */
        "5\r\nhelloX\r\n0\r\n\r\n",               /* data longer than the size */
        "5\r\nhello\rX0\r\n\r\n",                 /* CR without LF after the data */
        "5;a\x01\r\nhello\r\n0\r\n\r\n",          /* control character in an extension */
        "5\r\nhello\r\n0\r\nbad trailer\r\n\r\n", /* trailer without a colon */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char in[256];
        result r;
        int n = snprintf(in, sizeof in, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s",
                         bad[i]);
        run(in, (size_t)n, &plain, &r);
        if (r.ev != HTTP1_MALFORMED) {
            fprintf(stderr, "chunk not refused (%d): %s\n", r.ev, bad[i]);
            failures++;
        }
    }
    /* A size line past the bound (long extensions) is refused too. */
    {
        char in[8192];
        size_t n = (size_t)snprintf(in, sizeof in,
                                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;");
        result r;
        memset(in + n, 'e', 5000);
        n += 5000;
        run(in, n, &plain, &r);
        CHECK(r.ev == HTTP1_MALFORMED);
    }
    /* Sizes that cannot fit the body bound: too large, even if absurd. */
    {
        result r;
        run(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              "ffffffffffffffffffffffffffffffff\r\nx"),
            &plain, &r);
        CHECK(r.ev == HTTP1_TOO_LARGE);
    }
}

static void test_codings(void)
{
    result r;
    /* Transfer-Encoding and Content-Length: chunked wins, no reuse. */
    run_all(S("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
              "5\r\nhello\r\n0\r\n\r\n"),
            &plain, &r);
    CHECK(r.ev == HTTP1_DONE && strcmp(r.body, "hello") == 0);
    CHECK(r.framing == HTTP1_CHUNKED && r.keep_alive == 0);
    /* Codings we cannot undo, or chunked twice: refused. */
    run(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx"), &plain, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
    run(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"), &plain, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
    run(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
          "0\r\n\r\n"),
        &plain, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
    run(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\n0\r\n\r\n"), &plain, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
    /* An empty list is malformed even after a good header. */
    run(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: ,\r\n\r\n"
          "0\r\n\r\n"),
        &plain, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
}

static void test_close_delimited(void)
{
    result r;
    run_all(S("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome body"), &with_eof, &r);
    CHECK(r.ev == HTTP1_DONE && r.framing == HTTP1_CLOSE && r.keep_alive == 0);
    CHECK(strcmp(r.body, "some body") == 0);
    /* Until the close, the body is not complete. */
    run(S("HTTP/1.1 200 OK\r\n\r\nsome body"), &plain, &r);
    CHECK(r.ev == HTTP1_MORE && strcmp(r.body, "some body") == 0);
    /* An empty one. */
    run_all(S("HTTP/1.0 200 OK\r\n\r\n"), &with_eof, &r);
    CHECK(r.ev == HTTP1_DONE && r.blen == 0 && r.keep_alive == 0);
}

static void test_interim(void)
{
    result r;
    run_all(S("HTTP/1.1 100 Continue\r\n\r\n"
              "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
              "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
            &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.status == 200 && strcmp(r.body, "ok") == 0);
    CHECK(strcmp(r.hdrs, "Content-Length=2\n") == 0); /* no Link from the 103 */
    /* Framing headers of a 1xx do not frame the final response. */
    run_all(S("HTTP/1.1 100 Continue\r\nContent-Length: 50\r\n\r\n"
              "HTTP/1.1 204 No Content\r\n\r\n"),
            &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.status == 204 && r.blen == 0 && r.keep_alive == 0);
    /* Only interim answers so far: still waiting. */
    run(S("HTTP/1.1 102 Processing\r\n\r\n"), &plain, &r);
    CHECK(r.ev == HTTP1_MORE && r.status == 0);
    /* 101 answers an Upgrade we never asked for. */
    run(S("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"), &plain, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
}

static void test_bodiless(void)
{
    opts head = {1, 0, 0, 0};
    result r;
    /* HEAD: the length describes the GET answer, no body follows. Never
     * reused: a server that sends the body anyway, later, must not have it
     * read as the next call's response. */
    run_all(S("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"), &head, &r);
    CHECK(r.ev == HTTP1_DONE && r.blen == 0 && r.keep_alive == 0 && r.framing == HTTP1_NONE);
    CHECK(r.leftover == 0);
    CHECK(r.content_length == 100); /* what the gateway tells its client */
    /* Even a length past the body bound, or chunked. */
    run(S("HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n"), &head, &r);
    CHECK(r.ev == HTTP1_DONE && r.blen == 0 && r.content_length == 99999999);
    run(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), &head, &r);
    CHECK(r.ev == HTTP1_DONE && r.blen == 0 && r.content_length == -1);
    /* Both: the GET answer would be chunked, so there is no length to tell. */
    run(S("HTTP/1.1 200 OK\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n"), &head, &r);
    CHECK(r.ev == HTTP1_DONE && r.blen == 0 && r.content_length == -1);
    /* A malformed length is malformed for HEAD too. */
    run(S("HTTP/1.1 200 OK\r\nContent-Length: ,\r\n\r\n"), &head, &r);
    CHECK(r.ev == HTTP1_MALFORMED);
    run_all(S("HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.status == 204 && r.blen == 0 && r.keep_alive == 0);
    run_all(S("HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\nETag: \"x\"\r\n\r\n"),
            &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.status == 304 && r.blen == 0 && r.keep_alive == 0);
    /* An empty body by Content-Length is not bodiless: reused. */
    run_all(S("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.framing == HTTP1_NONE && r.keep_alive == 1);
    /* A 204 followed by bytes: the caller sees them left over (no reuse). */
    run(S("HTTP/1.1 204 No Content\r\n\r\njunk"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.leftover == 4);
}

static void test_bounds(void)
{
    opts small_head = {0, 64, 0, 0};
    opts small_body = {0, 0, 10, 1};
    result r;
    char big[8192];
    size_t n;
    /* A head exactly at the bound fits; one byte less of bound does not. */
    {
        const char *head = "HTTP/1.1 200 OK\r\nX-Pad: 0123456789012345678901\r\n"
                           "Content-Length: 0\r\n\r\n";
        size_t hl = strlen(head);
        run(head, hl, &(opts){0, hl, 0, 0}, &r);
        CHECK(r.ev == HTTP1_DONE);
        run(head, hl, &(opts){0, hl - 1, 0, 0}, &r);
        CHECK(r.ev == HTTP1_TOO_LARGE);
    }
    /* A header line with no end in sight: too large as soon as it cannot fit. */
    n = (size_t)snprintf(big, sizeof big, "HTTP/1.1 200 OK\r\nX-Big: ");
    memset(big + n, 'a', 200);
    n += 200;
    run(big, n, &small_head, &r);
    CHECK(r.ev == HTTP1_TOO_LARGE);
    /* Many small headers add up. */
    n = (size_t)snprintf(big, sizeof big, "HTTP/1.1 200 OK\r\n");
    for (int i = 0; i < 10; i++)
        n += (size_t)snprintf(big + n, sizeof big - n, "X-%d: v\r\n", i);
    run(big, n, &small_head, &r);
    CHECK(r.ev == HTTP1_TOO_LARGE);
    /* 1xx heads count too. */
    n = 0;
    for (int i = 0; i < 5; i++)
        n += (size_t)snprintf(big + n, sizeof big - n, "HTTP/1.1 100 Continue\r\n\r\n");
    run(big, n, &small_head, &r);
    CHECK(r.ev == HTTP1_TOO_LARGE);
    /* So do trailers. */
    n = (size_t)snprintf(big, sizeof big,
                         "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n");
    for (int i = 0; i < 10; i++)
        n += (size_t)snprintf(big + n, sizeof big - n, "X-T%d: v\r\n", i);
    run(big, n, &small_head, &r);
    CHECK(r.ev == HTTP1_TOO_LARGE);
    /* Body bound: exactly the bound is fine, one byte more is not, in every framing. */
    run_all(S("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"), &small_body, &r);
    CHECK(r.ev == HTTP1_DONE && r.blen == 10);
    run(S("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n0123456789a"), &small_body, &r);
    CHECK(r.ev == HTTP1_TOO_LARGE && r.blen == 0); /* refused before any body byte */
    run_all(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n5\r\n56789\r\n"
              "0\r\n\r\n"),
            &small_body, &r);
    CHECK(r.ev == HTTP1_DONE && r.blen == 10);
    run(S("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n6\r\n56789a\r\n"
          "0\r\n\r\n"),
        &small_body, &r);
    CHECK(r.ev == HTTP1_TOO_LARGE);
    run_all(S("HTTP/1.1 200 OK\r\n\r\n0123456789"), &small_body, &r);
    CHECK(r.ev == HTTP1_DONE && r.blen == 10);
    run(S("HTTP/1.1 200 OK\r\n\r\n0123456789a"), &small_body, &r);
    CHECK(r.ev == HTTP1_TOO_LARGE);
}

static void test_bad_heads(void)
{
    static const char *const bad[] = {
        "HTTP/1.1 20 OK\r\n\r\n",
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/2 200 OK\r\n\r\n",
        "HTTP/2.0 200 OK\r\n\r\n",
        "HTTP/1.x 200 OK\r\n\r\n",
        "HTTX/1.1 200 OK\r\n\r\n",
        "http/1.1 200 OK\r\n\r\n",
        "HTTP/1.1 200OK\r\n\r\n",
        "HTTP/1.1  200 OK\r\n\r\n",
        "HTTP/1.1 099 Low\r\n\r\n",
        "HTTP/1.1 600 High\r\n\r\n",
        "HTTP/1.1 2x0 OK\r\n\r\n",
        "\r\nHTTP/1.1 200 OK\r\n\r\n",
        "HTTP/1.1 200 O\rK\r\n\r\n",
        "ICY 200 OK\r\n\r\n",
        "garbage\r\n\r\n",
        /* header syntax */
        "HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n", /* obs-fold */
        "HTTP/1.1 200 OK\r\nX-A : a\r\nContent-Length: 0\r\n\r\n",      /* space before colon */
        "HTTP/1.1 200 OK\r\n: a\r\nContent-Length: 0\r\n\r\n",          /* empty name */
        "HTTP/1.1 200 OK\r\nno colon\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n", /* bare CR */
        "HTTP/1.1 200 OK\r\nX-A: a\r\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX(A): a\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 100 Continue\r\nbad header\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        result r;
        run(bad[i], strlen(bad[i]), &with_eof, &r);
        if (r.ev != HTTP1_MALFORMED) {
            fprintf(stderr, "head not refused (%d): %s\n", r.ev, bad[i]);
            failures++;
        }
    }
    /* NUL in a value. */
    {
        static const char nul[] = "HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 0\r\n\r\n";
        result r;
        run(nul, sizeof nul - 1, &plain, &r);
        CHECK(r.ev == HTTP1_MALFORMED);
    }
}

static void test_keep_alive(void)
{
    result r;
    run_all(S("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.keep_alive == 0);
    run_all(S("HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 2\r\n\r\nok"),
            &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.keep_alive == 0);
    run_all(S("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.keep_alive == 0);
    run_all(S("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"), &plain,
            &r);
    CHECK(r.ev == HTTP1_DONE && r.keep_alive == 0);
    run_all(S("HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nContent-Length: 2\r\n\r\nok"),
            &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.keep_alive == 1 && r.keepalive_s == 5);
    run(S("HTTP/1.1 200 OK\r\nKeep-Alive: timeout=x\r\nContent-Length: 2\r\n\r\nok"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.keep_alive == 1 && r.keepalive_s == 0);
    /* An HTTP/1.9 server speaks 1.1 to us. */
    run(S("HTTP/1.9 200 OK\r\nContent-Length: 2\r\n\r\nok"), &plain, &r);
    CHECK(r.ev == HTTP1_DONE && r.keep_alive == 1);
}

static void test_lists(void)
{
    const char *e;
    size_t pos = 0, len, n = 0;
    static const char list[] = " ,a, b\t,,\tc d ,";
    static const char *const want[] = {"a", "b", "c d"};
    while (http1_list_next(list, sizeof list - 1, &pos, &e, &len)) {
        CHECK(n < 3 && len == strlen(want[n]) && memcmp(e, want[n], len) == 0);
        n++;
    }
    CHECK(n == 3 && pos == sizeof list - 1);
    pos = 0;
    CHECK(!http1_list_next(S(" , ,\t"), &pos, &e, &len));
    /* Connection names: case-insensitive, a tab or space ends a name too. */
    CHECK(http1_list_has(S("keep-alive, X-Foo"), S("x-foo")));
    CHECK(http1_list_has(S("X-Hop\t, keep-alive"), S("x-hop")));
    CHECK(http1_list_has(S("\tx-baz\t,X-BEFORE ,"), S("x-before")));
    CHECK(!http1_list_has(S("X-Foobar, close"), S("x-foo")));
    CHECK(!http1_list_has(S("X-Foo"), S("x-foobar")));
    CHECK(!http1_list_has(S(""), S("x")));
    CHECK(!http1_list_has(S(","), S("x")));
    /* The other shared checks. */
    CHECK(http1_token(S("X-Custom_1.~")) && !http1_token(S("")) && !http1_token(S("X Bad")));
    CHECK(!http1_token(S("X(Bad)")) && !http1_token(S("X-Bad ")));
    CHECK(http1_text_ok(S("a\tb \xe9")) && !http1_text_ok(S("a\x7f")) && !http1_text_ok(S("a\rb")));
    CHECK(!http1_text_ok("a\0b", 3) && !http1_text_ok(S("\x1b[31m")));
    CHECK(http1_target_ok(S("/a/b?c=d&e=%20")) && !http1_target_ok(S("/a b")));
    CHECK(!http1_target_ok(S("/a\x7f")) && !http1_target_ok(S("/\xc3\xa9")));
}

/* Host values and absolute-form authorities (RFC 3986 3.2.2-3.2.3). */
static void test_authority(void)
{
    static const char *const good[] = {
        "x",
        "example.com",
        "EXAMPLE.com.",
        "a-b_c~d",
        "127.0.0.1",
        "127.0.0.1:8080",
        "host:",
        "host:0",
        "host:65535",
        "[::1]",
        "[::1]:443",
        "[2001:db8::7]:1",
        "[::ffff:10.0.0.1]",
        "x%41y",
        "a!$&'()*+;=b",
    };
    static const char *const bad[] = {
        "",           ":80",        "a b",         "x, y",     "x,y",  "a\tb", "user@host",
        "host:80:80", "host:65536", "host:123456", "host:8a",  "[::1", "::1",  "[]",
        "[::1]x",     "[zz::1]",    "[v1.x]",      "x%4",      "x%zz", "a/b",  "a?b",
        "a#b",        "a\"b",       "a<b",         "\xc3\xa9",
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        if (!http1_authority_ok(good[i], strlen(good[i]))) {
            fprintf(stderr, "authority refused: %s\n", good[i]);
            failures++;
        }
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (http1_authority_ok(bad[i], strlen(bad[i]))) {
            fprintf(stderr, "authority accepted: %s\n", bad[i]);
            failures++;
        }
    CHECK(!http1_authority_ok("a\0b", 3));
}

int main(void)
{
    test_authority();
    test_content_length();
    test_bad_lengths();
    test_chunked();
    test_bad_chunks();
    test_codings();
    test_close_delimited();
    test_interim();
    test_bodiless();
    test_bounds();
    test_bad_heads();
    test_keep_alive();
    test_lists();
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("http1: all checks passed\n");
    return 0;
}
