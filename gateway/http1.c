/* http1.c: strict, bounded HTTP/1.1 response parsing (see http1.h).
 *
 * Strict because the gateway bills on what it reads here: a response whose
 * framing is ambiguous (conflicting Content-Length, a transfer coding other
 * than chunked, obs-fold, bare CR, a bad chunk size) is refused rather than
 * guessed at, and the caller closes the connection, so the next response on
 * it cannot be misread. Lines of a head (status line, headers, 1xx heads)
 * may end in CRLF or a lone LF (RFC 9112 2.2); the lines of a chunked body
 * (chunk-size lines, the CRLF after chunk data, trailers and the final empty
 * line) must end in CRLF (RFC 9112 7.1), in both directions: a front end
 * that reads a lone LF differently would see another body, or another
 * request after it (request smuggling), and no honest peer sends one there. */
#include "gateway/http1.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <strings.h>

/* A chunk-size line with its extensions; chunk extensions are ignored, and
 * no honest server needs more. */
#define HTTP1_CHUNK_LINE_MAX 4096
/* Keep-Alive: timeout above this is taken as this (the caller caps it anyway). */
#define HTTP1_KEEPALIVE_MAX_S 3600

enum {
    S_STATUS,
    S_HEADER,
    S_INTERIM, /* headers of a 1xx response: checked, not reported */
    S_LENGTH,
    S_CHUNK_SIZE,
    S_CHUNK_DATA,
    S_CHUNK_CRLF,
    S_TRAILER,
    S_CLOSE,
    S_DONE,
    S_TOO_LARGE,
    S_MALFORMED,
};

void http1_init(http1_parser *p, int head_request, size_t max_head, uint64_t max_body)
{
    memset(p, 0, sizeof *p);
    p->max_head = max_head;
    p->max_body = max_body;
    p->head_request = head_request;
    p->content_length = -1;
    p->state = S_STATUS;
}

void http1_init_body(http1_parser *p, enum http1_framing framing, uint64_t length, size_t max_head,
                     uint64_t max_body)
{
    http1_init(p, 0, max_head, max_body);
    p->framing = framing;
    if (framing == HTTP1_CHUNKED) {
        p->state = S_CHUNK_SIZE;
    } else {
        p->remaining = length;
        p->content_length = (int64_t)length;
        p->state = length ? S_LENGTH : S_DONE;
    }
}

static int http1_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int http1_hex(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int http1_tchar(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || http1_digit((char)c) || c == '-')
        return 1;
    return c != '\0' && strchr("!#$%&'*+.^_`|~", c) != NULL;
}

int http1_token(const char *s, size_t n)
{
    if (n == 0) return 0;
    for (size_t i = 0; i < n; i++)
        if (!http1_tchar((unsigned char)s[i])) return 0;
    return 1;
}

/* This is also what rejects a bare CR and NUL in a response. */
int http1_text_ok(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f) return 0;
    }
    return 1;
}

int http1_target_ok(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] <= ' ' || (unsigned char)s[i] >= 0x7f) return 0;
    return 1;
}

/* RFC 3986 unreserved and sub-delims, the bytes of a reg-name, but ','
 * (see http1_authority_ok). */
static int http1_regname_char(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || http1_digit((char)c)) return 1;
    return c != '\0' && strchr("-._~!$&'()*+;=", c) != NULL;
}

