/* request.c: one request from headers to answer (see request.h).
 *
 *   NEW --headers ok--> BODY --body read--> KEY? --> RESERVE <--> WAIT
 *        --> PROXY --> SETTLE --> DONE (resumed, answer queued)
 *
 * The connection is suspended only while something asynchronous runs
 * (Redis command, upstream call, backoff timer); checks that need nothing
 * but the request itself answer synchronously. While suspended, a watcher
 * on the client socket notices a client that went away: the upstream call
 * is aborted and the hold released (cost 0). Fire-and-forget settles (client
 * gone, shutdown) carry no pointer to the request, so a request never
 * outlives nor is outlived by a callback that uses it. */
#include "gateway/request.h"

#include "billing/apikey.h"
#include "billing/hotkeys.h"
#include "billing/log.h"
#include "gateway/http1.h"
#include "gateway/usage.h"
#include "gateway/worker.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <event2/event_struct.h>

#define REQUEST_BACKOFF_MIN_MS 2
#define REQUEST_BACKOFF_MAX_MS 50
/* MHD allocates a callback response's block with it: a HEAD answer's reader
 * is never called, so the block is never used. */
#define REQUEST_HEAD_BLOCK 64

enum request_state {
    ST_NEW,
    ST_BODY,
    ST_KEY,
    ST_BALANCE,
    ST_USAGE,
    ST_RESERVE,
    ST_WAIT,
    ST_PROXY,
    ST_SETTLE,
    ST_DONE,
};

struct gw_request {
    worker *w;
    struct MHD_Connection *conn;
    gw_request *prev, *next; /* worker's suspended list */
    enum request_state st;
    int suspended;
    int gone;
    char rid[33];
    char *uri;  /* raw request target */
    char *path; /* decoded, for matching */
    size_t raw_path_len;
    char method[16];
    route_table *table;
    const route *route;
    int balance;
    int usage;             /* GET /_billing/usage */
    char from[11], to[11]; /* its dates, checked */
    char keyhash[APIKEY_HASH_HEX + 1];
    int64_t account;
    char *body;
    size_t body_len, body_cap;
    int body_too_big;
    uint64_t wait_until_ms;
    int backoff_ms;
    struct event *timer;
    struct event *gone_ev;
    struct event gone_timer; /* arms gone_ev; assigned in request_new */
    proxy_call call;
    int64_t charge; /* what settle was asked to commit */
    unsigned status;
    struct MHD_Response *resp;
};

static void request_reserve(gw_request *r);

static void request_on_gone_timer(evutil_socket_t fd, short what, void *arg);

gw_request *request_new(worker *w, const char *uri)
{
    gw_request *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->w = w;
    r->uri = strdup(uri);
    if (!r->uri) {
        free(r);
        return NULL;
    }
    worker_request_id(w, r->rid);
    r->account = -1;
    evtimer_assign(&r->gone_timer, w->base, request_on_gone_timer, r);
    return r;
}

void request_completed(gw_request *r)
{
    if (r->suspended) log_error("request %s freed while suspended", r->rid); /* cannot happen */
    proxy_call_clear(&r->call);
    if (r->resp) MHD_destroy_response(r->resp);
    if (r->timer) event_free(r->timer);
    evtimer_del(&r->gone_timer);
    if (r->gone_ev) event_free(r->gone_ev);
    if (r->table) routes_unref(r->table);
    free(r->body);
    free(r->path);
    free(r->uri);
    free(r);
}

/* ---- answers ---------------------------------------------------------- */

static int request_set_response(gw_request *r, unsigned status, struct MHD_Response *resp)
{
    if (!resp) return -1;
    MHD_add_response_header(resp, "X-Request-Id", r->rid);
    if (r->resp) MHD_destroy_response(r->resp);
    r->resp = resp;
    r->status = status;
    return 0;
}

static struct MHD_Response *request_json(const char *body)
{
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(body), (void *)body, MHD_RESPMEM_MUST_COPY);
    if (resp) MHD_add_response_header(resp, "Content-Type", "application/json");
    return resp;
}

