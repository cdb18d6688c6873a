/* proxy_msg.c: the HTTP/1.1 message side of an upstream call (see
 * proxy.h): the request's header lines (proxy_call_add_header, with the
 * checks that keep a client's bytes from splitting a line), the request's
 * framing tail, which methods may be replayed, and which response headers
 * a call keeps (hop-by-hop ones and those the gateway writes itself are
 * dropped, and so are those a Connection header names). Does not own
 * connections, the pool, sending, reading or timeouts: proxy.c does, and
 * hands each parsed response header here. */
#include "gateway/proxy_int.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- header names -------------------------------------------------- */

/* By length first: this runs for every header of every call. */
static int proxy_hop_by_hop_n(const char *s, size_t n)
{
    switch (n) {
    case 2:
        return HTTP1_IS(s, n, "te");
    case 7:
        return HTTP1_IS(s, n, "trailer") || HTTP1_IS(s, n, "upgrade");
    case 10:
        return HTTP1_IS(s, n, "connection") || HTTP1_IS(s, n, "keep-alive");
    case 16:
        return HTTP1_IS(s, n, "proxy-connection");
    case 17:
        return HTTP1_IS(s, n, "transfer-encoding");
    case 18:
        return HTTP1_IS(s, n, "proxy-authenticate");
    case 19:
        return HTTP1_IS(s, n, "proxy-authorization");
    default:
        return 0;
    }
}

int proxy_hop_by_hop(const char *name)
{
    return proxy_hop_by_hop_n(name, strlen(name));
}

static int proxy_skip_response_header(const char *s, size_t n)
{
    /* server.c writes its own framing and Date; the gateway writes the billing
     * headers itself, so an upstream cannot spoof them. */
    return proxy_hop_by_hop_n(s, n) || HTTP1_IS(s, n, "content-length") || HTTP1_IS(s, n, "date") ||
           HTTP1_IS(s, n, "x-request-id") || HTTP1_IS(s, n, "x-points-charged") ||
           HTTP1_IS(s, n, "x-points-remaining");
}

/* ---- the call's buffers ---------------------------------------------- */

int proxy_call_add_header(proxy_call *c, const char *name, const char *value)
{
    size_t nl = strlen(name), vl = value ? strlen(value) : 0, need, o;
    char *h;
    /* No CR or LF may reach the upstream inside a value (header injection). */
    if (!http1_token(name, nl) || !http1_text_ok(value ? value : "", vl)) return -1;
    need = nl + 1 + (vl ? 1 + vl : 0) + 2;
    /* The caller zeroed the call (a zeroed buf has no room at all): the
     * bound is set before the first line, and buf_free keeps it. */
    if (!c->req_hdrs.p) buf_init(&c->req_hdrs, PROXY_REQ_HEADERS_MAX);
    if (buf_reserve(&c->req_hdrs, need) != BUF_OK) return -1;
    h = c->req_hdrs.p;
    o = c->req_hdrs.len;
    memcpy(h + o, name, nl);
    o += nl;
    h[o++] = ':';
    if (vl) {
        h[o++] = ' ';
        memcpy(h + o, value, vl);
        o += vl;
    }
    h[o++] = '\r';
    h[o++] = '\n';
    c->req_hdrs.len = o;
    return 0;
}

/* 1 if a Connection header value names a header: anything but the
 * connection options close and keep-alive. */
static int proxy_connection_names_headers(const char *v, size_t n)
{
    size_t pos = 0, len;
    const char *e;
    while (http1_list_next(v, n, &pos, &e, &len))
        if (!HTTP1_IS(e, len, "close") && !HTTP1_IS(e, len, "keep-alive")) return 1;
    return 0;
}

/* Appends a kept response header as "name\0value\0". Bounded by the
 * parser's head limit. 0 or -1 (out of memory). */
