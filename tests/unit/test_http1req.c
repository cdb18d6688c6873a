/* test_http1req.c: the request-head parser (gateway/http1req.c) on byte
 * strings: where a head ends (fed at every split, leading empty lines, LF
 * line ends, the bound), the request line, header syntax (obs-fold, NUL,
 * bare CR, whitespace before the colon), Content-Length (digits only,
 * repeats), Transfer-Encoding (chunked only, not with Content-Length, not in
 * HTTP/1.0), Host (a valid authority), absolute-form targets (rewritten to
 * origin-form), the X-Forwarded-For bound, Expect, keep-alive by version
 * and Connection, the field count bound, in-place NUL termination and
 * lookups, 100,000 mutated heads (reproducible: fixed seed); and the
 * request-body start of http1.c (http1_init_body) the server uses after
 * it, CRLF only in a chunked body. Needs no service. Exit 0 when every
 * check holds. */
#include "gateway/http1.h"
#include "gateway/http1req.h"
#include "tests/unit/check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEAD 1024
#define NFIELDS 8

typedef struct parsed {
    char buf[4096];
    http1req h;
    http1req_field fields[NFIELDS];
    int status;
} parsed;

/* Parses the complete head S[0..LEN) (it may hold NULs): the status, or -1
 * when the head does not end within MAX_HEAD. */
static int parse_n(const char *s, size_t len, parsed *p)
{
    size_t scan = 0;
    long end;
    memset(p, 0, sizeof *p);
    memcpy(p->buf, s, len);
    end = http1req_head_end(p->buf, len, MAX_HEAD, &scan);
    if (end <= 0) return -1;
    p->h.fields = p->fields;
    p->h.max_fields = NFIELDS;
    p->status = http1req_parse(p->buf, (size_t)end, &p->h);
    return p->status;
}

/* Same, for a NUL-terminated head. */
static int parse(const char *s, parsed *p)
{
    return parse_n(s, strlen(s), p);
}

static void test_head_end(void)
{
    const char *req = "\r\n\nGET / HTTP/1.1\r\nHost: x\r\nA: b\r\n\r\nNEXT";
    size_t len = strlen(req), scan;
    long want = (long)(strstr(req, "NEXT") - req), end;
    /* Whole, then cut at every byte: complete exactly once all of it is there. */
    for (size_t cut = 0; cut <= len; cut++) {
        scan = 0;
        end = http1req_head_end(req, cut, MAX_HEAD, &scan);
        if (cut < (size_t)want) {
            CHECK(end == 0);
            /* Resuming from SCAN with the rest finds the same end. */
            end = http1req_head_end(req, len, MAX_HEAD, &scan);
        }
        CHECK(end == want);
    }
    /* One byte at a time, resuming. */
    scan = 0;
    end = 0;
    for (size_t n = 1; n <= len && end == 0; n++)
        end = http1req_head_end(req, n, MAX_HEAD, &scan);
    CHECK(end == want);
    /* LF-only line ends. */
    scan = 0;
    CHECK(http1req_head_end("GET / HTTP/1.0\n\nX", 17, MAX_HEAD, &scan) == 16);
    /* A CR that is not part of CRLF does not end a head. */
    scan = 0;
    CHECK(http1req_head_end("GET / HTTP/1.0\r\n\r\r\n", 19, MAX_HEAD, &scan) == 0);
    /* Only empty lines: not a head yet. */
    scan = 0;
    CHECK(http1req_head_end("\r\n\r\n\n", 5, MAX_HEAD, &scan) == 0);
    /* Many empty lines: a few lead a request; past 8 bytes of them an empty
     * line ends a head without a request line, which the parse refuses. A
     * whole bound of them is found at once (this was quadratic). */
    {
        static const char lead[] = "\r\n\r\n\r\n\nGET / HTTP/1.0\r\n\r\n";
        scan = 0;
        CHECK(http1req_head_end(lead, sizeof lead - 1, MAX_HEAD, &scan) == (long)sizeof lead - 1);
    }
    {
        static char lfs[MAX_HEAD];
        http1req h = {0};
        http1req_field f[4];
        memset(lfs, '\n', sizeof lfs);
        scan = 0;
        CHECK(http1req_head_end(lfs, sizeof lfs, MAX_HEAD, &scan) == 10);
        h.fields = f;
        h.max_fields = 4;
        CHECK(http1req_parse(lfs, 10, &h) == 400);
    }
    /* The bound: a head that does not end within MAX is refused. */
    {
        char big[MAX_HEAD + 64];
        memset(big, 'a', sizeof big);
        memcpy(big, "GET / HTTP/1.1\r\nX: ", 19);
        scan = 0;
        CHECK(http1req_head_end(big, MAX_HEAD - 1, MAX_HEAD, &scan) == 0);
        scan = 0;
        CHECK(http1req_head_end(big, MAX_HEAD, MAX_HEAD, &scan) == -1);
        scan = 0;
        CHECK(http1req_head_end(big, sizeof big, MAX_HEAD, &scan) == -1);
        /* Ending exactly at the bound is fine. */
        memcpy(big + MAX_HEAD - 4, "\r\n\r\n", 4);
        scan = 0;
        CHECK(http1req_head_end(big, sizeof big, MAX_HEAD, &scan) == MAX_HEAD);
    }
}