/* Resumes a suspended request; its answer is queued when MHD calls back. */
static void request_finish(gw_request *r)
{
    worker *w = r->w;
    r->st = ST_DONE;
    if (!r->suspended) return;
    evtimer_del(&r->gone_timer);
    if (r->gone_ev) event_del(r->gone_ev);
    if (r->timer) evtimer_del(r->timer);
    if (r->prev)
        r->prev->next = r->next;
    else
        w->suspended = r->next;
    if (r->next) r->next->prev = r->prev;
    r->prev = r->next = NULL;
    r->suspended = 0;
    w->inflight--;
    MHD_resume_connection(r->conn);
    worker_kick(w);
}

static void request_error(gw_request *r, unsigned status, const char *code, const char *msg)
{
    char buf[512];
    snprintf(buf, sizeof buf, "{\"error\":\"%s\",\"message\":\"%s\"}", code, msg);
    if (request_set_response(r, status, request_json(buf)) != 0)
        log_error("request %s: cannot build %u answer", r->rid, status);
    request_finish(r);
}

static void request_short(gw_request *r, int64_t avail, int64_t held)
{
    char buf[512];
    snprintf(buf, sizeof buf,
             "{\"error\":\"insufficient_points\",\"message\":\"not enough points for this "
             "call\",\"cost\":%" PRId64 ",\"available\":%" PRId64 ",\"held\":%" PRId64 "}",
             r->route->price, avail < 0 ? 0 : avail, held);
    request_set_response(r, MHD_HTTP_PAYMENT_REQUIRED, request_json(buf));
    request_finish(r);
}

static enum MHD_Result request_queue(gw_request *r)
{
    enum MHD_Result ret;
    if (!r->resp) return MHD_NO;
    ret = MHD_queue_response(r->conn, r->status, r->resp);
    MHD_destroy_response(r->resp);
    r->resp = NULL;
    return ret;
}

/* ---- suspension and the client-gone watcher --------------------------- */

/* The watcher only notices early that a client left, to abort its upstream
 * call and release its hold at once. When libevent cannot arm it (out of
 * memory, epoll_ctl failing), the client is taken as present, with a log
 * line: the request goes on exactly as one that ends before the watcher is
 * armed (WORKER_GONE_ARM_MS) always does, to its answer or the route's
 * timeout, and its hold is settled or released as usual. Failing the
 * request instead would turn a resource shortage into an error for a
 * client who is most likely still there, and could abandon a call the
 * upstream is already carrying out. */

static void request_on_gone(gw_request *r);

static void request_watch_failed(gw_request *r, const char *what)
{
    log_warn("request %s: %s failed; the client is taken as present", r->rid, what);
}

static void request_on_readable(evutil_socket_t fd, short what, void *arg)
{
    gw_request *r = arg;
    char b;
    ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0) return; /* pipelined bytes: the client is there; stop watching */
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        if (event_add(r->gone_ev, NULL) != 0) request_watch_failed(r, "re-arming the gone watcher");
        return;
    }
    r->gone = 1;
    request_on_gone(r);
}

/* Suspended for WORKER_GONE_ARM_MS: watch the client socket from now on. */
static void request_on_gone_timer(evutil_socket_t fd, short what, void *arg)
{
    gw_request *r = arg;
    const union MHD_ConnectionInfo *ci;
    if (!r->suspended) return;
    ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) {
        request_watch_failed(r, "finding the client socket");
        return;
    }
    if (!r->gone_ev)
        r->gone_ev = event_new(r->w->base, ci->connect_fd, EV_READ, request_on_readable, r);
    if (!r->gone_ev)
        request_watch_failed(r, "creating the gone watcher");
    else if (event_add(r->gone_ev, NULL) != 0)
        request_watch_failed(r, "adding the gone watcher");
}

