/* forward.c: which headers cross the gateway, each way (see forward.h).
 *
 * A client header is dropped when the gateway sets it itself, when the
 * upstream could take it for something the gateway vouches for (an
 * address, a host, a scheme, another method or URL than the one matched and
 * billed), when it carries the client's key, or when it is about this hop
 * only (framing, hop-by-hop, those the client's Connection header names).
 * Everything else goes on unchanged. The lists are short and compared by
 * length first: this runs for every header of every call. */
#include "gateway/forward.h"

#include "common/log.h"
#include "gateway/http1.h"
#include "gateway/http1req.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

typedef struct forward_name {
    const char *s;
    size_t n;
} forward_name;

#define FORWARD_NAME(lit)                                                                          \
    {                                                                                              \
        lit, sizeof(lit) - 1                                                                       \
    }

/* Client headers that never reach the upstream, in lower case with '-'. */
static const forward_name forward_drop[] = {
    /* The key: the upstream never sees it. */
    FORWARD_NAME("authorization"),
    FORWARD_NAME("x-api-key"),
    /* Framing and this hop: the gateway writes its own. */
    FORWARD_NAME("host"),
    FORWARD_NAME("content-length"),
    FORWARD_NAME("transfer-encoding"),
    FORWARD_NAME("expect"),
    FORWARD_NAME("te"),
    FORWARD_NAME("trailer"),
    FORWARD_NAME("upgrade"),
    FORWARD_NAME("connection"),
    FORWARD_NAME("keep-alive"),
    FORWARD_NAME("proxy-connection"),
    FORWARD_NAME("proxy-authorization"),
    FORWARD_NAME("proxy-authenticate"),
    /* What the gateway says about the caller. */
    FORWARD_NAME("x-account-id"),
    FORWARD_NAME("x-request-id"),
    FORWARD_NAME("x-real-ip"),
    /* The gateway is the edge: no address or host claimed by the client is
     * passed on as if a proxy had vouched for it (RFC 7239 and its
     * predecessors). X-Forwarded-For is kept, with the peer appended. */
    FORWARD_NAME("forwarded"),
    FORWARD_NAME("x-client-ip"),
    FORWARD_NAME("true-client-ip"),
    FORWARD_NAME("x-cluster-client-ip"),
    FORWARD_NAME("cf-connecting-ip"),
    /* Read before X-Forwarded-For by Rails (remote_ip), by many PHP apps
     * (HTTP_CLIENT_IP) and by other proxies' conventions. */
    FORWARD_NAME("client-ip"),
    FORWARD_NAME("fastly-client-ip"),
    FORWARD_NAME("x-originating-ip"),
    FORWARD_NAME("x-remote-ip"),
    FORWARD_NAME("x-remote-addr"),
    /* Frameworks that honour these run another method or URL than the one
     * the gateway matched and priced. */
    FORWARD_NAME("x-http-method-override"),
    FORWARD_NAME("x-http-method"),
    FORWARD_NAME("x-method-override"),
    FORWARD_NAME("x-original-url"),
    FORWARD_NAME("x-original-uri"),
    FORWARD_NAME("x-rewrite-url"),
};

/* Prefixes of name families the gateway owns (billing) or vouches for
 * (X-Forwarded-Host, -Proto, -Port, ...: all but X-Forwarded-For). */
static const forward_name forward_drop_prefix[] = {
    FORWARD_NAME("x-points-"),
    FORWARD_NAME("x-billing-"),
    FORWARD_NAME("x-forwarded-"),
};

/* Answer headers the gateway writes itself (server.c's framing and Date
 * are proxy.c's to drop). */
static const forward_name forward_answer_drop_prefix[] = {
    FORWARD_NAME("x-points-"),
    FORWARD_NAME("x-billing-"),
};

/* 1 if S[0..N) equals LIT[0..N) (lower case, '-') ignoring case, with any
 * byte but a letter or digit read as '-': '_' for CGI, WSGI, Rack and PHP,
 * and every other tchar ('.', '~', '+', ...) for servers such as lighttpd,
 * whose CGI and FastCGI map all of them to '_'. */
static int forward_same(const char *s, const char *lit, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 'A' && c <= 'Z') c = (unsigned char)(c - 'A' + 'a');
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))) c = '-';
        if (c != (unsigned char)lit[i]) return 0;
    }
    return 1;
}

static int forward_is(const char *name, size_t nl, const forward_name *f)
{
    return nl == f->n && forward_same(name, f->s, nl);
}

static int forward_in(const char *name, size_t nl, const forward_name *list, size_t count,
                      int prefix)
{
    for (size_t i = 0; i < count; i++) {
        if (prefix ? nl >= list[i].n && forward_same(name, list[i].s, list[i].n)
                   : forward_is(name, nl, &list[i]))
            return 1;
    }
    return 0;
}

static const forward_name forward_rid = FORWARD_NAME("x-request-id");
/* Only the gateway says an answer is a replay (idem.c); the upstream's own
 * claim would mislead the client on a first answer. */
static const forward_name forward_replayed = FORWARD_NAME("idempotent-replayed");