int http1_authority_ok(const char *s, size_t n)
{
    size_t h = n, i;
    /* The port: after the last ':' that is not inside an IP literal. */
    for (i = n; i > 0 && http1_digit(s[i - 1]); i--)
        ;
    if (i > 0 && s[i - 1] == ':') {
        size_t digits = n - i;
        unsigned long port = 0;
        if (digits > 5) return 0;
        for (size_t k = i; k < n; k++)
            port = port * 10 + (unsigned long)(s[k] - '0');
        if (port > 65535) return 0;
        h = i - 1;
    }
    if (h == 0) return 0; /* an "http" URI has a host (RFC 9110 4.2.1) */
    if (s[0] == '[') {
        /* IPv6 only (IPvFuture has no users): checked by the C library. */
        char ip[64];
        struct in6_addr a6;
        if (h < 4 || s[h - 1] != ']' || h - 2 >= sizeof ip) return 0;
        memcpy(ip, s + 1, h - 2);
        ip[h - 2] = '\0';
        return inet_pton(AF_INET6, ip, &a6) == 1;
    }
    for (i = 0; i < h; i++) {
        if (s[i] == '%') {
            if (i + 2 >= h || http1_hex(s[i + 1]) < 0 || http1_hex(s[i + 2]) < 0) return 0;
            i += 2;
        } else if (!http1_regname_char((unsigned char)s[i])) {
            return 0;
        }
    }
    return 1;
}

static int http1_ows(char c)
{
    return c == ' ' || c == '\t';
}

int http1_is(const char *s, size_t n, const char *lit, size_t litn)
{
    return n == litn && strncasecmp(s, lit, n) == 0;
}

/* The next line of BUF[0..LEN), at most LIMIT bytes with its terminator:
 * 1 and its length without CR LF (*LINE_LEN) and with it (*USED); 0 when
 * the line is not complete yet; -1 when it cannot fit in LIMIT. */
static int http1_line(const char *buf, size_t len, size_t limit, size_t *line_len, size_t *used)
{
    const char *nl = memchr(buf, '\n', len < limit ? len : limit);
    size_t n;
    if (!nl) return len >= limit ? -1 : 0;
    n = (size_t)(nl - buf);
    *used = n + 1;
    if (n > 0 && buf[n - 1] == '\r') n--;
    *line_len = n;
    return 1;
}

int http1_list_next(const char *s, size_t n, size_t *pos, const char **elem, size_t *elem_len)
{
    size_t i = *pos;
    while (i < n) {
        size_t b, e;
        while (i < n && (http1_ows(s[i]) || s[i] == ','))
            i++;
        b = i;
        while (i < n && s[i] != ',')
            i++;
        e = i;
        while (e > b && http1_ows(s[e - 1]))
            e--;
        if (e > b) {
            *pos = i;
            *elem = s + b;
            *elem_len = e - b;
            return 1;
        }
    }
    *pos = n;
    return 0;
}

int http1_list_has(const char *s, size_t n, const char *name, size_t name_len)
{
    size_t pos = 0, len;
    const char *e;
    while (http1_list_next(s, n, &pos, &e, &len))
        if (http1_is(e, len, name, name_len)) return 1;
    return 0;
}

/* Calls FN on each element of a comma-separated list (see http1_list_next).
 * Returns how many elements there were, or -1 as soon as FN returns
 * non-zero. */
static int http1_each(const char *s, size_t n, int (*fn)(http1_parser *, const char *, size_t),
                      http1_parser *p)
{
    size_t pos = 0, len;
    const char *e;
    int count = 0;
    while (http1_list_next(s, n, &pos, &e, &len)) {
        if (fn(p, e, len) != 0) return -1;
        count++;
    }
    return count;
}

static int http1_on_length(http1_parser *p, const char *s, size_t n)
{
    int64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (!http1_digit(s[i])) return -1; /* signs, spaces, hex: all malformed */
        if (v > (INT64_MAX - 9) / 10) return -1;
        v = v * 10 + (s[i] - '0');
    }
    /* Repeats of one value are harmless; two values mean two framings. */
    if (p->content_length >= 0 && p->content_length != v) return -1;
    p->content_length = v;
    return 0;
}

static int http1_on_coding(http1_parser *p, const char *s, size_t n)
{
    /* We send no TE header, so chunked is the only coding a server may use,
     * and only once. Anything else we could not undo: refuse. */
    if (!HTTP1_IS(s, n, "chunked") || p->te_chunked) return -1;
    p->te_chunked = 1;
    return 0;
}