static void request_suspend(gw_request *r)
{
    worker *w = r->w;
    if (r->suspended) return;
    MHD_suspend_connection(r->conn);
    r->suspended = 1;
    r->next = w->suspended;
    if (w->suspended) w->suspended->prev = r;
    w->suspended = r;
    w->inflight++;
    /* The client-gone watcher is armed only for calls still suspended after
     * WORKER_GONE_ARM_MS: most answer sooner, and a timer costs no syscall
     * where the watcher costs two epoll_ctl. */
    if (evtimer_add(&r->gone_timer, w->gone_arm_tv) != 0)
        request_watch_failed(r, "arming the gone timer");
}

/* ---- settle --------------------------------------------------------- */

static void request_release_detached(gw_request *r)
{
    hot_settle_args a = {.account = r->account, .charge = 0, .commit = 0, .status = 0};
    memcpy(a.rid, r->rid, sizeof a.rid);
    /* No callback: the request may be gone before the reply. Idempotent by rid. */
    hotclient_settle(r->w->hc, &a, NULL, NULL);
}

/* The body reader of a HEAD answer: MHD never calls it (it sends no body
 * for HEAD). Were it called, ending with an error closes the client's
 * connection rather than send bytes the client does not expect. */
static ssize_t request_head_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    return MHD_CONTENT_READER_END_WITH_ERROR;
}

static void request_answer_upstream(gw_request *r, int64_t charged, int have_remaining,
                                    int64_t remaining)
{
    proxy_call *c = &r->call;
    struct MHD_Response *resp;
    const char *name, *value;
    char num[32];
    size_t off = 0;

    if (c->content_length > 0 && strcmp(r->method, "HEAD") == 0) {
        /* The client gets the upstream's Content-Length (the size of the GET
         * answer), which MHD writes itself: for HEAD it sends the response
         * object's size and no body (libmicrohttpd 0.9.75, checked by
         * test_head_keeps_the_content_length). Without a length (chunked
         * upstream) the answer says 0 as before: MHD_SIZE_UNKNOWN would make
         * that MHD send a chunked terminator as the body of a HEAD answer. */
        resp = MHD_create_response_from_callback((uint64_t)c->content_length, REQUEST_HEAD_BLOCK,
                                                 request_head_reader, NULL, NULL);
    } else if (c->body_len > 0) {
        resp = MHD_create_response_from_buffer(c->body_len, c->body, MHD_RESPMEM_MUST_FREE);
        if (resp) c->body = NULL; /* MHD frees it */
        c->body_len = c->body_cap = 0;
    } else {
        resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    }
    if (!resp) {
        request_error(r, 500, "internal", "out of memory");
        return;
    }
    while ((off = proxy_header_next(c, off, &name, &value)) != 0)
        MHD_add_response_header(resp, name, value);
    snprintf(num, sizeof num, "%" PRId64, charged);
    MHD_add_response_header(resp, "X-Points-Charged", num);
    if (have_remaining) {
        snprintf(num, sizeof num, "%" PRId64, remaining < 0 ? 0 : remaining);
        MHD_add_response_header(resp, "X-Points-Remaining", num);
    }
    request_set_response(r, (unsigned)c->status, resp);
    request_finish(r);
}

static void request_on_settled(void *arg, int rc, const int64_t v[3])
{
    gw_request *r = arg;
    if (rc != 0) {
        /* Queued for resend by hotclient; the answer still goes out, with the
         * charge that will be applied and no remaining figure. */
        log_warn("request %s: settle deferred (redis unavailable)", r->rid);
        request_answer_upstream(r, r->charge, 0, 0);
        return;
    }
    if (v[0] == 0) log_warn("request %s: hold already gone at settle (swept?)", r->rid);
    /* v[0] < 0: the account's data in Redis is unusable (hotclient logged
     * it): nothing was charged, and the answer says so (v[1] is 0). */
    request_answer_upstream(r, v[1], 1, v[2]);
}

/* Parses a usage header: a non-negative decimal integer, else -1. */
static int64_t request_parse_units(const char *s)
{
    int64_t v = 0;
    if (!s || !*s) return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9') return -1;
        if (v > (INT64_MAX - 9) / 10) return -1;
        v = v * 10 + (*s - '0');
    }
    return v;
}

