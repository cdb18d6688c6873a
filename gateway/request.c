/* request.c: one request from headers to answer (see request.h).
 *
 *   NEW --headers ok--> BODY --body read--> KEY? --> RESERVE <--> WAIT
 *        --> PROXY --> SETTLE --> DONE (answer handed to the server, freed)
 *
 * The request is suspended (on the worker's list, counted in flight) only
 * while something asynchronous runs (Redis command, upstream call, backoff
 * timer); checks that need nothing but the request itself answer
 * synchronously. The server keeps reading the client socket meanwhile and
 * calls request_gone when the client goes away: the upstream call is
 * aborted and the hold released (cost 0). Fire-and-forget settles (client
 * gone, shutdown) carry no pointer to the request, so a request never
 * outlives nor is outlived by a callback that uses it. A request ends by
 * answering (request_finish hands the answer to the server and frees it):
 * no code touches R after request_finish, request_error or request_short. */
#include "gateway/request.h"

#include "billing/apikey.h"
#include "billing/hotkeys.h"
#include "billing/log.h"
#include "gateway/forward.h"
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
    server_conn *conn;
    gw_request *prev, *next; /* worker's suspended list */
    enum request_state st;
    int suspended;
    int gone;
    char rid[33];
    const char *uri; /* raw request target, in the server's buffer */
    char *path;      /* decoded, for matching */
    size_t raw_path_len;
    char method[16];
    route_table *table;
    const route *route;
    int balance;
    int usage;             /* GET /_billing/usage */
    char from[11], to[11]; /* its dates, checked */
    char keyhash[APIKEY_HASH_HEX + 1];
    int64_t account;
    const char *body; /* the server's, valid until the answer */
    size_t body_len;
    uint64_t wait_until_ms;
    int backoff_ms;
    struct event *timer;
    proxy_call call;
    int64_t charge; /* what settle was asked to commit */
    lease *lease;   /* the price was promised by this lease, not held per call */
};

static void request_reserve(gw_request *r);
static int request_begin(gw_request *r);

gw_request *request_head(worker *w, server_conn *c)
{
    gw_request *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->w = w;
    r->conn = c;
    r->uri = server_target(c);
    worker_request_id(w, r->rid);
    r->account = -1;
    return request_begin(r) == 0 ? r : NULL;
}

static void request_lease_end(gw_request *r, int64_t charge, int commit, long status, hot_cb cb);

static void request_free(gw_request *r)
{
    /* Every path that ends a leased call ends it first; this is teardown's. */
    if (r->lease) request_lease_end(r, 0, 0, 0, NULL);
    proxy_call_clear(&r->call);
    if (r->timer) event_free(r->timer);
    if (r->table) routes_unref(r->table);
    free(r->path);
    free(r);
}

static void request_unsuspend(gw_request *r)
{
    worker *w = r->w;
    if (!r->suspended) return;
    if (r->timer) evtimer_del(r->timer);
    if (r->prev)
        r->prev->next = r->next;
    else
        w->suspended = r->next;
    if (r->next) r->next->prev = r->prev;
    r->prev = r->next = NULL;
    r->suspended = 0;
    w->inflight--;
}

void request_discard(gw_request *r)
{
    if (r->suspended) {
        /* Only at teardown, after every callback that could use R ran. */
        log_warn("request %s: discarded in flight (state %d)", r->rid, (int)r->st);
        if (r->st == ST_PROXY) proxy_cancel(&r->call);
        request_unsuspend(r);
    }
    request_free(r);
}

/* ---- answers ---------------------------------------------------------- */

/* Starts the answer: the status and the request id every answer carries. */
static void request_answer_begin(gw_request *r, unsigned status)
{
    server_reply_begin(r->conn, status);
    server_reply_header(r->conn, "X-Request-Id", r->rid);
}

/* Ends the request: hands the answer (begun, headers added) to the server
 * with BODY (TAKE: malloc'd, the server frees it) and frees R. */
static void request_finish(gw_request *r, char *body, size_t len, int take)
{
    r->st = ST_DONE;
    request_unsuspend(r);
    server_reply_send(r->conn, body, len, take);
    request_free(r);
}