static int http1_on_connection(http1_parser *p, const char *s, size_t n)
{
    if (HTTP1_IS(s, n, "close")) p->conn_close = 1;
    return 0;
}

static int http1_on_keepalive(http1_parser *p, const char *s, size_t n)
{
    unsigned v = 0;
    size_t i;
    if (n <= 8 || strncasecmp(s, "timeout=", 8) != 0) return 0;
    for (i = 8; i < n && http1_digit(s[i]); i++)
        if (v < HTTP1_KEEPALIVE_MAX_S) v = v * 10 + (unsigned)(s[i] - '0');
    if (i == n) p->keepalive_s = v < HTTP1_KEEPALIVE_MAX_S ? v : HTTP1_KEEPALIVE_MAX_S;
    return 0; /* a malformed parameter only loses the hint */
}

/* "HTTP/1.x SP 3DIGIT [SP reason]". 0 or -1. */
static int http1_status_line(http1_parser *p, const char *s, size_t n)
{
    int code;
    if (n < 12 || memcmp(s, "HTTP/1.", 7) != 0 || !http1_digit(s[7]) || s[8] != ' ' ||
        !http1_digit(s[9]) || !http1_digit(s[10]) || !http1_digit(s[11]))
        return -1;
    if (n > 12 && (s[12] != ' ' || !http1_text_ok(s + 13, n - 13))) return -1;
    code = (s[9] - '0') * 100 + (s[10] - '0') * 10 + (s[11] - '0');
    if (code < 100 || code > 599) return -1;
    /* 101 answers an Upgrade, which the gateway never asks for. */
    if (code == 101) return -1;
    p->status = code;
    p->minor = s[7] - '0';
    return 0;
}

/* "name: value" into EV (value trimmed of OWS). 0 or -1. */
static int http1_field(const char *s, size_t n, http1_event *ev)
{
    size_t i = 0, vb, ve;
    /* A line starting with whitespace is obs-fold (or a name with leading
     * space): RFC 9112 5.2 lets a proxy reject it, and we do. */
    while (i < n && s[i] != ':') {
        if (!http1_tchar((unsigned char)s[i])) return -1;
        i++;
    }
    if (i == 0 || i == n) return -1;
    vb = i + 1;
    while (vb < n && http1_ows(s[vb]))
        vb++;
    ve = n;
    while (ve > vb && http1_ows(s[ve - 1]))
        ve--;
    if (!http1_text_ok(s + vb, ve - vb)) return -1;
    ev->name = s;
    ev->name_len = i;
    ev->value = s + vb;
    ev->value_len = ve - vb;
    return 0;
}

/* The framing-relevant headers of the final response. 0 or -1. */
static int http1_framing_header(http1_parser *p, const http1_event *ev)
{
    const char *v = ev->value;
    size_t n = ev->value_len;
    /* Content-Length and Transfer-Encoding frame the body: a header of
     * either with no element at all ("", ",", " , ") is malformed, not
     * absent. Read as absent, a Content-Length would turn into a body read
     * to the close, a framing the server never meant. */
    if (HTTP1_IS(ev->name, ev->name_len, "content-length"))
        return http1_each(v, n, http1_on_length, p) > 0 ? 0 : -1;
    if (HTTP1_IS(ev->name, ev->name_len, "transfer-encoding")) {
        p->te_seen = 1;
        return http1_each(v, n, http1_on_coding, p) > 0 ? 0 : -1;
    }
    if (HTTP1_IS(ev->name, ev->name_len, "connection"))
        return http1_each(v, n, http1_on_connection, p) < 0 ? -1 : 0;
    if (HTTP1_IS(ev->name, ev->name_len, "keep-alive"))
        return http1_each(v, n, http1_on_keepalive, p) < 0 ? -1 : 0;
    return 0;
}