static int64_t request_usage_charge(gw_request *r)
{
    const route *rt = r->route;
    const char *name, *value, *units_s = NULL;
    size_t off = 0;
    int64_t units;
    while ((off = proxy_header_next(&r->call, off, &name, &value)) != 0)
        if (strcasecmp(name, rt->units_header) == 0) units_s = value;
    units = request_parse_units(units_s);
    if (units < 0) {
        /* A billable answer without a usable count: charge the hold (the
         * ceiling the caller agreed to) rather than give the call away. */
        log_warn("request %s: route %s: missing or invalid %s, charging the hold", r->rid, rt->id,
                 rt->units_header);
        return rt->price;
    }
    /* Overflow-safe units x unit_price, capped at the hold. */
    if (units > rt->price / rt->unit_price) return rt->price;
    return units * rt->unit_price;
}

static void request_on_upstream(void *arg, proxy_call *c)
{
    gw_request *r = arg;
    hot_settle_args a = {.account = r->account, .status = 0};
    memcpy(a.rid, r->rid, sizeof a.rid);

    if (c->result != PROXY_OK) {
        request_release_detached(r);
        if (c->result == PROXY_TIMEOUT)
            request_error(r, MHD_HTTP_GATEWAY_TIMEOUT, "upstream_timeout",
                          "the device API did not answer in time");
        else if (c->result == PROXY_TOO_LARGE)
            request_error(r, MHD_HTTP_BAD_GATEWAY, "upstream_unavailable", "response too large");
        else
            request_error(r, MHD_HTTP_BAD_GATEWAY, "upstream_unavailable",
                          "the device API could not be reached");
        if (r->resp) MHD_add_response_header(r->resp, "X-Points-Charged", "0");
        return;
    }
    a.status = c->status;
    a.commit = routes_billable(r->route, c->status);
    if (a.commit) a.charge = r->route->usage ? request_usage_charge(r) : r->route->price;
    r->charge = a.charge;
    r->st = ST_SETTLE;
    if (hotclient_settle(r->w->hc, &a, request_on_settled, r) != 0) request_on_settled(r, -1, NULL);
}

/* ---- proxy ---------------------------------------------------------- */

typedef struct request_hdr_ctx {
    gw_request *r;
    const char *conn; /* the client's Connection header(s), joined when several */
    size_t conn_len;
    char *conn_joined; /* owns conn when there were several */
    const char *xff;
    int failed;
} request_hdr_ctx;

/* MHD_get_connection_values callback: gathers the client's Connection
 * headers. One (the usual case) is used where MHD keeps it; several are
 * joined into one list, which RFC 9110 5.3 makes equivalent. */
static enum MHD_Result request_gather_connection(void *cls, enum MHD_ValueKind kind,
                                                 const char *name, const char *value)
{
    request_hdr_ctx *h = cls;
    size_t vl;
    char *j;
    if (!value || strcasecmp(name, "connection") != 0) return MHD_YES;
    vl = strlen(value);
    if (!h->conn) {
        h->conn = value;
        h->conn_len = vl;
        return MHD_YES;
    }
    j = malloc(h->conn_len + 1 + vl + 1);
    if (!j) {
        h->failed = 1;
        return MHD_NO;
    }
    memcpy(j, h->conn, h->conn_len);
    j[h->conn_len] = ',';
    memcpy(j + h->conn_len + 1, value, vl + 1);
    free(h->conn_joined);
    h->conn_joined = j;
    h->conn = j;
    h->conn_len += 1 + vl;
    return MHD_YES;
}

static int request_add_header(request_hdr_ctx *h, const char *name, const char *value)
{
    if (proxy_call_add_header(&h->r->call, name, value) != 0) {
        log_warn("request %s: header %s not forwardable (invalid or past the bound)", h->r->rid,
                 name);
        h->failed = 1;
        return -1;
    }
    return 0;
}