/* A JSON answer; CHARGED, when set, is its X-Points-Charged. */
static void request_json(gw_request *r, unsigned status, const char *body, const char *charged)
{
    request_answer_begin(r, status);
    server_reply_header(r->conn, "Content-Type", "application/json");
    if (charged) server_reply_header(r->conn, "X-Points-Charged", charged);
    request_finish(r, (char *)body, strlen(body), 0);
}

static void request_error_charged(gw_request *r, unsigned status, const char *code, const char *msg,
                                  const char *charged)
{
    char buf[512];
    snprintf(buf, sizeof buf, "{\"error\":\"%s\",\"message\":\"%s\"}", code, msg);
    request_json(r, status, buf, charged);
}

static void request_error(gw_request *r, unsigned status, const char *code, const char *msg)
{
    request_error_charged(r, status, code, msg, NULL);
}

static void request_short(gw_request *r, int64_t avail, int64_t held)
{
    char buf[512];
    snprintf(buf, sizeof buf,
             "{\"error\":\"insufficient_points\",\"message\":\"not enough points for this "
             "call\",\"cost\":%" PRId64 ",\"available\":%" PRId64 ",\"held\":%" PRId64 "}",
             r->route->price, avail < 0 ? 0 : avail, held);
    request_json(r, 402, buf, NULL);
}

/* ---- suspension and the client leaving -------------------------------- */

static void request_on_gone(gw_request *r);

void request_gone(gw_request *r)
{
    r->gone = 1;
    request_on_gone(r);
}

static void request_suspend(gw_request *r)
{
    worker *w = r->w;
    if (r->suspended) return;
    r->suspended = 1;
    r->next = w->suspended;
    if (w->suspended) w->suspended->prev = r;
    w->suspended = r;
    w->inflight++;
}

/* ---- settle --------------------------------------------------------- */

/* Ends a call promised by its lease: the record goes with the lease's next
 * op; CB as hotclient_settle's (NULL: nobody waits, the request may go). */
static void request_lease_end(gw_request *r, int64_t charge, int commit, long status, hot_cb cb)
{
    lease *l = r->lease;
    r->lease = NULL;
    lease_end(l, r->rid, r->route->id, r->route->price, charge, commit, status, cb, r);
}

static void request_release_detached(gw_request *r)
{
    if (r->lease) {
        request_lease_end(r, 0, 0, 0, NULL);
        return;
    }
    hot_settle_args a = {.account = r->account, .charge = 0, .commit = 0, .status = 0};
    memcpy(a.rid, r->rid, sizeof a.rid);
    /* No callback: the request may be gone before the reply. Idempotent by rid. */
    hotclient_settle(r->w->hc, &a, NULL, NULL);
}

static void request_answer_upstream(gw_request *r, int64_t charged, int have_remaining,
                                    int64_t remaining)
{
    proxy_call *c = &r->call;
    const char *name, *value;
    char num[32], *body;
    size_t off = 0, len;

    request_answer_begin(r, (unsigned)c->status);
    while ((off = proxy_header_next(c, off, &name, &value)) != 0)
        if (forward_response_header(name)) server_reply_header(r->conn, name, value);
    snprintf(num, sizeof num, "%" PRId64, charged);
    server_reply_header(r->conn, "X-Points-Charged", num);
    if (have_remaining) {
        snprintf(num, sizeof num, "%" PRId64, remaining < 0 ? 0 : remaining);
        server_reply_header(r->conn, "X-Points-Remaining", num);
    }
    /* A HEAD answer carries the upstream's Content-Length (the size of the
     * GET answer) and no body; without one (chunked upstream) it says 0. */
    if (c->content_length > 0) server_reply_length(r->conn, c->content_length);
    body = c->body; /* the server frees it */
    len = c->body_len;
    c->body = NULL;
    c->body_len = c->body_cap = 0;
    request_finish(r, body, len, 1);
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
     * it): nothing was charged, and the answer says so (v[1] is 0). The
     * remaining points are said only with a charge applied: a lease that
     * was gone knows none. */
    request_answer_upstream(r, v[1], v[0] == 1, v[2]);
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
            request_error_charged(r, 504, "upstream_timeout",
                                  "the device API did not answer in time", "0");
        else if (c->result == PROXY_TOO_LARGE)
            request_error_charged(r, 502, "upstream_unavailable", "response too large", "0");
        else
            request_error_charged(r, 502, "upstream_unavailable",
                                  "the device API could not be reached", "0");
        return;
    }
    a.status = c->status;
    a.commit = routes_billable(r->route, c->status);
    if (a.commit) a.charge = r->route->usage ? request_usage_charge(r) : r->route->price;
    r->charge = a.charge;
    r->st = ST_SETTLE;
    if (r->lease) {
        request_lease_end(r, a.charge, a.commit, a.status, request_on_settled);
        return;
    }
    if (hotclient_settle(r->w->hc, &a, request_on_settled, r) != 0) request_on_settled(r, -1, NULL);
}