/* End of the final response's head: decide the framing (RFC 9112 6.3). */
static enum http1_ev http1_head_done(http1_parser *p)
{
    /* HTTP/1.0 keep-alive is an opt-in we do not ask for: such a server's
     * connection is used once. */
    p->keep_alive = p->minor >= 1 && !p->conn_close;
    if (p->head_request || p->status == 204 || p->status == 304) {
        /* No body, whatever the head says. But this is where servers get
         * framing wrong most often (a HEAD answered with its GET body, a
         * 204 or 304 with content), and they may send those bytes in a later
         * write: on a reused connection they would be read as the next
         * call's response. So such a connection is not reused (proxy.c
         * explains why it does not look for stray bytes instead). */
        p->keep_alive = 0;
        /* A HEAD answer's length is the GET answer's, which chunked would
         * override. */
        if (p->te_seen) p->content_length = -1;
        p->framing = HTTP1_NONE;
        p->state = S_DONE;
    } else if (p->te_seen) {
        /* Chunked wins over Content-Length, but a server that sends both is
         * confused or being abused: its connection is not used again. */
        if (p->content_length >= 0) p->keep_alive = 0;
        p->content_length = -1;
        p->framing = HTTP1_CHUNKED;
        p->state = S_CHUNK_SIZE;
    } else if (p->content_length >= 0) {
        if ((uint64_t)p->content_length > p->max_body) {
            p->state = S_TOO_LARGE;
            return HTTP1_TOO_LARGE;
        }
        p->remaining = (uint64_t)p->content_length;
        p->framing = p->remaining ? HTTP1_LENGTH : HTTP1_NONE;
        p->state = p->remaining ? S_LENGTH : S_DONE;
    } else {
        p->framing = HTTP1_CLOSE;
        p->keep_alive = 0;
        p->state = S_CLOSE;
    }
    return HTTP1_HEAD_DONE;
}

static enum http1_ev http1_fail(http1_parser *p, enum http1_ev ev)
{
    p->state = ev == HTTP1_TOO_LARGE ? S_TOO_LARGE : S_MALFORMED;
    return ev;
}

/* Hands out body bytes of a counted body (Content-Length or one chunk). */
static enum http1_ev http1_counted(http1_parser *p, const char *buf, size_t avail, size_t *off,
                                   http1_event *ev, int next_state)
{
    size_t n = avail < p->remaining ? avail : (size_t)p->remaining;
    ev->data = buf + *off;
    ev->len = n;
    *off += n;
    p->remaining -= n;
    p->body_bytes += n;
    if (p->remaining == 0) p->state = next_state;
    return HTTP1_BODY;
}

/* "1*HEXDIG [BWS] [; ext]" into *SIZE. 0, or the error event. */
static int http1_chunk_size(http1_parser *p, const char *s, size_t n, uint64_t *size)
{
    uint64_t v = 0;
    size_t i = 0;
    int h;
    while (i < n && (h = http1_hex(s[i])) >= 0) {
        /* Past the body bound long before it could overflow. */
        if (v > p->max_body) return HTTP1_TOO_LARGE;
        v = v * 16 + (uint64_t)h;
        i++;
    }
    if (i == 0) return HTTP1_MALFORMED;
    while (i < n && http1_ows(s[i]))
        i++;
    if (i < n && (s[i] != ';' || !http1_text_ok(s + i, n - i))) return HTTP1_MALFORMED;
    if (v > p->max_body - p->body_bytes) return HTTP1_TOO_LARGE;
    *size = v;
    return 0;
}