static enum MHD_Result request_copy_header(void *cls, enum MHD_ValueKind kind, const char *name,
                                           const char *value)
{
    request_hdr_ctx *h = cls;
    static const char *const drop[] = {"authorization",  "x-api-key",      "host",
                                       "content-length", "expect",         "x-account-id",
                                       "x-request-id",   "x-forwarded-for"};
    for (size_t i = 0; i < sizeof drop / sizeof drop[0]; i++)
        if (strcasecmp(name, drop[i]) == 0) return MHD_YES;
    if (proxy_hop_by_hop(name)) return MHD_YES;
    /* Named by the client's Connection header: for this hop only. */
    if (h->conn && http1_list_has(h->conn, h->conn_len, name, strlen(name))) return MHD_YES;
    return request_add_header(h, name, value) == 0 ? MHD_YES : MHD_NO;
}

static void request_client_ip(gw_request *r, char *out, size_t len)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    snprintf(out, len, "unknown");
    if (!ci || !ci->client_addr) return;
    if (ci->client_addr->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)ci->client_addr)->sin_addr, out,
                  (socklen_t)len);
    else if (ci->client_addr->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ci->client_addr)->sin6_addr, out,
                  (socklen_t)len);
}

static int request_build_headers(gw_request *r)
{
    request_hdr_ctx h = {.r = r};
    char ip[INET6_ADDRSTRLEN + 1], buf[1024];
    int rc = -1;
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, request_gather_connection, &h);
    if (h.failed) goto out;
    h.xff = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "X-Forwarded-For");
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, request_copy_header, &h);
    if (h.failed) goto out;
    request_client_ip(r, ip, sizeof ip);
    if (h.xff && *h.xff)
        snprintf(buf, sizeof buf, "%s, %s", h.xff, ip);
    else
        snprintf(buf, sizeof buf, "%s", ip);
    if (request_add_header(&h, "X-Forwarded-For", buf) != 0) goto out;
    snprintf(buf, sizeof buf, "%" PRId64, r->account);
    if (request_add_header(&h, "X-Account-Id", buf) != 0) goto out;
    if (request_add_header(&h, "X-Request-Id", r->rid) != 0) goto out;
    rc = 0;
out:
    free(h.conn_joined);
    return rc;
}

static void request_proxy(gw_request *r)
{
    r->st = ST_PROXY;
    /* The raw target (path and query, as the client sent them) goes to the
     * upstream unchanged after its path prefix; uri, method and body live
     * as long as the request, so the call can point at them. */
    if (request_build_headers(r) != 0 ||
        proxy_start(r->w->px, &r->call, r->uri, r->method, r->body, r->body_len,
                    r->route->timeout_ms, request_on_upstream, r) != 0) {
        request_release_detached(r);
        request_error(r, MHD_HTTP_BAD_GATEWAY, "upstream_unavailable",
                      "could not start the upstream call");
    }
}

/* ---- reserve ------------------------------------------------------- */

static void request_on_wait_timer(evutil_socket_t fd, short what, void *arg)
{
    request_reserve(arg);
}

static void request_on_reserved(void *arg, int rc, const int64_t v[3])
{
    gw_request *r = arg;
    uint64_t now;
    if (rc != 0) {
        request_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "billing_unavailable",
                      "billing is unavailable, try again");
        return;
    }
    if (r->gone || r->w->aborted) {
        if (v[0] == HOT_RESERVE_HELD) request_release_detached(r);
        request_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "billing_unavailable", "cancelled");
        return;
    }
    if (v[0] == HOT_RESERVE_HELD) {
        request_proxy(r);
        return;
    }
    if (v[0] == HOT_RESERVE_UNKNOWN) {
        /* Keys exist only for accounts billing created, so an account the
         * hot store does not know has simply never been credited. */
        request_short(r, 0, 0);
        return;
    }
    now = worker_now_ms();
    if (v[1] + v[2] >= r->route->price && now < r->wait_until_ms) {
        /* Points exist but are held by calls in flight: wait for them. */
        uint64_t left = r->wait_until_ms - now;
        uint64_t d = (uint64_t)r->backoff_ms < left ? (uint64_t)r->backoff_ms : left;
        struct timeval tv = {(time_t)(d / 1000), (suseconds_t)((d % 1000) * 1000)};
        r->backoff_ms =
            r->backoff_ms * 2 > REQUEST_BACKOFF_MAX_MS ? REQUEST_BACKOFF_MAX_MS : r->backoff_ms * 2;
        if (!r->timer) r->timer = evtimer_new(r->w->base, request_on_wait_timer, r);
        if (r->timer && evtimer_add(r->timer, &tv) == 0) {
            r->st = ST_WAIT;
            return;
        }
    }
    request_short(r, v[1], v[2]);
}