static void test_good(void)
{
    parsed p;
    const char *v;
    CHECK(parse("\r\nPOST /v1/a?b=c%20d HTTP/1.1\r\nHost: example\r\nX-Empty:\r\n"
                "X-Pad:  \t padded value \t \r\ncontent-length: 12\r\nX-Latin: caf\xe9\r\n\r\n",
                &p) == 0);
    CHECK(strcmp(p.buf + p.h.method, "POST") == 0 && p.h.method_len == 4);
    CHECK(strcmp(p.buf + p.h.target, "/v1/a?b=c%20d") == 0);
    CHECK(p.h.minor == 1 && p.h.keep_alive == 1 && p.h.content_length == 12 && !p.h.chunked);
    CHECK(p.h.nfields == 5);
    CHECK(strcmp(p.buf + p.fields[0].name, "Host") == 0);
    CHECK(strcmp(p.buf + p.fields[1].value, "") == 0 && p.fields[1].value_len == 0);
    v = http1req_get(p.buf, &p.h, "x-pad");
    CHECK(v && strcmp(v, "padded value") == 0);
    v = http1req_get(p.buf, &p.h, "X-LATIN");
    CHECK(v && strcmp(v, "caf\xe9") == 0); /* obs-text passes */
    CHECK(http1req_get(p.buf, &p.h, "missing") == NULL);
    /* LF line ends, HTTP/1.0 needs no Host. */
    CHECK(parse("GET / HTTP/1.0\nX-A: 1\n\n", &p) == 0);
    CHECK(p.h.minor == 0 && p.h.keep_alive == 0 && p.h.content_length == -1);
    /* Asterisk and authority-form targets pass the parser (request.c
     * refuses them: not a path); absolute-form: test_absolute. */
    CHECK(parse("OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", &p) == 0);
    CHECK(strcmp(p.buf + p.h.target, "*") == 0 && !p.h.absolute);
    CHECK(parse("GET /a:b HTTP/1.1\r\nHost: x\r\n\r\n", &p) == 0 && !p.h.absolute);
    CHECK(strcmp(p.buf + p.h.host, "x") == 0 && p.h.host_len == 1);
    /* HTTP/1.2 reads as 1.1. */
    CHECK(parse("GET / HTTP/1.2\r\nHost: x\r\n\r\n", &p) == 0 && p.h.minor == 1);
}