/* ---- proxy ---------------------------------------------------------- */

static void request_proxy(gw_request *r)
{
    r->st = ST_PROXY;
    /* The raw target (path and query, as the client sent them) goes to the
     * upstream unchanged after its path prefix; uri, method and body live
     * as long as the request, so the call can point at them. */
    if (forward_headers(r->conn, &r->call, r->account, r->rid) != 0 ||
        proxy_start(r->w->px, &r->call, r->uri, r->method, r->body, r->body_len,
                    r->route->timeout_ms, request_on_upstream, r) != 0) {
        request_release_detached(r);
        request_error(r, 502, "upstream_unavailable", "could not start the upstream call");
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
        request_error(r, 503, "billing_unavailable", "billing is unavailable, try again");
        return;
    }
    if (r->gone || r->w->aborted) {
        if (v[0] == HOT_RESERVE_HELD) request_release_detached(r);
        request_error(r, 503, "billing_unavailable", "cancelled");
        return;
    }
    if (v[0] == HOT_RESERVE_HELD) {
        lease_consider(r->w->leases, r->account, r->route->price, v[1]);
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
    r->lease = lease_take(r->w->leases, r->account, r->route->price);
    if (r->lease) {
        request_proxy(r);
        return;
    }
    r->st = ST_RESERVE;
    if (hotclient_reserve(r->w->hc, r->account, r->rid, r->route->price,
                          r->route->timeout_ms + cfg->hold_grace_ms, r->route->id,
                          request_on_reserved, r) != 0)
        request_error(r, 503, "billing_unavailable", "billing is unavailable, try again");
}

/* ---- balance endpoint ----------------------------------------------- */

static void request_on_balance(void *arg, int rc, const int64_t v[3])
{
    gw_request *r = arg;
    char buf[256];
    int64_t avail = 0, held = 0;
    if (rc < 0) {
        request_error(r, 503, "billing_unavailable", "billing is unavailable, try again");
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
    request_json(r, 200, buf, "0");
}

/* ---- usage endpoint ------------------------------------------------- */

static void request_on_usage(void *arg, const PGresult *res)
{
    gw_request *r = arg;
    unsigned status = 503;
    char *body = res ? usage_render(r->account, r->from, r->to, res, &status) : NULL;
    if (!body) {
        if (status == 422)
            request_error(r, 422, "too_many_rows", "the report is too large; narrow it");
        else
            request_error(r, 503, "usage_unavailable", "usage reports are unavailable, try again");
        return;
    }
    request_answer_begin(r, 200);
    server_reply_header(r->conn, "Content-Type", "application/json");
    server_reply_header(r->conn, "X-Points-Charged", "0");
    request_finish(r, body, strlen(body), 1);
}

/* The value of query argument NAME of the target, percent-decoded (and '+'
 * as a space, as forms write it) into OUT: 1, or 0 when absent. A value that
 * does not fit is cut short, which no date survives. */
static int request_query_arg(const gw_request *r, const char *name, char *out, size_t outlen)
{
    const char *q = strchr(r->uri, '?'), *p;
    size_t nl = strlen(name);
    if (!q) return 0;
    for (p = q + 1; *p; p += strcspn(p, "&") + (p[strcspn(p, "&")] ? 1 : 0)) {
        size_t n = 0;
        if (strncmp(p, name, nl) != 0 || (p[nl] != '=' && p[nl] != '&' && p[nl] != '\0')) continue;
        p += nl;
        if (*p == '=') p++;
        while (*p && *p != '&' && n + 1 < outlen) {
            unsigned hi, lo;
            if (*p == '%' && sscanf(p + 1, "%1x%1x", &hi, &lo) == 2) {
                out[n++] = (char)(hi * 16 + lo);
                p += 3;
            } else {
                out[n++] = *p == '+' ? ' ' : *p;
                p++;
            }
        }
        out[n] = '\0';
        return 1;
    }
    return 0;
}

/* Authenticated: check the dates, then read the caller's rows (free, not
 * proxied). Postgres is optional for the gateway: 503 when it is not there. */
static void request_usage(gw_request *r)
{
    char from[16], to[16];
    const char *msg, *params[USAGE_NPARAMS];
    char acct[24];
    int rc;
    if (usage_check_range(request_query_arg(r, "from", from, sizeof from) ? from : NULL,
                          request_query_arg(r, "to", to, sizeof to) ? to : NULL, &msg) != 0) {
        request_error(r, 400, "bad_request", msg);
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
        request_error(r, 503, "usage_unavailable", "too many usage reports waiting, try again");
    else if (rc != 0)
        request_error(r, 503, "usage_unavailable", "usage reports are unavailable, try again");
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
        request_error(r, 503, "billing_unavailable", "billing is unavailable, try again");
        return;
    }
    authcache_put(&r->w->keys, r->keyhash, rc == 0 ? v[0] : AUTHCACHE_NONE, worker_now_ms());
    if (rc != 0 || v[0] < 0) {
        request_error(r, 401, "unauthorized", "unknown or revoked API key");
        return;
    }
    if (r->gone) {
        request_error(r, 503, "billing_unavailable", "cancelled");
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
            request_error(r, 401, "unauthorized", "unknown or revoked API key");
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
        request_error(r, 503, "cancelled", "client went away");
        break;
    case ST_WAIT:
        request_error(r, 503, "cancelled", "client went away");
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

static const char *request_key(const server_conn *conn, size_t *len)
{
    const char *v = server_header(conn, "Authorization");
    if (v) {
        if (strncasecmp(v, "Bearer ", 7) != 0) return NULL;
        v += 7;
        while (*v == ' ')
            v++;
    } else {
        v = server_header(conn, "X-Api-Key");
    }
    if (v) *len = strlen(v);
    return v;
}

/* Headers are in: everything that needs neither body nor Redis. 0, or -1
 * when it answered (R is freed). The server already refused what is not
 * HTTP (request line, header syntax: names are tokens, values have no
 * control byte but HTAB, which proxy_call_add_header would refuse after
 * the hold) and bodies past MAX_BODY_BYTES. */
static int request_begin(gw_request *r)
{
    const gw_config *cfg = r->w->cfg;
    const char *method = server_method(r->conn);
    const char *q = strchr(r->uri, '?');
    const char *key;
    size_t keylen = 0;

    r->raw_path_len = q ? (size_t)(q - r->uri) : strlen(r->uri);
    snprintf(r->method, sizeof r->method, "%s", method);
    r->path = malloc(r->raw_path_len + 1);
    if (!r->path) {
        request_error(r, 500, "internal", "out of memory");
        return -1;
    }
    /* The raw target is forwarded verbatim on the upstream's request line,
     * which takes printable ASCII only (the server checks it too). Refused
     * here, before anything is held (proxy_start would refuse it too, but
     * only after the hold). */
    if (strlen(method) >= sizeof r->method || !http1_target_ok(r->uri, strlen(r->uri)) ||
        routes_normalise(r->uri, r->raw_path_len, r->path, r->raw_path_len + 1) != 0) {
        request_error(r, 400, "bad_request", "invalid request path");
        return -1;
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
            request_error(r, 404, "no_route", "no such route");
            return -1;
        }
    }
    key = request_key(r->conn, &keylen);
    if (!key || apikey_hash(&cfg->pepper, key, keylen, r->keyhash) != 0) {
        request_error(r, 401, "unauthorized", key ? "malformed API key" : "missing API key");
        return -1;
    }
    r->st = ST_BODY;
    return 0;
}

void request_body_done(gw_request *r)
{
    r->body = server_body(r->conn, &r->body_len);
    request_start(r);
}
