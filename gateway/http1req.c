/* http1req.c: strict request-head parsing (see http1req.h).
 *
 * Shares the syntax checks (tokens, field values, targets, lists) with the
 * upstream response parser (http1.c), so that there is one definition of
 * each. A line of the head may end in CRLF or a lone LF (RFC 9112 2.2; a
 * chunked body may not: http1.c); a bare CR anywhere else is a control byte
 * and refused with the rest. */
#include "gateway/http1req.h"

#include "gateway/http1.h"

#include <string.h>

static int http1req_fail(http1req *h, int status, const char *code, const char *msg)
{
    h->error = msg;
    h->error_code = code;
    return status;
}

static int http1req_bad(http1req *h, const char *msg)
{
    return http1req_fail(h, 400, "bad_request", msg);
}

/* Empty lines a client may send before a request line (typically after a
 * POST body), in bytes: RFC 9112 2.2 asks a server to ignore at least one.
 * Bounded so that telling them from the head's own end stays O(1) per
 * line: a head of 16 KiB of line ends cost 57 ms of CPU when every empty
 * line rescanned everything before it. Past the bound an empty line ends
 * the head, whose parse then refuses it (no request line). */
#define HTTP1REQ_LEADING_MAX 8

/* 1 if BUF[0..N) holds only line ends. */
static int http1req_only_eol(const char *buf, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (buf[i] != '\r' && buf[i] != '\n') return 0;
    return 1;
}

long http1req_head_end(const char *buf, size_t len, size_t max, size_t *scan)
{
    size_t i = *scan;
    for (;;) {
        size_t lim = len < max ? len : max;
        const char *nl = i < lim ? memchr(buf + i, '\n', lim - i) : NULL;
        size_t n;
        if (!nl) {
            *scan = i;
            return len >= max ? -1 : 0;
        }
        n = (size_t)(nl - (buf + i)); /* line length without LF */
        if (n == 0 || (n == 1 && buf[i] == '\r')) {
            /* An empty line ends the head, unless nothing came before it. */
            if (i > HTTP1REQ_LEADING_MAX || !http1req_only_eol(buf, i)) {
                *scan = 0;
                return (long)(i + n + 1);
            }
        }
        i += n + 1;
    }
}

/* The next line of BUF[*OFF..LEN): its start and length without CR LF;
 * *OFF moves past it. 0 at the end of the buffer. */
static int http1req_line(const char *buf, size_t len, size_t *off, size_t *start, size_t *n)
{
    const char *nl;
    if (*off >= len) return 0;
    nl = memchr(buf + *off, '\n', len - *off);
    if (!nl) return 0; /* http1req_head_end found the end: cannot happen */
    *start = *off;
    *n = (size_t)(nl - (buf + *off));
    *off += *n + 1;
    if (*n > 0 && buf[*start + *n - 1] == '\r') (*n)--;
    return 1;
}