static void test_request_line(void)
{
    parsed p;
    const char *bad[] = {
        "GET\r\nHost: x\r\n\r\n",
        "GET /\r\nHost: x\r\n\r\n",
        "GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1 \r\nHost: x\r\n\r\n",
        " GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET / http/1.1\r\nHost: x\r\n\r\n",
        "GET / HTTP/1.10\r\nHost: x\r\n\r\n",
        "GET / HTTP/1\r\nHost: x\r\n\r\n",
        "GET / HTTP/x.1\r\nHost: x\r\n\r\n",
        "G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /a\tb HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /a\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n",
        /* review r2: a fragment ("/a#/b" routed here as "/a#/b", run as "/a"
         * by frameworks that cut it off) */
        "GET /v1/devices/d1#x HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /v1/devices/a#/status HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /# HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /a?b#c HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET http://h/v1/devices/d1#x HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET http://h#/v1/devices/d1 HTTP/1.1\r\nHost: x\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = parse(bad[i], &p);
        if (rc != 400) fprintf(stderr, "request line case %zu: %d\n", i, rc);
        CHECK(rc == 400);
        CHECK(p.h.error && strcmp(p.h.error_code, "bad_request") == 0);
    }
    CHECK(parse("GET / HTTP/2.0\r\nHost: x\r\n\r\n", &p) == 505);
    CHECK(parse("GET / HTTP/0.9\r\nHost: x\r\n\r\n", &p) == 505);
    /* A NUL in the request line. */
    CHECK(parse_n("GET /a\0b HTTP/1.1\r\nHost: x\r\n\r\n", 31, &p) == 400);
}

static void test_fields(void)
{
    parsed p;
    const char *bad[] = {
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",  /* obs-fold */
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\tfolded\r\n\r\n", /* obs-fold, tab */
        "GET / HTTP/1.1\r\n Host: x\r\n\r\n",                      /* fold of the request line */
        "GET / HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n",            /* space before the colon */
        "GET / HTTP/1.1\r\nHost: x\r\nX A: 1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\n: 1\r\n\r\n", /* empty name */
        "GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", /* bare CR */
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01"
        "b\r\n\r\n",                                       /* control byte */
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7f\r\n\r\n", /* DEL */
        "GET / HTTP/1.1\r\nHost: x\r\nX@A: 1\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = parse(bad[i], &p);
        if (rc != 400) fprintf(stderr, "field case %zu: %d\n", i, rc);
        CHECK(rc == 400);
    }
    /* A NUL in a value is refused, not cut short. */
    {
        static const char nul[] = "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n";
        CHECK(parse_n(nul, sizeof nul - 1, &p) == 400);
        static const char nul2[] = "GET / HTTP/1.1\r\nHost: x\r\nX-\0A: ab\r\n\r\n";
        CHECK(parse_n(nul2, sizeof nul2 - 1, &p) == 400);
    }
    /* Too many fields: 431. NFIELDS fit. */
    {
        char req[1024];
        size_t n = (size_t)snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: x\r\n");
        for (int i = 1; i < NFIELDS; i++)
            n += (size_t)snprintf(req + n, sizeof req - n, "X-%d: v\r\n", i);
        snprintf(req + n, sizeof req - n, "\r\n");
        CHECK(parse(req, &p) == 0 && p.h.nfields == NFIELDS);
        snprintf(req + n, sizeof req - n, "X-Last: v\r\n\r\n");
        CHECK(parse(req, &p) == 431);
        CHECK(strcmp(p.h.error_code, "header_too_large") == 0);
    }
}