static void request_reserve(gw_request *r)
{
    const gw_config *cfg = r->w->cfg;
    r->st = ST_RESERVE;
    if (hotclient_reserve(r->w->hc, r->account, r->rid, r->route->price,
                          r->route->timeout_ms + cfg->hold_grace_ms, r->route->id,
                          request_on_reserved, r) != 0)
        request_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "billing_unavailable",
                      "billing is unavailable, try again");
}

/* ---- balance endpoint ----------------------------------------------- */

static void request_on_balance(void *arg, int rc, const int64_t v[3])
{
    gw_request *r = arg;
    char buf[256];
    int64_t avail = 0, held = 0;
    if (rc < 0) {
        request_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "billing_unavailable",
                      "billing is unavailable, try again");
        return;
    }
    if (rc == 0) {
        held = v[2];
        avail = v[0] - v[1] - v[2];
        if (avail < 0) avail = 0;
    }
    snprintf(buf, sizeof buf,
             "{\"account_id\":%" PRId64 ",\"available\":%" PRId64 ",\"held\":%" PRId64 "}",
             r->account, avail, held);
    request_set_response(r, MHD_HTTP_OK, request_json(buf));
    if (r->resp) MHD_add_response_header(r->resp, "X-Points-Charged", "0");
    request_finish(r);
}

/* ---- usage endpoint ------------------------------------------------- */

static void request_on_usage(void *arg, const PGresult *res)
{
    gw_request *r = arg;
    unsigned status = 503;
    char *body = res ? usage_render(r->account, r->from, r->to, res, &status) : NULL;
    struct MHD_Response *resp;
    if (!body) {
        if (status == 422)
            request_error(r, 422, "too_many_rows", "the report is too large; narrow it");
        else
            request_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "usage_unavailable",
                          "usage reports are unavailable, try again");
        return;
    }
    resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        request_error(r, 500, "internal", "out of memory");
        return;
    }
    MHD_add_response_header(resp, "Content-Type", "application/json");
    MHD_add_response_header(resp, "X-Points-Charged", "0");
    request_set_response(r, MHD_HTTP_OK, resp);
    request_finish(r);
}

/* Authenticated: check the dates, then read the caller's rows (free, not
 * proxied). Postgres is optional for the gateway: 503 when it is not there. */
static void request_usage(gw_request *r)
{
    const char *from = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "from");
    const char *to = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "to");
    const char *msg, *params[USAGE_NPARAMS];
    char acct[24];
    int rc;
    if (usage_check_range(from, to, &msg) != 0) {
        request_error(r, MHD_HTTP_BAD_REQUEST, "bad_request", msg);
        return;
    }
    memcpy(r->from, from, sizeof r->from);
    memcpy(r->to, to, sizeof r->to);
    snprintf(acct, sizeof acct, "%" PRId64, r->account);
    params[0] = acct;
    params[1] = r->from;
    params[2] = r->to;
    r->st = ST_USAGE;
    rc = pgclient_query(r->w->pg, usage_sql, USAGE_NPARAMS, params, request_on_usage, r);
    if (rc == PGCLIENT_FULL)
        request_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "usage_unavailable",
                      "too many usage reports waiting, try again");
    else if (rc != 0)
        request_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "usage_unavailable",
                      "usage reports are unavailable, try again");
}

/* ---- authentication ------------------------------------------------- */

static void request_with_account(gw_request *r)
{
    if (r->usage) {
        request_usage(r);
        return;
    }
    if (r->balance) {
        r->st = ST_BALANCE;
        if (hotclient_balance(r->w->hc, r->account, request_on_balance, r) != 0)
            request_on_balance(r, -1, NULL);
        return;
    }
    r->wait_until_ms = worker_now_ms() + (uint64_t)r->w->cfg->hold_wait_ms;
    r->backoff_ms = REQUEST_BACKOFF_MIN_MS;
    request_reserve(r);
}

