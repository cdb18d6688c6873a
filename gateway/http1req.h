/* http1req.h: a strict HTTP/1.1 request-head parser (RFC 9112), for the
 * gateway's own server (server.c).
 *
 * Owns the syntax of a client's request head and the framing decisions that
 * follow from it: where the head ends (within a bound), the request line,
 * header fields (tokens, values without control bytes, no obs-fold),
 * Content-Length (digits only; repeats must agree), Transfer-Encoding
 * (chunked only, never together with Content-Length), Host (required by
 * HTTP/1.1, at most one, a valid authority), absolute-form targets, the
 * X-Forwarded-For bound, Expect (100-continue or 417) and keep-alive by
 * version and Connection. Strict because the gateway bills on what it reads
 * and forwards it: a head that two parsers could read differently (request
 * smuggling) is refused rather than guessed at. Pure functions on the
 * caller's buffer: no I/O, no allocation. Does not own buffering, the body
 * (http1.c decodes it), nor what the headers mean to the gateway. */
#ifndef GATEWAY_HTTP1REQ_H
#define GATEWAY_HTTP1REQ_H

#include <stddef.h>
#include <stdint.h>

/* A header field: offsets into the parsed buffer, where the name and the
 * value (trimmed of OWS) are NUL-terminated in place. Offsets, not
 * pointers, so the caller may move the buffer. */
typedef struct http1req_field {
    uint32_t name, name_len, value, value_len;
} http1req_field;

typedef struct http1req {
    /* The caller's array of fields and its size, set before parsing. */
    http1req_field *fields;
    size_t max_fields;
    /* Results of http1req_parse. */
    uint32_t method, method_len; /* offsets, NUL-terminated in place */
    uint32_t target, target_len;
    int minor;              /* HTTP/1.<minor>: 0 or 1 (1.2 and up read as 1.1) */
    size_t nfields;         /* fields used */
    int64_t content_length; /* -1: none */
    int chunked;            /* Transfer-Encoding: chunked */
    int keep_alive;         /* the connection may carry another request after this one */
    int expect_continue;    /* Expect: 100-continue (HTTP/1.1 only) */
    int absolute;           /* the target was absolute-form, now rewritten to origin-form */
    /* The request's host: the absolute-form target's authority, else the
     * Host header's value (RFC 9112 3.2.2; NUL-terminated in place, checked
     * by http1_authority_ok); host_len 0 when there is none (HTTP/1.0). */
    uint32_t host, host_len;
    const char *error;      /* what was wrong, when parsing failed (static text) */
    const char *error_code; /* its JSON error code: "bad_request", ... */
} http1req;

/* The bound on a request's X-Forwarded-For values together (joined with
 * ", "): the gateway appends the peer's address to them, and a chain of
 * honest proxies is a few addresses. Past it, 431. */
#define HTTP1REQ_XFF_MAX 2048

/* Where the head in BUF[0..LEN) ends: the offset just past its empty line
 * (up to 8 bytes of empty lines before the request line are part of it;
 * more make a head without a request line, which the parse refuses); 0
 * when it is not complete yet; -1 when it is not complete within MAX
 * bytes. *SCAN is where
 * to resume looking (0 for a new head; the caller keeps it between calls
 * while the bytes before it stay the same). Lines end in CRLF or LF. */
long http1req_head_end(const char *buf, size_t len, size_t max, size_t *scan);

/* Parses the complete head BUF[0..LEN) (as found by http1req_head_end) into
 * H, NUL-terminating the method, target, names and values in place; an
 * absolute-form target (http or https) is rewritten in place to
 * origin-form. 0, or the HTTP status to answer (400, 417, 431 too many
 * fields or X-Forwarded-For past HTTP1REQ_XFF_MAX, 501 transfer coding,
 * 505 version) with H->error and H->error_code set. */
int http1req_parse(char *buf, size_t len, http1req *h);

/* The value of the first field named NAME (ignoring case) in H, parsed from
 * BUF, or NULL. */
const char *http1req_get(const char *buf, const http1req *h, const char *name);

#endif