enum http1_ev http1_next(http1_parser *p, const char *buf, size_t len, size_t *used,
                         http1_event *ev)
{
    size_t off = 0, ll, u;
    int r;
    enum http1_ev e = HTTP1_MORE;

    for (;;) {
        const char *line = buf + off;
        switch (p->state) {
        case S_STATUS:
        case S_HEADER:
        case S_INTERIM:
        case S_TRAILER:
            /* Every line of every head (1xx ones and trailers included)
             * counts against one budget. */
            if (off == len) goto more;
            r = http1_line(line, len - off, p->max_head - p->head_bytes, &ll, &u);
            if (r == 0) goto more;
            if (r < 0) {
                e = http1_fail(p, HTTP1_TOO_LARGE);
                goto out;
            }
            /* A trailer line belongs to the chunked body: CRLF only. */
            if (p->state == S_TRAILER && u != ll + 2) goto malformed;
            off += u;
            p->head_bytes += u;
            if (p->state == S_STATUS) {
                if (http1_status_line(p, line, ll) != 0) goto malformed;
                p->state = p->status < 200 ? S_INTERIM : S_HEADER;
                continue;
            }
            if (ll == 0) { /* end of a head */
                if (p->state == S_INTERIM) {
                    p->state = S_STATUS;
                    continue;
                }
                if (p->state == S_TRAILER) {
                    p->state = S_DONE;
                    e = HTTP1_DONE;
                    goto out;
                }
                e = http1_head_done(p);
                goto out;
            }
            if (http1_field(line, ll, ev) != 0) goto malformed;
            if (p->state != S_HEADER) continue; /* 1xx headers, trailers: skipped */
            if (http1_framing_header(p, ev) != 0) goto malformed;
            e = HTTP1_HEADER;
            goto out;
        case S_LENGTH:
            if (off == len) goto more;
            e = http1_counted(p, buf, len - off, &off, ev, S_DONE);
            goto out;
        case S_CHUNK_SIZE: {
            uint64_t size = 0;
            int err;
            if (off == len) goto more;
            r = http1_line(line, len - off, HTTP1_CHUNK_LINE_MAX, &ll, &u);
            if (r == 0) goto more;
            if (r < 0 || u != ll + 2) goto malformed; /* past the bound, or a lone LF */
            err = http1_chunk_size(p, line, ll, &size);
            if (err != 0) {
                e = http1_fail(p, (enum http1_ev)err);
                goto out;
            }
            off += u;
            p->remaining = size;
            p->state = size ? S_CHUNK_DATA : S_TRAILER;
            continue;
        }
        case S_CHUNK_DATA:
            if (off == len) goto more;
            e = http1_counted(p, buf, len - off, &off, ev, S_CHUNK_CRLF);
            goto out;
        case S_CHUNK_CRLF:
            /* Exactly CRLF after the data: a lone LF is refused. */
            if (off == len) goto more;
            if (buf[off] != '\r') goto malformed;
            if (off + 1 == len) goto more;
            if (buf[off + 1] != '\n') goto malformed;
            off += 2;
            p->state = S_CHUNK_SIZE;
            continue;
        case S_CLOSE:
            if (off == len) goto more;
            if (len - off > p->max_body - p->body_bytes) {
                e = http1_fail(p, HTTP1_TOO_LARGE);
                goto out;
            }
            ev->data = buf + off;
            ev->len = len - off;
            p->body_bytes += len - off;
            off = len;
            e = HTTP1_BODY;
            goto out;
        case S_DONE:
            e = HTTP1_DONE;
            goto out;
        case S_TOO_LARGE:
            e = HTTP1_TOO_LARGE;
            goto out;
        default:
            e = HTTP1_MALFORMED;
            goto out;
        }
    }
more:
    e = HTTP1_MORE;
    goto out;
malformed:
    e = http1_fail(p, HTTP1_MALFORMED);
out:
    *used = off;
    return e;
}

enum http1_ev http1_eof(http1_parser *p)
{
    if (p->state == S_CLOSE || p->state == S_DONE) {
        p->state = S_DONE;
        return HTTP1_DONE;
    }
    if (p->state == S_TOO_LARGE) return HTTP1_TOO_LARGE;
    p->state = S_MALFORMED;
    return HTTP1_MALFORMED;
}