static void request_on_key(void *arg, int rc, const int64_t v[3])
{
    gw_request *r = arg;
    if (rc < 0) {
        request_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "billing_unavailable",
                      "billing is unavailable, try again");
        return;
    }
    authcache_put(&r->w->keys, r->keyhash, rc == 0 ? v[0] : AUTHCACHE_NONE, worker_now_ms());
    if (rc != 0 || v[0] < 0) {
        request_error(r, MHD_HTTP_UNAUTHORIZED, "unauthorized", "unknown or revoked API key");
        return;
    }
    if (r->gone) {
        request_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "billing_unavailable", "cancelled");
        return;
    }
    r->account = v[0];
    request_with_account(r);
}

/* Body read: authenticate (cache or Redis), then reserve. */
static void request_start(gw_request *r)
{
    int64_t acct;
    if (authcache_get(&r->w->keys, r->keyhash, worker_now_ms(), &acct)) {
        if (acct == AUTHCACHE_NONE) {
            request_error(r, MHD_HTTP_UNAUTHORIZED, "unauthorized", "unknown or revoked API key");
            return;
        }
        r->account = acct;
        request_suspend(r);
        request_with_account(r);
        return;
    }
    r->st = ST_KEY;
    request_suspend(r);
    if (hotclient_key(r->w->hc, r->keyhash, request_on_key, r) != 0) request_on_key(r, -1, NULL);
}

static void request_on_gone(gw_request *r)
{
    log_info("request %s: client went away (state %d)", r->rid, (int)r->st);
    switch (r->st) {
    case ST_PROXY:
        proxy_cancel(&r->call);
        request_release_detached(r);
        request_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "cancelled", "client went away");
        break;
    case ST_WAIT:
        request_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "cancelled", "client went away");
        break;
    default:
        break; /* a Redis command is in flight: its callback sees r->gone */
    }
}

void request_abort_all(worker *w)
{
    gw_request *r = w->suspended, *next;
    for (; r; r = next) {
        next = r->next;
        r->gone = 1;
        /* With a Redis command in flight the request must wait for its
         * callback (which sees gone): answering now would free it under
         * that callback. hotclient_free runs such callbacks at the end. */
        if (r->st == ST_PROXY || r->st == ST_WAIT) request_on_gone(r);
    }
    /* Usage queries: their callbacks run now (503) and answer. */
    pgclient_fail_all(w->pg);
}

/* ---- headers -------------------------------------------------------- */

static const char *request_key(struct MHD_Connection *conn, size_t *len)
{
    const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    if (v) {
        if (strncasecmp(v, "Bearer ", 7) != 0) return NULL;
        v += 7;
        while (*v == ' ')
            v++;
    } else {
        v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Api-Key");
    }
    if (v) *len = strlen(v);
    return v;
}

/* MHD_get_connection_values_n callback: clears *CLS at the first header
 * the upstream's request could not carry. Sizes, not strlen: a NUL inside a
 * name or value is caught too. */
static enum MHD_Result request_check_header(void *cls, enum MHD_ValueKind kind, const char *name,
                                            size_t name_len, const char *value, size_t value_len)
{
    int *ok = cls;
    if (!http1_token(name, name_len) || (value && !http1_text_ok(value, value_len))) {
        *ok = 0;
        return MHD_NO;
    }
    return MHD_YES;
}