static void test_framing(void)
{
    parsed p;
    const char *h = "POST / HTTP/1.1\r\nHost: x\r\n";
    char req[512];
#define REQ(extra) (snprintf(req, sizeof req, "%s%s\r\n", h, extra), req)
    CHECK(parse(REQ("Content-Length: 0\r\n"), &p) == 0 && p.h.content_length == 0);
    CHECK(parse(REQ("Content-Length: 007\r\n"), &p) == 0 && p.h.content_length == 7);
    CHECK(parse(REQ("Content-Length: 5\r\nContent-Length: 5\r\n"), &p) == 0 &&
          p.h.content_length == 5);
    CHECK(parse(REQ("Content-Length: 5\r\nContent-Length: 6\r\n"), &p) == 400);
    CHECK(parse(REQ("Content-Length: 5, 5\r\n"), &p) == 400);
    CHECK(parse(REQ("Content-Length: -1\r\n"), &p) == 400);
    CHECK(parse(REQ("Content-Length: +1\r\n"), &p) == 400);
    CHECK(parse(REQ("Content-Length: 0x10\r\n"), &p) == 400);
    CHECK(parse(REQ("Content-Length: 1 2\r\n"), &p) == 400);
    CHECK(parse(REQ("Content-Length:\r\n"), &p) == 400);
    CHECK(parse(REQ("Content-Length: 99999999999999999999\r\n"), &p) == 400);
    CHECK(parse(REQ("Content-Length: 999999999999999999\r\n"), &p) == 0); /* the server: 413 */
    CHECK(parse(REQ("Transfer-Encoding: chunked\r\n"), &p) == 0 && p.h.chunked &&
          p.h.content_length == -1);
    CHECK(parse(REQ("Transfer-Encoding: Chunked\r\n"), &p) == 0 && p.h.chunked);
    /* Smuggling: both framings, in either order. */
    CHECK(parse(REQ("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"), &p) == 400);
    CHECK(parse(REQ("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"), &p) == 400);
    CHECK(parse(REQ("Content-Length: 3\r\nTransfer-Encoding: gzip\r\n"), &p) == 400);
    CHECK(parse(REQ("Transfer-Encoding: chunked, chunked\r\n"), &p) == 400);
    CHECK(parse(REQ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"), &p) == 400);
    CHECK(parse(REQ("Transfer-Encoding: chunked, gzip\r\n"), &p) == 400);
    CHECK(parse(REQ("Transfer-Encoding: ,\r\n"), &p) == 400);
    /* Codings we cannot undo. */
    CHECK(parse(REQ("Transfer-Encoding: gzip\r\n"), &p) == 501);
    CHECK(parse(REQ("Transfer-Encoding: gzip, chunked\r\n"), &p) == 501);
    CHECK(strcmp(p.h.error_code, "not_implemented") == 0);
    /* HTTP/1.0 has no chunked. */
    CHECK(parse("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", &p) == 400);
#undef REQ
}

static void test_host_expect_keepalive(void)
{
    parsed p;
    CHECK(parse("GET / HTTP/1.1\r\n\r\n", &p) == 400);
    CHECK(parse("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", &p) == 400);
    /* Review r2: two Host lines are a 400 in any request, HTTP/1.0 too
     * (RFC 9112 3.2). */
    CHECK(parse("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", &p) == 400);
    CHECK(parse("GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n", &p) == 400);
    CHECK(parse("GET http://h/ HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", &p) == 400);
    CHECK(parse("GET / HTTP/1.0\r\nHost: a\r\n\r\n", &p) == 0);
    /* The Host value: an authority (RFC 9112 3.2, RFC 3986 3.2.2), never
     * empty for an "http" target URI (RFC 9110 4.2.1); HTTP/1.0 may leave
     * it out, but not send an invalid one. */
    {
        static const char *const bad[] = {
            "", "a b", "x, y", "x,y", ":80", "h:99999", "u@h", "[::1", "h/p", "h\xe9",
        };
        char req[256];
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            int rc;
            snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", bad[i]);
            rc = parse(req, &p);
            if (rc != 400) fprintf(stderr, "Host \"%s\": %d\n", bad[i], rc);
            CHECK(rc == 400 && strcmp(p.h.error_code, "bad_request") == 0);
            snprintf(req, sizeof req, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", bad[i]);
            CHECK(parse(req, &p) == 400);
        }
        CHECK(parse("GET / HTTP/1.1\r\nhost:\r\n\r\n", &p) == 400);
        CHECK(parse("GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", &p) == 0);
        CHECK(strcmp(p.buf + p.h.host, "[::1]:8080") == 0 && p.h.host_len == 10);
        CHECK(parse("GET / HTTP/1.1\r\nHost: api.example.com:\r\n\r\n", &p) == 0);
        CHECK(parse("GET / HTTP/1.0\r\n\r\n", &p) == 0 && p.h.host_len == 0);
    }
    CHECK(parse("GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n", &p) == 0 &&
          p.h.expect_continue);
    CHECK(parse("GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\n\r\n", &p) == 0 &&
          p.h.expect_continue);
    CHECK(parse("GET / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", &p) == 417);
    CHECK(strcmp(p.h.error_code, "expectation_failed") == 0);
    CHECK(parse("GET / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n", &p) == 0 && !p.h.expect_continue);
    CHECK(parse("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &p) == 0 &&
          !p.h.keep_alive);
    CHECK(parse("GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, CLOSE\r\n\r\n", &p) == 0 &&
          !p.h.keep_alive);
    CHECK(parse("GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", &p) == 0 &&
          p.h.keep_alive);
    CHECK(parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", &p) == 0 && p.h.keep_alive);
    CHECK(parse("GET / HTTP/1.0\r\nConnection: Keep-Alive, close\r\n\r\n", &p) == 0 &&
          !p.h.keep_alive);
    CHECK(parse("GET / HTTP/1.0\r\n\r\n", &p) == 0 && !p.h.keep_alive);
}

/* Absolute-form targets (RFC 9112 3.2.2): http and https, rewritten in
 * place to origin-form; the authority replaces Host (which HTTP/1.1 still
 * needs, valid); other schemes, userinfo, a bad authority are 400. */
static void test_absolute(void)
{
    parsed p;
    static const struct {
        const char *target, *path, *host;
    } good[] = {
        {"http://x/a", "/a", "x"},
        {"http://api.example.com:8080/v1/devices/d1?x=1&y=%20", "/v1/devices/d1?x=1&y=%20",
         "api.example.com:8080"},
        {"HTTPS://[::1]:443/a/b", "/a/b", "[::1]:443"},
        {"hTtP://h", "/", "h"},
        {"http://h?q=1", "/?q=1", "h"},
        {"http://h/", "/", "h"},
        {"http://h//a", "//a", "h"}, /* request.c refuses "//" */
    };
    static const char *const bad[] = {
        "ftp://x/a",    "file:///etc/passwd", "javascript:alert(1)", "http:/x/a",     "http:x/a",
        "http://",      "http:///a",          "http://u@x/a",        "http://u:p@x/", "http://a b/",
        "http://x,y/a", "http://x:99999/a",   "http://[::1/a",       "h2c://x/a",
    };
    char req[512];
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: other\r\nX-A: 1\r\n\r\n",
                 good[i].target);
        if (parse(req, &p) != 0) {
            fprintf(stderr, "absolute-form refused: %s (%s)\n", good[i].target, p.h.error);
            failures++;
            continue;
        }
        CHECK(p.h.absolute);
        CHECK(strcmp(p.buf + p.h.target, good[i].path) == 0 &&
              p.h.target_len == strlen(good[i].path));
        CHECK(strcmp(p.buf + p.h.host, good[i].host) == 0 && p.h.host_len == strlen(good[i].host));
        CHECK(strcmp(p.buf + p.h.method, "GET") == 0);
        /* The fields after the request line are untouched. */
        CHECK(strcmp(http1req_get(p.buf, &p.h, "host"), "other") == 0);
        CHECK(strcmp(http1req_get(p.buf, &p.h, "x-a"), "1") == 0);
    }
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc;
        snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", bad[i]);
        rc = parse(req, &p);
        if (rc != 400) fprintf(stderr, "absolute-form case %s: %d\n", bad[i], rc);
        CHECK(rc == 400 && strcmp(p.h.error_code, "bad_request") == 0);
    }
    /* HTTP/1.1 needs a Host, valid, even when the target names one. */
    CHECK(parse("GET http://x/a HTTP/1.1\r\n\r\n", &p) == 400);
    CHECK(parse("GET http://x/a HTTP/1.1\r\nHost: a b\r\n\r\n", &p) == 400);
    CHECK(parse("GET http://x/a HTTP/1.1\r\nHost:\r\n\r\n", &p) == 400);
    /* HTTP/1.0 does not. */
    CHECK(parse("GET http://x/a HTTP/1.0\r\n\r\n", &p) == 0 && p.h.absolute);
    CHECK(strcmp(p.buf + p.h.host, "x") == 0 && strcmp(p.buf + p.h.target, "/a") == 0);
}

/* Parses the head REQ, bigger than parse() allows: the status. */
static int parse_big(const char *req, http1req *h, http1req_field *f, size_t nf)
{
    static char buf[8192];
    size_t len = strlen(req), scan = 0;
    long end;
    memcpy(buf, req, len);
    end = http1req_head_end(buf, len, sizeof buf, &scan);
    if (end <= 0) return -1;
    memset(h, 0, sizeof *h);
    h->fields = f;
    h->max_fields = nf;
    return http1req_parse(buf, (size_t)end, h);
}

/* X-Forwarded-For: its values together are bounded (the peer is appended). */
static void test_xff_bound(void)
{
    static char req[8192];
    http1req_field f[NFIELDS];
    http1req h;
    char v[HTTP1REQ_XFF_MAX + 2];
    /* One value of exactly the bound passes; one byte more is 431. */
    memset(v, '1', HTTP1REQ_XFF_MAX);
    v[HTTP1REQ_XFF_MAX] = '\0';
    snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: %s\r\n\r\n", v);
    CHECK(parse_big(req, &h, f, NFIELDS) == 0);
    v[HTTP1REQ_XFF_MAX] = '1';
    v[HTTP1REQ_XFF_MAX + 1] = '\0';
    snprintf(req, sizeof req, "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: %s\r\n\r\n", v);
    CHECK(parse_big(req, &h, f, NFIELDS) == 431);
    CHECK(strcmp(h.error_code, "header_too_large") == 0);
    /* Several headers count together, with the ", " that joins them. */
    memset(v, '2', HTTP1REQ_XFF_MAX / 2 - 1);
    v[HTTP1REQ_XFF_MAX / 2 - 1] = '\0';
    snprintf(req, sizeof req,
             "GET / HTTP/1.1\r\nHost: x\r\nx-forwarded-for: %s\r\n"
             "X-Forwarded-For: %s\r\n\r\n",
             v, v);
    CHECK(parse_big(req, &h, f, NFIELDS) == 0); /* 2 x (MAX/2 - 1) + 2 */
    v[HTTP1REQ_XFF_MAX / 2 - 1] = '2';
    v[HTTP1REQ_XFF_MAX / 2] = '\0';
    snprintf(req, sizeof req,
             "GET / HTTP/1.1\r\nHost: x\r\nx-forwarded-for: %s\r\n"
             "X-Forwarded-For: %s\r\n\r\n",
             v, v);
    CHECK(parse_big(req, &h, f, NFIELDS) == 431);
}

/* The body side the server runs after a head: http1_init_body. */
static void test_bodies(void)
{
    http1_parser bp;
    http1_event ev;
    size_t used;
    char out[64];
    size_t olen = 0, off = 0;
    const char *in = "3;ext=\"x\"\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\nNEXT";
    enum http1_ev e;
    http1_init_body(&bp, HTTP1_CHUNKED, 0, 64, 16);
    while ((e = http1_next(&bp, in + off, strlen(in) - off, &used, &ev)) == HTTP1_BODY) {
        memcpy(out + olen, ev.data, ev.len);
        olen += ev.len;
        off += used;
    }
    off += used;
    CHECK(e == HTTP1_DONE && olen == 5 && memcmp(out, "abcde", 5) == 0);
    CHECK(strcmp(in + off, "NEXT") == 0);
    /* Past the body bound. */
    http1_init_body(&bp, HTTP1_CHUNKED, 0, 64, 4);
    CHECK(http1_next(&bp, "5\r\nabcde\r\n", 10, &used, &ev) == HTTP1_TOO_LARGE);
    /* Trailers past their bound. */
    http1_init_body(&bp, HTTP1_CHUNKED, 0, 8, 16);
    CHECK(http1_next(&bp, "0\r\nTrailer: long\r\n\r\n", 21, &used, &ev) == HTTP1_TOO_LARGE);
    /* A bad chunk size, a missing CRLF after data. */
    http1_init_body(&bp, HTTP1_CHUNKED, 0, 64, 16);
    CHECK(http1_next(&bp, "zz\r\n", 4, &used, &ev) == HTTP1_MALFORMED);
    http1_init_body(&bp, HTTP1_CHUNKED, 0, 64, 16);
    e = http1_next(&bp, "1\r\naXY", 6, &used, &ev);
    CHECK(e == HTTP1_BODY);
    CHECK(http1_next(&bp, "XY", 2, &used, &ev) == HTTP1_MALFORMED);
    /* Content-Length bodies. */
    http1_init_body(&bp, HTTP1_LENGTH, 3, 64, 16);
    CHECK(http1_next(&bp, "abcNEXT", 7, &used, &ev) == HTTP1_BODY && ev.len == 3 && used == 3);
    CHECK(http1_next(&bp, "NEXT", 4, &used, &ev) == HTTP1_DONE && used == 0);
    http1_init_body(&bp, HTTP1_LENGTH, 0, 64, 16);
    CHECK(http1_next(&bp, "", 0, &used, &ev) == HTTP1_DONE);
    /* A lone LF ending a chunk-size line or the data (RFC 9112 7.1): a
     * front end that reads it differently sees another body and another
     * request after it. Refused wherever the bytes are cut. */
    {
        static const char *const lf[] = {
            "3\nabc\r\n0\r\n\r\n",         "3;x=y\nabc\r\n0\r\n\r\n", "3\r\nabc\n0\r\n\r\n",
            "3\r\nabc\r\n0\n\r\n",         "3\r\nabc\r\n0\r\n\n",     "3\r\nabc\r\n0\r\nT: 1\n\r\n",
            "3\r\nabc\r\n0\r\nT: 1\r\n\n", "3\r\nabc\r\r\n0\r\n\r\n",
        };
        for (size_t i = 0; i < sizeof lf / sizeof lf[0]; i++) {
            size_t len = strlen(lf[i]);
            for (size_t cut = 0; cut <= len; cut++) {
                size_t at = 0, have = cut;
                int rounds = 0;
                http1_init_body(&bp, HTTP1_CHUNKED, 0, 64, 16);
                e = HTTP1_MORE;
                /* Feed [0, cut), then all: unconsumed bytes are offered again. */
                for (;;) {
                    e = http1_next(&bp, lf[i] + at, have - at, &used, &ev);
                    at += used;
                    if (e == HTTP1_BODY) continue;
                    if (e != HTTP1_MORE || ++rounds > 1) break;
                    have = len;
                }
                if (e != HTTP1_MALFORMED) {
                    fprintf(stderr, "chunked case %zu cut at %zu: %d\n", i, cut, (int)e);
                    failures++;
                    break;
                }
            }
        }
    }
}

/* ---- random heads ---------------------------------------------------- */

static uint64_t fuzz_state = 0x9e3779b97f4a7c15u; /* fixed seed: reproducible */

static uint32_t fuzz_next(void)
{
    fuzz_state ^= fuzz_state << 13;
    fuzz_state ^= fuzz_state >> 7;
    fuzz_state ^= fuzz_state << 17;
    return (uint32_t)(fuzz_state >> 16);
}

/* Checks what a successful parse promises the server: method and target
 * non-empty and NUL-terminated in place, every field a token name and a
 * value without control bytes but tab, inside the head, and one framing. */
static void fuzz_check_parsed(const char *buf, size_t end, const http1req *h)
{
    CHECK(h->method_len > 0 && h->method + h->method_len < end &&
          buf[h->method + h->method_len] == 0);
    CHECK(h->target_len > 0 && h->target + h->target_len < end &&
          buf[h->target + h->target_len] == 0);
    /* An absolute-form target became origin-form, its host valid. */
    CHECK(!h->absolute || buf[h->target] == '/');
    CHECK(h->host_len == 0 || (h->host + h->host_len < end && buf[h->host + h->host_len] == 0 &&
                               http1_authority_ok(buf + h->host, h->host_len)));
    CHECK(h->minor == 0 || h->minor == 1);
    CHECK(h->nfields <= NFIELDS);
    CHECK(h->content_length >= -1);
    CHECK(!(h->chunked && h->content_length >= 0));
    for (size_t i = 0; i < h->nfields && i < NFIELDS; i++) {
        const http1req_field *f = &h->fields[i];
        CHECK(f->name_len > 0 && f->name + f->name_len < end && buf[f->name + f->name_len] == 0);
        CHECK(f->value + f->value_len < end && buf[f->value + f->value_len] == 0);
        CHECK(http1_token(buf + f->name, f->name_len));
        for (uint32_t k = 0; k < f->value_len; k++) {
            unsigned char c = (unsigned char)buf[f->value + k];
            CHECK(c == '\t' || (c >= 0x20 && c != 0x7f));
        }
    }
}

/* Mutated heads (bytes replaced by the ones parsers get wrong: CR, LF, NUL,
 * spaces, colons, digits, DEL, high bytes; bytes inserted and deleted):
 * where the head ends must not depend on how the bytes arrived, and a parse
 * must either refuse with one of its statuses or keep its promises. Run
 * under ASan by `make test`: no read or write out of the buffer. */
static void test_fuzz(void)
{
    static const char *const seeds[] = {
        "GET /v1/devices/d1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n",
        "POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
        "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.0\nConnection: keep-alive\n\n",
        "\r\nHEAD /x?y=z HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        "GET http://h:80/a?b HTTP/1.1\r\nHost: [::1]:80\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    };
    static const char tricky[] = "\r\n\0 \t:,09a\x7f\x80";
    static parsed p;
    char buf[512];
    int statuses_ok = 1;
    for (int iter = 0; iter < 100000; iter++) {
        const char *seed = seeds[fuzz_next() % (sizeof seeds / sizeof seeds[0])];
        size_t len = strlen(seed), scan = 0, cut;
        long whole, part;
        int nmut = 1 + (int)(fuzz_next() % 4);
        memcpy(buf, seed, len);
        for (int m = 0; m < nmut && len > 1; m++) {
            size_t at = fuzz_next() % len;
            char c = tricky[fuzz_next() % (sizeof tricky - 1)];
            switch (fuzz_next() % 3) {
            case 0:
                buf[at] = c;
                break;
            case 1:
                if (len < sizeof buf - 1) {
                    memmove(buf + at + 1, buf + at, len - at);
                    buf[at] = c;
                    len++;
                }
                break;
            default:
                memmove(buf + at, buf + at + 1, len - at - 1);
                len--;
            }
        }
        whole = http1req_head_end(buf, len, MAX_HEAD, &scan);
        CHECK(whole >= 0 && (size_t)whole <= len);
        /* The same bytes in two reads: the same answer. */
        cut = fuzz_next() % (len + 1);
        scan = 0;
        part = http1req_head_end(buf, cut, MAX_HEAD, &scan);
        if (part == 0) part = http1req_head_end(buf, len, MAX_HEAD, &scan);
        CHECK(part == whole);
        if (whole > 0) {
            int st = parse_n(buf, len, &p);
            if (st == 0)
                fuzz_check_parsed(p.buf, (size_t)whole, &p.h);
            else if (st != 400 && st != 417 && st != 431 && st != 501 && st != 505)
                statuses_ok = 0;
            else
                CHECK(p.h.error && p.h.error_code);
        }
    }
    CHECK(statuses_ok);
}

int main(void)
{
    test_head_end();
    test_good();
    test_request_line();
    test_fields();
    test_framing();
    test_host_expect_keepalive();
    test_absolute();
    test_xff_bound();
    test_bodies();
    test_fuzz();
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("http1req: all checks passed\n");
    return 0;
}