/* 1 if S[0..N) is an RFC 3986 scheme followed by ':' (its length in *SL). */
static int http1req_scheme(const char *s, size_t n, size_t *sl)
{
    size_t i = 0;
    if (n == 0 || !((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z'))) return 0;
    while (i < n && ((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
                     (s[i] >= '0' && s[i] <= '9') || s[i] == '+' || s[i] == '-' || s[i] == '.'))
        i++;
    if (i == n || s[i] != ':') return 0;
    *sl = i;
    return 1;
}

/* An absolute-form target "http://authority[/path][?query]" (RFC 9112
 * 3.2.2) at BUF[T..T+N), NUL-terminated at T+N: the gateway is its origin
 * server, so it routes on the path and the upstream gets origin-form. The
 * target is rewritten in place: the authority moves 2 bytes back (over the
 * "//") and is NUL-terminated, and the target becomes the path and query
 * behind it ("/" when the path is empty). The authority replaces Host. 0,
 * or the status to answer. */
static int http1req_absolute(char *buf, size_t t, size_t n, size_t sl, http1req *h)
{
    size_t a = t + sl + 3, e = a;
    if (!(HTTP1_IS(buf + t, sl, "http") || HTTP1_IS(buf + t, sl, "https")))
        return http1req_bad(h, "unsupported scheme in request target");
    if (n < sl + 3 || buf[t + sl + 1] != '/' || buf[t + sl + 2] != '/')
        return http1req_bad(h, "malformed request target");
    while (e < t + n && buf[e] != '/' && buf[e] != '?')
        e++;
    /* Userinfo is deprecated and a way to dress up a phishing host (RFC
     * 9110 4.2.4: treat it as an error). */
    if (memchr(buf + a, '@', e - a)) return http1req_bad(h, "userinfo in request target");
    if (!http1_authority_ok(buf + a, e - a))
        return http1req_bad(h, "invalid host in request target");
    memmove(buf + a - 2, buf + a, e - a);
    buf[e - 2] = '\0';
    h->host = (uint32_t)(a - 2);
    h->host_len = (uint32_t)(e - a);
    h->absolute = 1;
    if (e == t + n || buf[e] != '/') buf[--e] = '/'; /* empty path: "/" */
    h->target = (uint32_t)e;
    h->target_len = (uint32_t)(t + n - e);
    return 0;
}

/* "METHOD SP target SP HTTP/1.x": exactly one space each (RFC 9112 3). */
static int http1req_request_line(char *buf, size_t s, size_t n, http1req *h)
{
    const char *line = buf + s, *sp1, *sp2, *v;
    size_t mlen, tlen, vlen, sl;
    sp1 = memchr(line, ' ', n);
    if (!sp1) return http1req_bad(h, "malformed request line");
    mlen = (size_t)(sp1 - line);
    sp2 = memchr(sp1 + 1, ' ', n - mlen - 1);
    if (!sp2) return http1req_bad(h, "malformed request line");
    tlen = (size_t)(sp2 - sp1 - 1);
    v = sp2 + 1;
    vlen = n - mlen - tlen - 2;
    if (!http1_token(line, mlen) || tlen == 0) return http1req_bad(h, "malformed request line");
    /* The target goes verbatim on the upstream's request line: printable
     * ASCII only (this also refuses a tab, a control byte, bytes >= 0x80). */
    if (!http1_target_ok(sp1 + 1, tlen)) return http1req_bad(h, "invalid request path");
    /* A fragment is never part of a request target (RFC 9112 3.2). Most
     * upstream frameworks cut it off before routing, so "/a/b#/c" would be
     * matched and priced here as "/a/b#/c" and run there as "/a/b". */
    if (memchr(sp1 + 1, '#', tlen)) return http1req_bad(h, "fragment in request target");
    if (vlen != 8 || memcmp(v, "HTTP/", 5) != 0 || v[6] != '.' || v[5] < '0' || v[5] > '9' ||
        v[7] < '0' || v[7] > '9')
        return http1req_bad(h, "malformed request line");
    if (v[5] != '1')
        return http1req_fail(h, 505, "http_version_not_supported", "HTTP/1.0 and 1.1 only");
    h->minor = v[7] == '0' ? 0 : 1;
    h->method = (uint32_t)s;
    h->method_len = (uint32_t)mlen;
    h->target = (uint32_t)(s + mlen + 1);
    h->target_len = (uint32_t)tlen;
    buf[s + mlen] = '\0';
    buf[s + mlen + 1 + tlen] = '\0';
    /* Origin-form starts with '/', asterisk-form is "*"; anything else that
     * starts with a scheme is absolute-form. What is left (authority-form,
     * relative paths) is refused by request.c as an invalid path. */
    if (sp1[1] != '/' && http1req_scheme(sp1 + 1, tlen, &sl))
        return http1req_absolute(buf, h->target, tlen, sl, h);
    return 0;
}

typedef struct http1req_seen {
    int hosts, te, te_other, conn_close, conn_keep_alive;
    size_t xff; /* bytes of the X-Forwarded-For values, joined with ", " */
} http1req_seen;

static int http1req_length(http1req *h, const char *v, size_t n)
{
    int64_t x = 0;
    /* Digits only: no sign, no space, no list (RFC 9110 8.6 lets a
     * recipient take "5, 5"; we do not, as nothing honest sends it). */
    if (n == 0) return http1req_bad(h, "invalid Content-Length");
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9' || x > (INT64_MAX - 9) / 10)
            return http1req_bad(h, "invalid Content-Length");
        x = x * 10 + (v[i] - '0');
    }
    if (h->content_length >= 0 && h->content_length != x)
        return http1req_bad(h, "conflicting Content-Length");
    h->content_length = x;
    return 0;
}

static int http1req_codings(http1req *h, http1req_seen *seen, const char *v, size_t n)
{
    size_t pos = 0, len;
    const char *e;
    int count = 0;
    seen->te = 1;
    while (http1_list_next(v, n, &pos, &e, &len)) {
        count++;
        /* chunked, once, and last: anything after it would be a coding
         * applied on top of the framing, anything before it one we cannot
         * undo (501 below). */
        if (h->chunked) return http1req_bad(h, "invalid Transfer-Encoding");
        if (HTTP1_IS(e, len, "chunked"))
            h->chunked = 1;
        else
            seen->te_other = 1;
    }
    return count ? 0 : http1req_bad(h, "invalid Transfer-Encoding");
}

static void http1req_connection(http1req_seen *seen, const char *v, size_t n)
{
    size_t pos = 0, len;
    const char *e;
    while (http1_list_next(v, n, &pos, &e, &len)) {
        if (HTTP1_IS(e, len, "close")) seen->conn_close = 1;
        if (HTTP1_IS(e, len, "keep-alive")) seen->conn_keep_alive = 1;
    }
}

/* One "name: value" line at BUF[S..S+N). */
static int http1req_field_line(char *buf, size_t s, size_t n, http1req *h, http1req_seen *seen)
{
    const char *line = buf + s, *v;
    size_t i = 0, vb, ve;
    http1req_field *f;
    int rc = 0;
    /* A line starting with whitespace continues the previous one
     * (obs-fold): RFC 9112 5.2 lets a server reject it, and we do. */
    if (line[0] == ' ' || line[0] == '\t') return http1req_bad(h, "obsolete line folding");
    while (i < n && line[i] != ':') {
        /* Whitespace between name and colon is refused too (RFC 9112 5.1). */
        if (!http1_tchar((unsigned char)line[i])) return http1req_bad(h, "invalid header");
        i++;
    }
    if (i == 0 || i == n) return http1req_bad(h, "invalid header");
    vb = i + 1;
    while (vb < n && (line[vb] == ' ' || line[vb] == '\t'))
        vb++;
    ve = n;
    while (ve > vb && (line[ve - 1] == ' ' || line[ve - 1] == '\t'))
        ve--;
    /* No control byte but HTAB: this refuses NUL (which would cut the value
     * short), a bare CR and DEL. */
    if (!http1_text_ok(line + vb, ve - vb)) return http1req_bad(h, "invalid header");
    if (h->nfields == h->max_fields)
        return http1req_fail(h, 431, "header_too_large", "too many header fields");
    v = line + vb;
    if (HTTP1_IS(line, i, "content-length"))
        rc = http1req_length(h, v, ve - vb);
    else if (HTTP1_IS(line, i, "transfer-encoding"))
        rc = http1req_codings(h, seen, v, ve - vb);
    else if (HTTP1_IS(line, i, "host")) {
        /* Validated even when an absolute-form target overrides it: RFC
         * 9112 3.2 asks for 400 on an invalid value either way. */
        if (!http1_authority_ok(v, ve - vb)) return http1req_bad(h, "invalid Host header");
        if (!h->absolute) {
            h->host = (uint32_t)(s + vb);
            h->host_len = (uint32_t)(ve - vb);
        }
        seen->hosts++;
    } else if (HTTP1_IS(line, i, "x-forwarded-for")) {
        /* The gateway appends the peer to these (forward.c): bounded here,
         * before anything is looked up, so the peer always fits. */
        seen->xff += (seen->xff ? 2 : 0) + (ve - vb);
        if (seen->xff > HTTP1REQ_XFF_MAX)
            return http1req_fail(h, 431, "header_too_large", "X-Forwarded-For too long");
    } else if (HTTP1_IS(line, i, "connection"))
        http1req_connection(seen, v, ve - vb);
    else if (HTTP1_IS(line, i, "expect")) {
        if (!HTTP1_IS(v, ve - vb, "100-continue"))
            return http1req_fail(h, 417, "expectation_failed", "only 100-continue is supported");
        h->expect_continue = 1;
    }
    if (rc != 0) return rc;
    f = &h->fields[h->nfields++];
    f->name = (uint32_t)s;
    f->name_len = (uint32_t)i;
    f->value = (uint32_t)(s + vb);
    f->value_len = (uint32_t)(ve - vb);
    buf[s + i] = '\0';
    buf[s + ve] = '\0'; /* the CR, the LF or trailing whitespace */
    return 0;
}

int http1req_parse(char *buf, size_t len, http1req *h)
{
    http1req_seen seen = {0};
    size_t off = 0, s, n;
    int rc;

    h->nfields = 0;
    h->content_length = -1;
    h->chunked = h->keep_alive = h->expect_continue = h->minor = h->absolute = 0;
    h->host = h->host_len = 0;
    h->error = h->error_code = NULL;
    for (;;) { /* empty lines before the request line (RFC 9112 2.2) */
        if (!http1req_line(buf, len, &off, &s, &n)) return http1req_bad(h, "malformed request");
        if (n > 0) break;
    }
    rc = http1req_request_line(buf, s, n, h);
    if (rc != 0) return rc;
    while (http1req_line(buf, len, &off, &s, &n) && n > 0) {
        rc = http1req_field_line(buf, s, n, h, &seen);
        if (rc != 0) return rc;
    }
    if (seen.te) {
        /* Both framings: two parsers on the path could pick different ones
         * (request smuggling, RFC 9112 6.3). HTTP/1.0 has no chunked. */
        if (h->content_length >= 0)
            return http1req_bad(h, "both Transfer-Encoding and Content-Length");
        if (h->minor == 0) return http1req_bad(h, "Transfer-Encoding in an HTTP/1.0 request");
        if (seen.te_other || !h->chunked)
            return http1req_fail(h, 501, "not_implemented", "unsupported transfer coding");
    }
    /* More than one Host is a 400 in any request, HTTP/1.0 too (RFC 9112
     * 3.2); only HTTP/1.1 must send one. */
    if (seen.hosts > 1) return http1req_bad(h, "more than one Host header");
    if (h->minor >= 1 && seen.hosts == 0) return http1req_bad(h, "missing Host header");
    /* HTTP/1.1 stays open unless closed; HTTP/1.0 only when asked. */
    h->keep_alive = h->minor >= 1 ? !seen.conn_close : seen.conn_keep_alive && !seen.conn_close;
    /* A 1.0 client cannot wait for a 100 (RFC 9110 10.1.1): ignored. */
    if (h->minor == 0) h->expect_continue = 0;
    return 0;
}

const char *http1req_get(const char *buf, const http1req *h, const char *name)
{
    size_t nl = strlen(name);
    for (size_t i = 0; i < h->nfields; i++) {
        const http1req_field *f = &h->fields[i];
        if (http1_is(buf + f->name, f->name_len, name, nl)) return buf + f->value;
    }
    return NULL;
}