/* Headers are in: everything that needs neither body nor Redis. */
static void request_begin(gw_request *r, const char *method)
{
    const gw_config *cfg = r->w->cfg;
    const char *q = strchr(r->uri, '?');
    const char *cl, *key;
    size_t keylen = 0;
    int headers_ok = 1;

    r->raw_path_len = q ? (size_t)(q - r->uri) : strlen(r->uri);
    snprintf(r->method, sizeof r->method, "%s", method);
    r->path = malloc(r->raw_path_len + 1);
    if (!r->path) {
        request_error(r, 500, "internal", "out of memory");
        return;
    }
    /* The raw target is forwarded verbatim on the upstream's request line,
     * which takes printable ASCII only; MHD lets control and non-ASCII bytes
     * through. Refused here, before anything is held (proxy_start would
     * refuse it too, but only after the hold). */
    if (strlen(method) >= sizeof r->method || !http1_target_ok(r->uri, strlen(r->uri)) ||
        routes_normalise(r->uri, r->raw_path_len, r->path, r->raw_path_len + 1) != 0) {
        request_error(r, MHD_HTTP_BAD_REQUEST, "bad_request", "invalid request path");
        return;
    }
    /* Likewise every header (RFC 9110: names are tokens, values have no
     * control byte but HTAB): MHD lets DEL and other control bytes through,
     * proxy_call_add_header refuses them, and that used to be a 502 after
     * the hold. Checked here, before the key is looked up or anything held. */
    MHD_get_connection_values_n(r->conn, MHD_HEADER_KIND, request_check_header, &headers_ok);
    if (!headers_ok) {
        request_error(r, MHD_HTTP_BAD_REQUEST, "bad_request", "invalid header");
        return;
    }
    r->table = r->w->routes;
    routes_ref(r->table);
    if (strcmp(r->path, "/_billing/balance") == 0 && strcmp(method, "GET") == 0) {
        r->balance = 1;
    } else if (strcmp(r->path, "/_billing/usage") == 0 && strcmp(method, "GET") == 0) {
        r->usage = 1;
    } else {
        r->route = routes_match(r->table, method, r->path);
        if (!r->route) {
            request_error(r, MHD_HTTP_NOT_FOUND, "no_route", "no such route");
            return;
        }
    }
    key = request_key(r->conn, &keylen);
    if (!key || apikey_hash(&cfg->pepper, key, keylen, r->keyhash) != 0) {
        request_error(r, MHD_HTTP_UNAUTHORIZED, "unauthorized",
                      key ? "malformed API key" : "missing API key");
        return;
    }
    cl = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Content-Length");
    if (cl) {
        char *end;
        unsigned long long n = strtoull(cl, &end, 10);
        if (*end == '\0' && n > (unsigned long long)cfg->max_body) {
            request_error(r, 413, "request_too_large", "request body too large");
            return;
        }
    }
    r->st = ST_BODY;
}

static void request_append_body(gw_request *r, const char *data, size_t n)
{
    size_t max = (size_t)r->w->cfg->max_body;
    if (r->body_too_big) return;
    if (r->body_len + n > max) {
        r->body_too_big = 1;
        free(r->body);
        r->body = NULL;
        r->body_len = r->body_cap = 0;
        return;
    }
    if (r->body_len + n > r->body_cap) {
        size_t cap = r->body_cap ? r->body_cap : 1024;
        char *nb;
        while (cap < r->body_len + n)
            cap *= 2;
        if (cap > max) cap = max;
        nb = realloc(r->body, cap);
        if (!nb) {
            r->body_too_big = 1;
            return;
        }
        r->body = nb;
        r->body_cap = cap;
    }
    memcpy(r->body + r->body_len, data, n);
    r->body_len += n;
}

enum MHD_Result request_handle(gw_request *r, struct MHD_Connection *conn, const char *method,
                               const char *upload_data, size_t *upload_data_size)
{
    r->conn = conn;
    switch (r->st) {
    case ST_NEW:
        request_begin(r, method);
        return r->resp ? request_queue(r) : MHD_YES;
    case ST_BODY:
        if (*upload_data_size > 0) {
            request_append_body(r, upload_data, *upload_data_size);
            *upload_data_size = 0;
            return MHD_YES;
        }
        if (r->body_too_big) {
            request_error(r, 413, "request_too_large", "request body too large");
            return request_queue(r);
        }
        request_start(r);
        return r->suspended ? MHD_YES : request_queue(r);
    case ST_DONE:
        return request_queue(r);
    default:
        /* Suspended work in progress; MHD should not call. Keep waiting. */
        return MHD_YES;
    }
}