int forward_response_header(const char *name)
{
    size_t nl = strlen(name);
    return !forward_is(name, nl, &forward_rid) && !forward_is(name, nl, &forward_replayed) &&
           !forward_in(name, nl, forward_answer_drop_prefix,
                       sizeof forward_answer_drop_prefix / sizeof forward_answer_drop_prefix[0], 1);
}

/* ---- the request's headers ------------------------------------------ */

typedef struct forward_ctx {
    proxy_call *call;
    const char *rid;
    const char *conn; /* the client's Connection header(s), joined when several */
    size_t conn_len;
    char *conn_joined; /* owns conn when there were several */
} forward_ctx;

/* Gathers the client's Connection headers. One (the usual case) is used
 * where the server keeps it; several are joined into one list, which RFC
 * 9110 5.3 makes equivalent. */
static int forward_gather_connection(forward_ctx *h, const char *value)
{
    size_t vl = strlen(value);
    char *j;
    if (!h->conn) {
        h->conn = value;
        h->conn_len = vl;
        return 0;
    }
    j = malloc(h->conn_len + 1 + vl + 1);
    if (!j) return -1;
    memcpy(j, h->conn, h->conn_len);
    j[h->conn_len] = ',';
    memcpy(j + h->conn_len + 1, value, vl + 1);
    free(h->conn_joined);
    h->conn_joined = j;
    h->conn = j;
    h->conn_len += 1 + vl;
    return 0;
}

static int forward_add(forward_ctx *h, const char *name, const char *value)
{
    if (proxy_call_add_header(h->call, name, value) != 0) {
        log_warn("request %s: header %s not forwardable (invalid or past the bound)", h->rid, name);
        return -1;
    }
    return 0;
}

/* 1 if the client's header NAME goes on to the upstream as it is. */
static int forward_passes(const forward_ctx *h, const char *name)
{
    size_t nl = strlen(name);
    if (forward_in(name, nl, forward_drop, sizeof forward_drop / sizeof forward_drop[0], 0) ||
        forward_in(name, nl, forward_drop_prefix,
                   sizeof forward_drop_prefix / sizeof forward_drop_prefix[0], 1))
        return 0;
    if (proxy_hop_by_hop(name)) return 0;
    /* Named by the client's Connection header: for this hop only. */
    if (h->conn && http1_list_has(h->conn, h->conn_len, name, nl)) return 0;
    return 1;
}

static void forward_peer(const server_conn *c, char *out, size_t len)
{
    const struct sockaddr *sa = server_peer(c);
    snprintf(out, len, "unknown");
    if (sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, out, (socklen_t)len);
    else if (sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, out, (socklen_t)len);
}

/* Appends S to the X-Forwarded-For value being built in BUF (*LEN bytes of
 * CAP): 0, or -1 when it does not fit. */
static int forward_xff_append(char *buf, size_t *len, size_t cap, const char *s)
{
    size_t sl = strlen(s), need = (*len ? 2 : 0) + sl;
    if (*len + need + 1 > cap) return -1;
    if (*len) {
        memcpy(buf + *len, ", ", 2);
        *len += 2;
    }
    memcpy(buf + *len, s, sl + 1);
    *len += sl;
    return 0;
}

int forward_headers(const server_conn *c, proxy_call *call, int64_t account, const char *rid)
{
    forward_ctx h = {.call = call, .rid = rid};
    /* The client's values (bounded by the parser) and the peer always fit. */
    char ip[INET6_ADDRSTRLEN + 1], xff[HTTP1REQ_XFF_MAX + 2 + sizeof ip], num[24];
    size_t n = server_header_count(c), xlen = 0;
    const char *name, *value;
    int rc = -1;
    for (size_t i = 0; i < n; i++) {
        server_header_at(c, i, &name, &value);
        if (strcasecmp(name, "connection") == 0 && forward_gather_connection(&h, value) != 0)
            goto out;
    }
    for (size_t i = 0; i < n; i++) {
        server_header_at(c, i, &name, &value);
        if (strcasecmp(name, "x-forwarded-for") == 0) {
            /* Several headers make one list, in order (RFC 9110 5.3). */
            if (*value && forward_xff_append(xff, &xlen, sizeof xff, value) != 0) goto toolong;
            continue;
        }
        if (forward_passes(&h, name) && forward_add(&h, name, value) != 0) goto out;
    }
    /* The peer is always last: the one element no client can forge. */
    forward_peer(c, ip, sizeof ip);
    if (forward_xff_append(xff, &xlen, sizeof xff, ip) != 0) goto toolong;
    snprintf(num, sizeof num, "%" PRId64, account);
    if (forward_add(&h, "X-Forwarded-For", xff) != 0 || forward_add(&h, "X-Real-IP", ip) != 0 ||
        forward_add(&h, "X-Account-Id", num) != 0 || forward_add(&h, "X-Request-Id", rid) != 0)
        goto out;
    rc = 0;
    goto out;
toolong:
    /* The parser refuses more (431) before anything is looked up. */
    log_warn("request %s: X-Forwarded-For past its bound", rid);
out:
    free(h.conn_joined);
    return rc;
}
