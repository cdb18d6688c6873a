/* http1.h: a strict, bounded HTTP/1.1 response parser.
 *
 * Owns the framing rules of an upstream response (RFC 9112): the status
 * line, header syntax, interim 1xx responses (skipped), bodiless answers
 * (HEAD, 204, 304; their connection is never reused), Content-Length,
 * chunked transfer coding (extensions accepted, trailers skipped, its lines
 * ending in CRLF only), close-delimited bodies, whether the connection may
 * carry another request, and the bounds on head and body size; and the
 * HTTP syntax checks the request side shares with it (tokens, field
 * values, request targets, comma-separated lists, hosts), so that there is
 * one definition of each. Pure
 * functions on caller buffers: no I/O, no allocation, no global state. Does
 * not own buffering (the caller keeps the bytes not consumed and calls again
 * once more have arrived), nor what headers mean to the gateway (proxy.c
 * decides which ones it keeps). */
#ifndef GATEWAY_HTTP1_H
#define GATEWAY_HTTP1_H

#include <stddef.h>
#include <stdint.h>

enum http1_ev {
    HTTP1_MORE,      /* every byte given was consumed or is a partial line: read more */
    HTTP1_HEADER,    /* a header of the final response: name, value */
    HTTP1_HEAD_DONE, /* the final response's head is complete: status and framing known */
    HTTP1_BODY,      /* body bytes (de-chunked): data, len, pointing into the input */
    HTTP1_DONE,      /* the response is complete */
    HTTP1_TOO_LARGE, /* head or body past its bound */
    HTTP1_MALFORMED, /* syntax or framing error: the connection cannot be trusted */
};

enum http1_framing {
    HTTP1_NONE,    /* no body: HEAD, 204, 304, or Content-Length: 0 */
    HTTP1_LENGTH,  /* Content-Length */
    HTTP1_CHUNKED, /* Transfer-Encoding: chunked */
    HTTP1_CLOSE,   /* neither: the body ends when the server closes */
};

typedef struct http1_event {
    const char *name, *value; /* HTTP1_HEADER, not NUL-terminated; value trimmed */
    size_t name_len, value_len;
    const char *data; /* HTTP1_BODY */
    size_t len;
} http1_event;

typedef struct http1_parser {
    /* Limits, set by http1_init. */
    size_t max_head;   /* bytes of status lines, headers and trailers together */
    uint64_t max_body; /* de-chunked body bytes */
    int head_request;  /* the request was HEAD: the response has no body */
    /* Results, valid from HTTP1_HEAD_DONE on. */
    int status;
    int minor;                  /* HTTP/1.<minor> of the final response */
    enum http1_framing framing; /* how the body is delimited */
    int64_t content_length;     /* -1 when the response has none or is chunked;
                                   for HEAD, the length a GET answer would have */
    int keep_alive;             /* the connection may carry another request after DONE
                                   (never after a bodiless HEAD, 204 or 304 answer) */
    unsigned keepalive_s;       /* Keep-Alive: timeout=N, 0 when absent */
    /* Internal. */
    int state;
    int conn_close, te_seen, te_chunked;
    size_t head_bytes;
    uint64_t remaining; /* of the Content-Length body or the current chunk */
    uint64_t body_bytes;
} http1_parser;

/* Prepares P for one response. HEAD_REQUEST: the request was HEAD. */
void http1_init(http1_parser *p, int head_request, size_t max_head, uint64_t max_body);

/* Prepares P for the body of a message whose head was parsed elsewhere (a
 * client's request: server.c): FRAMING HTTP1_LENGTH with LENGTH bytes, or
 * HTTP1_CHUNKED (MAX_HEAD then bounds the trailers, which are skipped).
 * http1_next then reports HTTP1_BODY events and HTTP1_DONE. */
void http1_init_body(http1_parser *p, enum http1_framing framing, uint64_t length, size_t max_head,
                     uint64_t max_body);

/* Parses BUF[0..LEN) up to the next event; *USED is how many bytes it
 * consumed (they may be discarded; body data and header strings of the
 * event point into them). Call again with the rest of the input after every
 * event but HTTP1_MORE; HTTP1_DONE, HTTP1_TOO_LARGE and HTTP1_MALFORMED are
 * final and repeat on every later call. */
enum http1_ev http1_next(http1_parser *p, const char *buf, size_t len, size_t *used,
                         http1_event *ev);

/* The server closed the connection: HTTP1_DONE if that completes the
 * response (close-delimited body, or the response was already complete),
 * HTTP1_MALFORMED if it was cut short. */
enum http1_ev http1_eof(http1_parser *p);

/* ---- syntax checks, shared with proxy.c and request.c ---------------- */

/* 1 if C is a tchar (RFC 9110 5.6.2). */
int http1_tchar(unsigned char c);
/* 1 if S[0..N) is a token: one or more tchar (header names, methods). */
int http1_token(const char *s, size_t n);
/* 1 if S[0..N) may stand in a field value, reason phrase or chunk extension:
 * no control character but HTAB (so no CR, LF, NUL or DEL); bytes >= 0x80
 * (obs-text) pass. */
int http1_text_ok(const char *s, size_t n);
/* 1 if S[0..N) may go verbatim on a request line as (part of) its target:
 * printable ASCII, no space (RFC 9112 3.2). */
int http1_target_ok(const char *s, size_t n);
/* 1 if S[0..N) is an authority as a Host header or an absolute-form target
 * gives it: uri-host [":" port] (RFC 3986 3.2.2, 3.2.3; RFC 9110 7.2): a
 * non-empty reg-name (unreserved, sub-delims, %XX) or IPv4 address, or an
 * IPv6 literal in brackets; a port of at most 65535, or none. No userinfo,
 * and no ',' although reg-name allows it: Host is a singleton field, and a
 * comma is where an intermediary joined two of them into a list. */
int http1_authority_ok(const char *s, size_t n);
/* 1 if S[0..N) equals LIT[0..LITN) ignoring ASCII case. */
int http1_is(const char *s, size_t n, const char *lit, size_t litn);
#define HTTP1_IS(s, n, lit) http1_is((s), (n), (lit), sizeof(lit) - 1)
/* The next element of the comma-separated list S[0..N) from *POS on (start
 * at 0): empty elements are skipped and spaces and tabs trimmed (RFC 9110
 * 5.6.1). 1 with *ELEM and *ELEM_LEN set, or 0 at the end of the list. */
int http1_list_next(const char *s, size_t n, size_t *pos, const char **elem, size_t *elem_len);
/* 1 if NAME[0..NAME_LEN) is an element of the list S[0..N), ignoring case
 * (a Connection header's names). */
int http1_list_has(const char *s, size_t n, const char *name, size_t name_len);

#endif