int proxy_call_keep_header(proxy_call *c, const http1_event *ev)
{
    size_t need = ev->name_len + ev->value_len + 2;
    struct buf *h;
    /* A Connection header that names other headers is kept until the head
     * is complete, so that proxy_call_drop_listed can find them (they may
     * come before it). The usual "keep-alive" or "close" names none: such a
     * header is dropped here with the other hop-by-hop ones. */
    if (HTTP1_IS(ev->name, ev->name_len, "connection") &&
        proxy_connection_names_headers(ev->value, ev->value_len))
        c->conn_listed = 1;
    else if (proxy_skip_response_header(ev->name, ev->name_len))
        return 0;
    /* Each pair is no longer than its line in the head, so the head bound
     * (the parser's) is reached first. */
    if (buf_reserve(&c->hdrs, need) != BUF_OK) return -1;
    h = &c->hdrs;
    memcpy(h->p + h->len, ev->name, ev->name_len);
    h->len += ev->name_len;
    h->p[h->len++] = '\0';
    memcpy(h->p + h->len, ev->value, ev->value_len);
    h->len += ev->value_len;
    h->p[h->len++] = '\0';
    return 0;
}

/* Set on the first byte of a header name to drop: no token has it. */
#define PROXY_DROPPED '\x01'

/* 1 if one of C's kept Connection headers names NAME. */
static int proxy_call_listed(const proxy_call *c, const char *name)
{
    size_t off = 0, nl = strlen(name);
    const char *n, *v;
    while ((off = proxy_header_next(c, off, &n, &v)) != 0)
        if (strcasecmp(n, "connection") == 0 && http1_list_has(v, strlen(v), name, nl)) return 1;
    return 0;
}

/* The head is complete: removes the headers its Connection headers name,
 * and those Connection headers (RFC 9110 7.6.1: they are for this hop
 * only). In place, without allocating: the names to drop are marked first,
 * while every Connection header can still be read, then the rest is packed.
 * Runs only when a Connection header named something (conn_listed). */
void proxy_call_drop_listed(proxy_call *c)
{
    size_t off = 0, next, w = 0;
    const char *name, *value;
    while ((next = proxy_header_next(c, off, &name, &value)) != 0) {
        if (strcasecmp(name, "connection") != 0 && proxy_call_listed(c, name))
            c->hdrs.p[off] = PROXY_DROPPED;
        off = next;
    }
    off = 0;
    while ((next = proxy_header_next(c, off, &name, &value)) != 0) {
        /* W <= OFF: the move never reaches a pair not read yet. */
        if (name[0] != PROXY_DROPPED && strcasecmp(name, "connection") != 0) {
            memmove(c->hdrs.p + w, c->hdrs.p + off, next - off);
            w += next - off;
        }
        off = next;
    }
    c->hdrs.len = w;
    c->conn_listed = 0;
}

size_t proxy_header_next(const proxy_call *c, size_t off, const char **name, const char **value)
{
    if (off >= c->hdrs.len) return 0;
    *name = c->hdrs.p + off;
    off += strlen(*name) + 1;
    *value = c->hdrs.p + off;
    off += strlen(*value) + 1;
    return off;
}

void proxy_call_clear(proxy_call *c)
{
    proxy_cancel(c);
    buf_free(&c->req_hdrs);
    buf_free(&c->hdrs);
    buf_free(&c->body);
}

/* RFC 9110 9.2.2. */
int proxy_idempotent(const char *m)
{
    return strcmp(m, "GET") == 0 || strcmp(m, "HEAD") == 0 || strcmp(m, "PUT") == 0 ||
           strcmp(m, "DELETE") == 0 || strcmp(m, "OPTIONS") == 0 || strcmp(m, "TRACE") == 0;
}

/* "Content-Length: N\r\n\r\n" into OUT (48 bytes). */
size_t proxy_length_tail(char *out, size_t n)
{
    char d[24];
    size_t nd = 0, o = sizeof("Content-Length: ") - 1;
    memcpy(out, "Content-Length: ", o);
    do {
        d[nd++] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    while (nd)
        out[o++] = d[--nd];
    memcpy(out + o, "\r\n\r\n", 4);
    return o + 4;
}
