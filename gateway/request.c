/* request.c: one request from headers to answer (see request.h).
 *
 *   NEW --headers ok--> BODY --body read--> KEY? --> RESERVE <--> WAIT
 *        --> PROXY --> SETTLE --> DONE (answer handed to the server, freed)
 *
 * A request whose body is not here with its head (request_early) goes the
 * other way round, so that an unknown key or an empty account costs no body
 * bytes: KEY? --> RESERVE <--> WAIT --> BODYWAIT (the server reads the body,
 * sending 100 Continue only now) --> PROXY. Its per-call hold is taken for
 * the body deadline plus the upstream timeout (and no lease promise is used:
 * a lease's deadline is sized for the upstream timeout only); a body that
 * never completes releases it, cost 0.
 *
 * The request is suspended (on the worker's list, counted in flight) only
 * while something asynchronous runs (Redis command, upstream call, backoff
 * timer, the body after the reserve); checks that need nothing but the
 * request itself answer synchronously. The server keeps watching the client
 * socket meanwhile and calls request_gone when the client goes away. What
 * that costs depends on how far the call got: before any byte of it was
 * written to the upstream (Redis command, wait, queued for or connecting an
 * upstream connection, body still coming), it is dropped and its hold
 * released (cost 0); once written, the upstream may act on it, so it runs to
 * its answer or its timeout and is settled by that, as if the client were
 * there (billable: charged; failure: 0), and the answer is dropped. Such an
 * orphan keeps its server connection (closed for I/O) until it answers, so
 * it still counts against MAX_CONNECTIONS, the upstream caps and its
 * timeout. Fire-and-forget settles (client gone, shutdown) carry no pointer
 * to the request, so a request never outlives nor is outlived by a callback
 * that uses it. A request ends by answering (request_finish hands the answer
 * to the server and frees it): no code touches R after request_finish,
 * request_error or request_short.
 *
 * Calls short of points while points are held by calls in flight wait for
 * them (no false refusal). The waiters of one account on one worker share
 * one queue (request_waitq): one of them asks Redis, one reserve at a time,
 * on a backoff (REQUEST_BACKOFF_*), and at once when this worker settles or
 * releases a hold of that account or a waiter got its points. So the Redis
 * work of waiting grows with the accounts waiting and the holds that change,
 * not with the number of waiters. The one that asks is the first in line
 * whose price the account's last known available points cover, else the
 * first in line: calls of one account have different prices, and a cheap
 * call that the available points cover must not wait behind a dear one that
 * waits for held points (nor be refused at its deadline with the points
 * there). A waiter is refused at its deadline only when the last figures
 * say its price is not available. */
#include "gateway/request.h"

#include "common/apikey.h"
#include "common/hotkeys.h"
#include "common/log.h"
#include "gateway/forward.h"
#include "gateway/http1.h"
#include "gateway/idem.h"
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
#include <time.h>
#include <event2/event_struct.h>

#define REQUEST_BACKOFF_MIN_MS 2
#define REQUEST_BACKOFF_MAX_MS 50
#define REQUEST_WAIT_BUCKETS 256
/* "client went away" lines per worker per second (then one summary). */
#define REQUEST_GONE_LOG_PER_SEC 10

enum request_state {
    ST_NEW,
    ST_BODY,
    ST_KEY,
    ST_BALANCE,
    ST_USAGE,
    ST_RESERVE,
    ST_WAIT,
    ST_BODYWAIT, /* early: reserved, the body is being read */
    ST_PROXY,
    ST_SETTLE,
    ST_DONE,
};

typedef struct request_waitq request_waitq;
typedef struct request_ctx request_ctx;

struct gw_request {
    worker *w;
    server_conn *conn;
    gw_request *prev, *next; /* worker's suspended list */
    enum request_state st;
    int suspended;
    int gone;
    int early;   /* authenticated and reserved before the body (request_early) */
    int held;    /* holds a per-call hold (reserved, not settled or released) */
    int body_in; /* the body is complete (request_body_done) */
    char rid[33];
    const char *uri; /* raw request target, in the server's buffer */
    char *path;      /* decoded, for matching */
    size_t raw_path_len;
    char method[16];
    route_table *table;
    const route *route;
    int balance;
    int64_t bal_avail, bal_held; /* the balance endpoint's figures, while it reads caps */
    int usage;                   /* GET /_billing/usage */
    char from[11], to[11];       /* its dates, checked */
    char keyhash[APIKEY_HASH_HEX + 1];
    int64_t account;
    int64_t key_id; /* the API key's id (0 unknown): its limits in reserve.lua */
    /* The rate limit closest to refusing, from the reserve (HOT_RESERVE_F_*):
     * the RateLimit headers of the answer. */
    int rl_flags;
    int64_t rl_q, rl_w_ms, rl_r, rl_t_ms;
    const char *body; /* the server's, valid until the answer */
    size_t body_len;
    uint64_t wait_until_ms;
    request_waitq *waitq;          /* the account's queue, while waiting or its reserve */
    gw_request *wprev, *wnext;     /* in waitq's FIFO */
    int64_t last_avail, last_held; /* the last reserve's figures, for a 402 */
    proxy_call call;
    int64_t charge; /* what settle was asked to commit */
    lease *lease;   /* the price was promised by this lease, not held per call */
    /* what the metrics and the access log say of it (request_observe) */
    unsigned status;     /* of the answer begun */
    int outcome;         /* enum gw_outcome + 1; 0: derived from the status */
    int waiting;         /* counted in the worker's waiting calls */
    int64_t hold_pts;    /* held or promised */
    int64_t charged_pts; /* charged by its settle */
    uint64_t t0_us, up_t0_us, wait_t0_us;
    int64_t up_us, wait_us;
    /* Idempotency-Key (idem.h): the call carries one (a POST or PATCH on a
     * route where it is not off): its hash and the request's fingerprint,
     * checked in reserve.lua's call; the marker its settle stores (owned,
     * valid until the settle's callback). */
    int idem;
    hot_idem_args idem_args;
    char *idem_val;
    size_t idem_len;
};

/* One account's waiters on this worker (see the top of the file). */
struct request_waitq {
    request_ctx *ctx;
    request_waitq *next; /* hash chain */
    int64_t account;
    gw_request *head, *tail; /* FIFO of ST_WAIT requests */
    int n;
    gw_request *trying; /* the waiter whose reserve is in flight */
    int backoff_ms;
    int64_t avail, held; /* Redis's last figures for the account, for a 402 */
    int pin;             /* > 0: in use on the stack, not to be freed */
    struct event timer;
    int timer_on;
};

/* Per worker (w->rq): the wait queues and the log limiter. */
struct request_ctx {
    worker *w;
    request_waitq *buckets[REQUEST_WAIT_BUCKETS];
    log_limit gone_log;
};

static void request_reserve(gw_request *r);
static void request_on_reserved(void *arg, int rc, const hot_reply *rep);
static int request_begin(gw_request *r);
static void request_waitq_leave(gw_request *r);
static void request_waitq_kick(worker *w, int64_t account);

gw_request *request_head(worker *w, server_conn *c)
{
    gw_request *r;
    if (!w->rq) { /* made with the first request, freed by request_teardown */
        w->rq = calloc(1, sizeof *w->rq);
        if (!w->rq) return NULL;
        w->rq->w = w;
    }
    r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->w = w;
    r->conn = c;
    r->t0_us = worker_now_us();
    r->uri = server_target(c);
    worker_request_id(w, r->rid);
    r->account = -1;
    return request_begin(r) == 0 ? r : NULL;
}

static void request_lease_end(gw_request *r, int64_t charge, int commit, long status, hot_cb cb);

/* R no longer waits for held points (it got them, or is answered). */
static void request_wait_end(gw_request *r)
{
    if (!r->waiting) return;
    r->waiting = 0;
    r->wait_us = (int64_t)(worker_now_us() - r->wait_t0_us);
    metric_gauge_add(&r->w->m.waiting, -1);
}

static void request_free(gw_request *r)
{
    request_wait_end(r);
    /* Every path that ends a leased call ends it first; this is teardown's
     * (after the lease table is gone there is nothing to end it with). */
    if (r->lease && r->w->leases) request_lease_end(r, 0, 0, 0, NULL);
    if (r->waitq) request_waitq_leave(r);
    proxy_call_clear(&r->call);
    if (r->table) routes_unref(r->table);
    free(r->idem_val);
    free(r->path);
    free(r);
}

static void request_unsuspend(gw_request *r)
{
    worker *w = r->w;
    if (!r->suspended) return;
    if (r->prev)
        r->prev->next = r->next;
    else
        w->suspended = r->next;
    if (r->next) r->next->prev = r->prev;
    r->prev = r->next = NULL;
    r->suspended = 0;
    w->inflight--;
}

static void request_release_detached(gw_request *r);

void request_discard(gw_request *r)
{
    if (r->suspended) {
        /* Only at teardown, after every callback that could use R ran; or
         * an early request whose body did not come (closed, timed out,
         * malformed): its hold goes back, cost 0. */
        if (r->st == ST_BODYWAIT)
            log_debug("request %s: body not completed; hold released", r->rid);
        else
            log_warn("request %s: discarded in flight (state %d)", r->rid, (int)r->st);
        if (r->st == ST_PROXY) proxy_cancel(&r->call);
        if (r->st == ST_BODYWAIT || r->st == ST_PROXY) request_release_detached(r);
        request_unsuspend(r);
    }
    request_free(r);
}

/* ---- answers ---------------------------------------------------------- */

/* Starts the answer: the status and the request id every answer carries. */
static void request_answer_begin(gw_request *r, unsigned status)
{
    r->status = status;
    server_reply_begin(r->conn, status);
    server_reply_header(r->conn, "X-Request-Id", r->rid);
}

static enum gw_outcome request_outcome(const gw_request *r)
{
    if (r->outcome) return (enum gw_outcome)(r->outcome - 1);
    switch (r->status) {
    case 401:
        return GW_OUT_UNAUTHORIZED;
    case 402:
        return GW_OUT_REFUSED;
    case 403:
        return GW_OUT_FORBIDDEN;
    case 404:
        return GW_OUT_NO_ROUTE;
    case 429:
        return GW_OUT_RATE_LIMITED;
    case 503:
        return GW_OUT_BILLING_UNAVAILABLE;
    default:
        break;
    }
    if (r->status >= 400 && r->status < 500) return GW_OUT_BAD_REQUEST;
    if (r->status < 300 && (r->balance || r->usage)) return GW_OUT_INFO;
    return GW_OUT_ERROR;
}

/* The answered call, counted (per worker: no lock) and, with ACCESS_LOG
 * on, logged. BYTES_OUT: the answer's body. */
static void request_observe(gw_request *r, size_t bytes_out)
{
    gw_metrics *m = &r->w->m;
    enum gw_outcome o = request_outcome(r);
    int slot = r->route ? r->route->metric_slot
                        : (r->balance || r->usage ? GW_SLOT_BILLING : GW_SLOT_NONE);
    int64_t total_us = (int64_t)(worker_now_us() - r->t0_us);
    int64_t released = r->hold_pts > r->charged_pts ? r->hold_pts - r->charged_pts : 0;

    request_wait_end(r);
    gw_metrics_call(m, slot, gw_metrics_method(r->method), r->status, o, r->charged_pts, released);
    metric_observe(&m->request_us, &metric_latency_us, total_us);
    if (r->up_t0_us) metric_observe(&m->upstream_us, &metric_latency_us, r->up_us);
    if (r->wait_t0_us) metric_observe(&m->wait_us, &metric_latency_us, r->wait_us);
    if (log_access_on()) {
        char key_id[13] = "";
        log_access_rec a = {
            .request_id = r->rid,
            .account_id = r->account,
            .route = r->route ? r->route->id : (r->balance || r->usage ? "_billing" : NULL),
            .method = r->method,
            .path = r->path,
            .status = (int)r->status,
            .charged = r->charged_pts,
            .outcome = gw_metrics_outcome_name(o),
            .total_ms = (double)total_us / 1000.0,
            .upstream_ms = (double)r->up_us / 1000.0,
            .wait_ms = (double)r->wait_us / 1000.0,
            .bytes_in = (long long)r->body_len,
            .bytes_out = (long long)bytes_out,
        };
        /* A prefix of the key's hash names the key to whoever holds the
         * key list; it gives nothing of the key itself. */
        if (r->keyhash[0]) {
            memcpy(key_id, r->keyhash, sizeof key_id - 1);
            a.key_id = key_id;
        }
        log_access(&a);
    }
}

static void request_set_outcome(gw_request *r, enum gw_outcome o)
{
    r->outcome = (int)o + 1;
}

/* Ends the request: hands the answer (begun, headers added) to the server
 * with BODY (TAKE: malloc'd, the server frees it) and frees R. */
static void request_finish(gw_request *r, char *body, size_t len, int take)
{
    request_observe(r, len);
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

/* The call is dropped without an answer from the upstream (the client
 * left, the gateway stops): what it held went back. */
static void request_cancel(gw_request *r, const char *why)
{
    request_set_outcome(r, GW_OUT_CANCELLED);
    request_error(r, 503, "cancelled", why);
}

/* The account's wait queue on this worker is full (MAX_WAITERS). */
static void request_too_many_waiting(gw_request *r)
{
    request_set_outcome(r, GW_OUT_TOO_MANY_WAITING);
    request_error(r, 503, "too_many_waiting",
                  "too many calls of this account are waiting for held points, try again");
}

/* Billing could not decide (hot_cb rc < 0, or Redis lacks the account):
 * 503 billing_unavailable, saying why (hotclient.h's HOT_ERR_*). Never 401 or 402
 * for what the hot store cannot tell. */
static void request_unavailable(gw_request *r, int rc)
{
    const char *msg = "billing is unavailable, try again";
    if (rc == HOT_ERR_BACKLOG)
        msg = "settlement backlog is full, try again later";
    else if (rc == HOT_ERR_NODATA)
        msg = "billing data is being restored, try again";
    request_error(r, 503, "billing_unavailable", msg);
}

/* The RateLimit-Policy and RateLimit headers (draft-ietf-httpapi-ratelimit-
 * headers): quota Q per W ms, R left, T ms until the bucket is full (or,
 * refused, until one call passes). */
static void request_rate_headers(gw_request *r, int64_t q, int64_t w_ms, int64_t rem, int64_t t_ms)
{
    char buf[96];
    snprintf(buf, sizeof buf, "\"limit\";q=%" PRId64 ";w=%" PRId64, q, (w_ms + 999) / 1000);
    server_reply_header(r->conn, "RateLimit-Policy", buf);
    snprintf(buf, sizeof buf, "\"limit\";r=%" PRId64 ";t=%" PRId64, rem < 0 ? 0 : rem,
             (t_ms + 999) / 1000);
    server_reply_header(r->conn, "RateLimit", buf);
}

/* 429: a rate limit or a spending cap refused the call before the upstream
 * (V: reserve.lua's answer); it cost nothing and took nothing. */
static void request_limited(gw_request *r, const hot_reserve_reply *v)
{
    char buf[512], secs[32];
    int rate = v->status == HOT_RESERVE_RATE_LIMITED;
    int64_t retry_s = ((rate ? v->rate.reset_ms : v->cap.reset_ms) + 999) / 1000;
    if (retry_s < 1) retry_s = 1;
    snprintf(secs, sizeof secs, "%" PRId64, retry_s);
    if (rate) {
        snprintf(buf, sizeof buf,
                 "{\"error\":\"rate_limited\",\"message\":\"too many calls: at most %" PRId64
                 " per %" PRId64 " s; retry after %" PRId64 " s\",\"retry_after_s\":%" PRId64
                 ",\"limit\":{\"quota\":%" PRId64 ",\"window_s\":%" PRId64 "}}",
                 v->rate.quota, (v->rate.window_ms + 999) / 1000, retry_s, retry_s, v->rate.quota,
                 (v->rate.window_ms + 999) / 1000);
        request_set_outcome(r, GW_OUT_RATE_LIMITED);
    } else {
        /* When it resets: the next UTC midnight (or first of the month) as
         * Redis counts it, written in the gateway's clock. */
        char at[32];
        time_t t = (time_t)((worker_wall_ms() + v->cap.reset_ms + 500) / 1000);
        struct tm tm;
        gmtime_r(&t, &tm);
        strftime(at, sizeof at, "%Y-%m-%dT%H:%M:%SZ", &tm);
        snprintf(buf, sizeof buf,
                 "{\"error\":\"quota_exceeded\",\"message\":\"this call would pass the %s "
                 "spending cap of %" PRId64 " points; it resets at %s\",\"cap\":%" PRId64
                 ",\"period\":\"%s\",\"remaining\":%" PRId64 ",\"cost\":%" PRId64
                 ",\"resets_at\":\"%s\"}",
                 v->cap.period == HOT_CAP_MONTHLY ? "monthly" : "daily", v->cap.cap, at, v->cap.cap,
                 v->cap.period == HOT_CAP_MONTHLY ? "month" : "day", v->cap.left, r->route->price,
                 at);
        request_set_outcome(r, GW_OUT_QUOTA_EXCEEDED);
    }
    request_answer_begin(r, 429);
    server_reply_header(r->conn, "Content-Type", "application/json");
    server_reply_header(r->conn, "Retry-After", secs);
    if (rate) request_rate_headers(r, v->rate.quota, v->rate.window_ms, 0, v->rate.reset_ms);
    server_reply_header(r->conn, "X-Points-Charged", "0");
    request_finish(r, buf, strlen(buf), 0);
}

/* reserve.lua decided a call with an Idempotency-Key from its marker
 * (V: its answer, HOT_RESERVE_REPLAY..IDEM_BUDGET): nothing was taken, it
 * is not proxied and costs 0. A replay is the first call's stored answer
 * with Idempotent-Replayed; the others are 409, 422 or 429. */
static void request_idem_answer(gw_request *r, const hot_reserve_reply *v)
{
    gw_metrics *m = &r->w->m;
    char buf[512], num[32];
    const char *s, *name, *value;
    size_t len, off = 0;
    idem_answer a;

    request_set_outcome(r, GW_OUT_IDEM_CONFLICT);
    switch (v->status) {
    case HOT_RESERVE_REPLAY:
        s = hotclient_reserve_answer(r->w->hc, &len);
        if (!s || idem_answer_parse(s, len, &a) != 0) {
            log_error("request %s: account %" PRId64 ": a stored answer that does not parse",
                      r->rid, r->account);
            request_unavailable(r, HOT_ERR_UNAVAILABLE);
            return;
        }
        metric_add(&m->idem[GW_IDEM_REPLAYED], 1);
        request_set_outcome(r, GW_OUT_REPLAYED);
        request_answer_begin(r, a.status);
        while ((off = idem_answer_header_next(&a, off, &name, &value)) != 0)
            server_reply_header(r->conn, name, value);
        server_reply_header(r->conn, "Idempotent-Replayed", "true");
        server_reply_header(r->conn, "X-Points-Charged", "0");
        snprintf(num, sizeof num, "%" PRId64, v->available < 0 ? 0 : v->available);
        server_reply_header(r->conn, "X-Points-Remaining", num);
        request_finish(r, (char *)a.body, a.body_len, 0);
        return;
    case HOT_RESERVE_IDEM_IN_FLIGHT:
        metric_add(&m->idem[GW_IDEM_IN_FLIGHT], 1);
        snprintf(buf, sizeof buf,
                 "{\"error\":\"idempotency_in_flight\",\"message\":\"the first call with this "
                 "Idempotency-Key is still running; retry later to get its answer\","
                 "\"retry_after_s\":1,\"expires_in_s\":%" PRId64 "}",
                 (v->idem.retry_ms + 999) / 1000);
        request_answer_begin(r, 409);
        server_reply_header(r->conn, "Retry-After", "1");
        break;
    case HOT_RESERVE_IDEM_REUSED:
        metric_add(&m->idem[GW_IDEM_REUSED], 1);
        snprintf(buf, sizeof buf,
                 "{\"error\":\"idempotency_key_reused\",\"message\":\"this Idempotency-Key was "
                 "used with another request (method, path or body); use a new key for a new "
                 "request\"}");
        request_answer_begin(r, 422);
        break;
    case HOT_RESERVE_IDEM_NOT_KEPT:
        metric_add(&m->idem[GW_IDEM_NOT_KEPT], 1);
        snprintf(buf, sizeof buf,
                 "{\"error\":\"%s\",\"message\":\"the first call with this Idempotency-Key was "
                 "carried out and billed (status %" PRId64 ") but its answer %s; it is not run "
                 "again\",\"status\":%" PRId64 "}",
                 v->idem.why == HOT_IDEM_TOO_LARGE ? "idempotency_response_too_large"
                                                   : "idempotency_response_unavailable",
                 v->idem.status,
                 v->idem.why == HOT_IDEM_TOO_LARGE ? "was too large to keep"
                                                   : "could not be kept (its settle came late)",
                 v->idem.status);
        request_answer_begin(r, 409);
        break;
    default: /* HOT_RESERVE_IDEM_BUDGET */
        metric_add(&m->idem[GW_IDEM_BUDGET], 1);
        snprintf(num, sizeof num, "%" PRId64, v->idem.retry_ms / 1000 + 1);
        snprintf(buf, sizeof buf,
                 "{\"error\":\"idempotency_budget_exceeded\",\"message\":\"this account keeps "
                 "as many answers for retries as it may (IDEMPOTENCY_ACCOUNT_BYTES); retry "
                 "after %s s, or send the call without an Idempotency-Key\","
                 "\"retry_after_s\":%s}",
                 num, num);
        request_answer_begin(r, 429);
        server_reply_header(r->conn, "Retry-After", num);
        break;
    }
    server_reply_header(r->conn, "Content-Type", "application/json");
    server_reply_header(r->conn, "X-Points-Charged", "0");
    request_finish(r, buf, strlen(buf), 0);
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
        if (r->w->leases) request_lease_end(r, 0, 0, 0, NULL);
        r->lease = NULL; /* past teardown: the sweeper expires it, cost 0 */
        return;
    }
    if (!r->held || !r->w->hc) return;
    hot_settle_args a = {.account = r->account, .charge = 0, .commit = 0, .status = 0};
    memcpy(a.rid, r->rid, sizeof a.rid);
    r->held = 0;
    if (r->idem) {
        /* Not billable: its in-flight marker goes, a retry runs anew. */
        a.has_idem = 1;
        a.idem = r->idem_args;
        metric_add(&r->w->m.idem[GW_IDEM_CLEARED], 1);
    }
    /* No callback: the request may be gone before the reply. Idempotent by rid. */
    hotclient_settle(r->w->hc, &a, NULL, NULL);
    /* The points are free again: this account's waiters try now (the
     * release goes to Redis before their reserve, on the same connection). */
    request_waitq_kick(r->w, r->account);
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
    if (r->rl_flags & HOT_RESERVE_F_RATE)
        request_rate_headers(r, r->rl_q, r->rl_w_ms, r->rl_r, r->rl_t_ms);
    if (have_remaining) {
        snprintf(num, sizeof num, "%" PRId64, remaining < 0 ? 0 : remaining);
        server_reply_header(r->conn, "X-Points-Remaining", num);
    }
    /* A HEAD answer carries the upstream's Content-Length (the size of the
     * GET answer) and no body; without one (chunked upstream) it says 0. */
    if (c->content_length > 0) server_reply_length(r->conn, c->content_length);
    body = buf_detach(&c->body, &len); /* the server frees it */
    request_finish(r, body, len, 1);
}

static void request_on_settled(void *arg, int rc, const hot_reply *rep)
{
    gw_request *r = arg;
    const hot_settle_reply *v = &rep->settle;
    /* Settled or queued: the account's holds changed; its waiters try. */
    request_waitq_kick(r->w, r->account);
    if (rc != 0) {
        /* Queued for resend by hotclient; the answer still goes out, with the
         * charge that will be applied and no remaining figure. */
        log_warn("request %s: settle deferred (redis unavailable)", r->rid);
        r->charged_pts = r->charge;
        request_answer_upstream(r, r->charge, 0, 0);
        return;
    }
    if (v->status == 0) log_warn("request %s: hold already gone at settle (swept?)", r->rid);
    /* status < 0: the account's data in Redis is unusable (hotclient
     * logged it): nothing was charged, and the answer says so (charged 0). The
     * remaining points are said only with a charge applied: a lease that
     * was gone knows none. */
    r->charged_pts = v->charged;
    request_answer_upstream(r, v->charged, v->status == 1, v->available);
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

/* The upstream's answer (or its failure) decides the charge, whether or not
 * the client is still there (r->gone: the answer is then dropped). */
/* A call with an Idempotency-Key is settled with what becomes of its
 * marker: a billable answer is stored (or, too large, its status only: a
 * retry then gets 409, never a second run), any other clears it. Out of
 * memory, the settle stores the marker of an answer not kept (hotclient). */
static void request_idem_settle(gw_request *r, hot_settle_args *a)
{
    gw_metrics *m = &r->w->m;
    int kept = 0;
    a->has_idem = 1;
    a->idem = r->idem_args;
    if (!a->commit) {
        metric_add(&m->idem[GW_IDEM_CLEARED], 1);
        return;
    }
    r->idem_val = idem_marker_answer(r->idem_args.fp, r->rid, &r->call,
                                     (size_t)r->w->cfg->idem_max_body, &r->idem_len, &kept);
    if (!r->idem_val) log_warn("request %s: out of memory: its answer is not kept", r->rid);
    a->idem_val = r->idem_val;
    a->idem_len = r->idem_len;
    metric_add(&m->idem[kept ? GW_IDEM_STORED : GW_IDEM_STORED_BARE], 1);
    metric_add(&m->idem_stored_bytes, r->idem_len);
}

static void request_on_upstream(void *arg, proxy_call *c)
{
    gw_request *r = arg;
    hot_settle_args a = {.account = r->account, .status = 0};
    memcpy(a.rid, r->rid, sizeof a.rid);

    r->up_us = (int64_t)(worker_now_us() - r->up_t0_us);
    if (c->result != PROXY_OK) {
        request_release_detached(r);
        request_set_outcome(r, GW_OUT_RELEASED);
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
    if (r->idem) request_idem_settle(r, &a);
    request_set_outcome(r, a.commit ? GW_OUT_CHARGED : GW_OUT_RELEASED);
    r->st = ST_SETTLE;
    if (r->lease) {
        request_lease_end(r, a.charge, a.commit, a.status, request_on_settled);
        return;
    }
    r->held = 0; /* the settle ends the hold, delivered or queued */
    if (hotclient_settle(r->w->hc, &a, request_on_settled, r) != 0)
        request_on_settled(r, -1, &(hot_reply){{0}});
}

/* ---- proxy ---------------------------------------------------------- */

static void request_proxy(gw_request *r)
{
    r->st = ST_PROXY;
    r->up_t0_us = worker_now_us();
    /* The raw target (path and query, as the client sent them) goes to the
     * upstream unchanged after its path prefix; uri, method and body live
     * as long as the request, so the call can point at them. */
    if (forward_headers(r->conn, &r->call, r->account, r->rid) != 0 ||
        proxy_start(r->w->px, &r->call, r->uri, r->method, r->body, r->body_len,
                    r->route->timeout_ms, request_on_upstream, r) != 0) {
        request_release_detached(r);
        request_set_outcome(r, GW_OUT_RELEASED);
        request_error(r, 502, "upstream_unavailable", "could not start the upstream call");
    }
}

/* The price is held (or promised): on to the upstream, or first the body
 * when it is still to come (the server then sends 100 Continue, reads it
 * and calls request_body_done). */
static void request_go(gw_request *r)
{
    request_wait_end(r);
    r->hold_pts = r->route->price;
    if (r->early && !r->body_in) {
        r->st = ST_BODYWAIT;
        server_want_body(r->conn);
        return;
    }
    request_proxy(r);
}

/* Asks Redis for R's price, with what its limits are checked by. */
static int request_send_reserve(gw_request *r)
{
    const gw_config *cfg = r->w->cfg;
    hot_limit_args lim = {.key_id = r->key_id,
                          .rate_quota = r->route->rate_quota,
                          .rate_window_ms = r->route->rate_window_ms};
    return hotclient_reserve(
        r->w->hc, r->account, r->rid, r->route->price,
        r->route->timeout_ms + cfg->hold_grace_ms + (r->early ? cfg->body_timeout_ms : 0),
        r->route->id, &lim, r->idem ? &r->idem_args : NULL, request_on_reserved, r);
}

/* ---- waiting for held points (one queue per account per worker) ------ */

static request_waitq **request_waitq_slot(request_ctx *x, int64_t account)
{
    uint64_t h = (uint64_t)account * 0x9E3779B97F4A7C15ull;
    return &x->buckets[h >> 56 & (REQUEST_WAIT_BUCKETS - 1)];
}

static request_waitq *request_waitq_find(worker *w, int64_t account)
{
    request_waitq *q;
    if (!w->rq) return NULL;
    for (q = *request_waitq_slot(w->rq, account); q; q = q->next)
        if (q->account == account) return q;
    return NULL;
}

static void request_waitq_on_timer(evutil_socket_t fd, short what, void *arg);
static void request_waitq_schedule(request_waitq *q);

static request_waitq *request_waitq_get(worker *w, int64_t account)
{
    request_ctx *x = w->rq;
    request_waitq *q = request_waitq_find(w, account), **slot;
    if (q || !x) return q;
    q = calloc(1, sizeof *q);
    if (!q) return NULL;
    slot = request_waitq_slot(x, account);
    q->ctx = x;
    q->account = account;
    q->backoff_ms = REQUEST_BACKOFF_MIN_MS;
    evtimer_assign(&q->timer, w->base, request_waitq_on_timer, q);
    q->next = *slot;
    *slot = q;
    return q;
}

/* Frees Q once nobody waits in it and no reserve of it is in flight. */
static void request_waitq_maybe_free(request_waitq *q)
{
    request_waitq **p;
    if (q->n > 0 || q->trying || q->pin) return;
    for (p = request_waitq_slot(q->ctx, q->account); *p != q; p = &(*p)->next)
        ;
    *p = q->next;
    if (q->timer_on) evtimer_del(&q->timer);
    free(q);
}

static void request_waitq_arm(request_waitq *q, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    if (q->timer_on) evtimer_del(&q->timer);
    q->timer_on = evtimer_add(&q->timer, &tv) == 0;
}

/* Appends R (FRONT: puts it back first, its turn was not over) to Q. */
static void request_waitq_push(request_waitq *q, gw_request *r, int front)
{
    r->waitq = q;
    r->st = ST_WAIT;
    r->wprev = r->wnext = NULL;
    if (front) {
        r->wnext = q->head;
        if (q->head) q->head->wprev = r;
        q->head = r;
        if (!q->tail) q->tail = r;
    } else {
        r->wprev = q->tail;
        if (q->tail) q->tail->wnext = r;
        q->tail = r;
        if (!q->head) q->head = r;
    }
    q->n++;
}

/* Takes waiting R off Q's FIFO; R's queue (r->waitq) is left to the caller. */
static void request_waitq_unlink(request_waitq *q, gw_request *r)
{
    if (r->wprev)
        r->wprev->wnext = r->wnext;
    else
        q->head = r->wnext;
    if (r->wnext)
        r->wnext->wprev = r->wprev;
    else
        q->tail = r->wprev;
    r->wprev = r->wnext = NULL;
    q->n--;
}

/* Takes R out of its queue (waiting, or its reserve in flight). */
static void request_waitq_leave(gw_request *r)
{
    request_waitq *q = r->waitq;
    if (!q) return;
    r->waitq = NULL;
    if (q->trying == r) {
        q->trying = NULL;
    } else {
        request_waitq_unlink(q, r);
    }
    request_waitq_maybe_free(q);
}

/* R is short while points are held: it waits in its account's queue
 * (FRESH: R's own reserve just said so, its figures are the latest). 0, or
 * -1 when it cannot (bound reached, out of memory): R is not queued. */
static int request_wait(gw_request *r, int fresh)
{
    request_waitq *q = request_waitq_get(r->w, r->account);
    if (!q || q->n + (q->trying != NULL) >= r->w->cfg->max_waiters) return -1;
    if (!r->waiting) {
        r->waiting = 1;
        r->wait_t0_us = worker_now_us();
        metric_gauge_add(&r->w->m.waiting, 1);
    }
    if (fresh) {
        q->avail = r->last_avail;
        q->held = r->last_held;
    }
    request_waitq_push(q, r, 0);
    request_waitq_schedule(q);
    return 0;
}

/* This worker just changed ACCOUNT's holds (a settle, a release): its
 * waiters try again now instead of at the end of their backoff. */
static void request_waitq_kick(worker *w, int64_t account)
{
    request_waitq *q = request_waitq_find(w, account);
    if (!q) return;
    q->backoff_ms = REQUEST_BACKOFF_MIN_MS;
    if (!q->trying && q->n > 0) request_waitq_arm(q, 0); /* from the loop, not this stack */
}

/* Answers the waiters whose wait is over: past their deadline while the
 * last figures do not cover their price (402 with those figures), or whose
 * price the points that exist cannot cover (HAVE: AVAIL and HELD just came
 * from Redis). A waiter past its deadline whose price the available points
 * cover stays: it is the next to ask (request_waitq_covered), and its own
 * reserve gets the points or a fresh refusal. The caller keeps Q alive
 * across it (q->pin). */
static void request_waitq_expire(request_waitq *q, int64_t avail, int64_t held, int have)
{
    uint64_t now = worker_now_ms();
    gw_request *r = q->head, *next;
    int64_t a = have ? avail : q->avail, h = have ? held : q->held;
    for (; r; r = next) {
        int64_t price = r->route->price;
        next = r->wnext;
        if (!(have && avail + held < price) && (now < r->wait_until_ms || price <= a)) continue;
        request_waitq_leave(r);
        request_short(r, a, h);
    }
}

/* The first waiter whose price the last known available points cover
 * (its reserve should get them now), or NULL. */
static gw_request *request_waitq_covered(const request_waitq *q)
{
    gw_request *r;
    for (r = q->head; r; r = r->wnext)
        if (r->route->price <= q->avail) return r;
    return NULL;
}

/* Q's next reserve: at once when a waiter's price looks covered, else at
 * the end of the backoff (a timer already set stays). */
static void request_waitq_schedule(request_waitq *q)
{
    if (q->trying || q->n == 0) return;
    if (request_waitq_covered(q))
        request_waitq_arm(q, 0); /* from the loop, not this stack */
    else if (!q->timer_on)
        request_waitq_arm(q, q->backoff_ms);
}

/* The backoff is over, or a kick: a waiter asks for its price (the first
 * one it covers, else the first in line). */
static void request_waitq_on_timer(evutil_socket_t fd, short what, void *arg)
{
    request_waitq *q = arg;
    gw_request *r;
    q->timer_on = 0;
    if (q->trying) return;
    q->pin++; /* keeps Q while waiters are answered */
    request_waitq_expire(q, 0, 0, 0);
    q->pin--;
    r = request_waitq_covered(q);
    if (!r) r = q->head;
    if (!r) {
        request_waitq_maybe_free(q);
        return;
    }
    /* Off the FIFO, still Q's: the reply puts it back or lets it go. */
    request_waitq_unlink(q, r);
    q->trying = r;
    r->st = ST_RESERVE;
    if (request_send_reserve(r) != 0)
        request_on_reserved(r, HOT_ERR_UNAVAILABLE, &(hot_reply){{0}});
}

/* Redis cannot answer for Q's account: every waiter gets the 503. */
static void request_waitq_fail(request_waitq *q, int rc)
{
    q->pin++;
    while (q->head) {
        gw_request *r = q->head;
        request_waitq_leave(r);
        request_unavailable(r, rc);
    }
    q->pin--;
    request_waitq_maybe_free(q);
}

/* ---- reserve ------------------------------------------------------- */

static void request_on_reserved(void *arg, int rc, const hot_reply *rep)
{
    gw_request *r = arg;
    const hot_reserve_reply *v = &rep->reserve;
    request_waitq *q = r->waitq;
    uint64_t now;
    if (q) {
        /* It was its queue's attempt: the queue goes on, whatever it gets. */
        r->waitq = NULL;
        q->trying = NULL;
        q->pin++; /* keeps Q until the end */
    }
    if (rc != 0) {
        request_unavailable(r, rc < 0 ? rc : HOT_ERR_UNAVAILABLE);
        if (q) {
            q->pin--;
            request_waitq_fail(q, rc < 0 ? rc : HOT_ERR_UNAVAILABLE);
        }
        return;
    }
    if (r->gone || r->w->aborted) {
        if (v->status == HOT_RESERVE_HELD) {
            r->held = 1;
            request_release_detached(r);
        }
        /* The same answer as a call dropped by request_drop: the client
         * left, or the gateway is stopping. */
        request_cancel(r, r->w->aborted ? "shutting down" : "client went away");
        r = NULL;
    } else if (v->status == HOT_RESERVE_HELD) {
        r->held = 1;
        r->rl_flags = (int)v->flags;
        r->rl_q = v->rate.quota;
        r->rl_w_ms = v->rate.window_ms;
        r->rl_r = v->rate.remaining;
        r->rl_t_ms = v->rate.reset_ms;
        /* An account under limits is served per call (reserve.lua). */
        if (!(v->flags & HOT_RESERVE_F_LIMITED))
            lease_consider(r->w->leases, r->account, r->route->price, v->available);
        if (q) {
            /* Got its points: the next waiter tries at once. */
            q->backoff_ms = REQUEST_BACKOFF_MIN_MS;
            q->avail = v->available;
            q->held = v->held;
            if (q->n > 0) request_waitq_arm(q, 0);
        }
        request_go(r);
        r = NULL;
    } else if (v->status == HOT_RESERVE_RATE_LIMITED || v->status == HOT_RESERVE_CAPPED) {
        request_limited(r, v);
        r = NULL;
    } else if (v->status >= HOT_RESERVE_REPLAY && v->status <= HOT_RESERVE_IDEM_BUDGET) {
        request_idem_answer(r, v);
        r = NULL;
    } else if (v->status == HOT_RESERVE_UNKNOWN) {
        /* Billing creates every account's hash with the account (and every
         * repair pass pushes them all): a missing one means Redis lost its
         * data, which is not the caller's fault. */
        request_unavailable(r, HOT_ERR_NODATA);
        r = NULL;
    }
    if (r) {
        now = worker_now_ms();
        r->last_avail = v->available;
        r->last_held = v->held;
        if (v->available + v->held >= r->route->price && now < r->wait_until_ms) {
            /* Points exist but are held by calls in flight: wait for them. */
            if (q) {
                request_waitq_push(q, r, 1);
                q->backoff_ms = q->backoff_ms * 2 > REQUEST_BACKOFF_MAX_MS ? REQUEST_BACKOFF_MAX_MS
                                                                           : q->backoff_ms * 2;
                request_waitq_arm(q, q->backoff_ms);
            } else if (request_wait(r, 1) != 0) {
                request_too_many_waiting(r);
            }
        } else {
            request_short(r, v->available, v->held);
        }
    }
    if (q) {
        /* What Redis just said holds for every waiter of the account. */
        if (v->status == HOT_RESERVE_SHORT) {
            q->avail = v->available;
            q->held = v->held;
            request_waitq_expire(q, v->available, v->held, 1);
        }
        q->pin--;
        /* Whoever got the turn left (gone, answered): the others keep theirs,
         * at once if the points it was short of cover another's price. */
        request_waitq_schedule(q);
        request_waitq_maybe_free(q);
    }
}

static void request_reserve(gw_request *r)
{
    request_waitq *q;
    /* A call whose body is still to come is held per call, for as long as
     * the body may take (a lease's deadline does not cover that). */
    /* Nor is a call under a rate limit: each is counted in Redis (a lease
     * serves calls without asking it); nor one with an Idempotency-Key, whose
     * marker is checked and written by reserve.lua. */
    r->lease = r->early || r->route->rate_quota || r->idem
                   ? NULL
                   : lease_take(r->w->leases, r->account, r->route->price);
    if (r->lease) {
        request_go(r);
        return;
    }
    q = request_waitq_find(r->w, r->account);
    /* A call with a key asks once itself (a retry may be a replay or a
     * conflict, which waiting for points would only delay). */
    if (q && (q->n > 0 || q->trying) && !r->idem) {
        /* Others of the account already wait here: behind them, without
         * a reserve of its own (the queue's next one finds out for all). */
        if (request_wait(r, 0) != 0) request_too_many_waiting(r);
        return;
    }
    r->st = ST_RESERVE;
    if (request_send_reserve(r) != 0) request_unavailable(r, HOT_ERR_UNAVAILABLE);
}

/* ---- balance endpoint ----------------------------------------------- */

/* The balance JSON's start: {"account_id":..,"available":..,"held":.. */
static int request_balance_head(gw_request *r, char *buf, size_t cap)
{
    return snprintf(buf, cap,
                    "{\"account_id\":%" PRId64 ",\"available\":%" PRId64 ",\"held\":%" PRId64,
                    r->account, r->bal_avail, r->bal_held);
}

/* One cap as the balance shows it: {"cap","spent","held","remaining",
 * "resets_at"}; counters of another period than NOW's count as 0. */
static int request_cap_json(char *buf, size_t cap, const char *name, int64_t limit, int64_t per,
                            int64_t now_per, int64_t spent, int64_t held, const char *resets)
{
    int64_t left;
    if (per != now_per) spent = held = 0;
    left = limit - spent - held;
    if (left < 0) left = 0;
    return snprintf(buf, cap,
                    "\"%s\":{\"cap\":%" PRId64 ",\"spent\":%" PRId64 ",\"held\":%" PRId64
                    ",\"remaining\":%" PRId64 ",\"resets_at\":\"%s\"}",
                    name, limit, spent, held, left, resets);
}

/* "caps":{"account":{"daily":..,"monthly":..},"key":{..}} from REP
 * (hotclient_caps), in the gateway's clock (reserve.lua counts in Redis's:
 * the same UTC day but at a period's edge). */
static void request_on_caps(void *arg, int rc, const hot_reply *rep)
{
    gw_request *r = arg;
    char buf[1024], day_at[32], month_at[32];
    size_t n;
    time_t now = (time_t)(worker_wall_ms() / 1000), t;
    struct tm tm;
    int64_t today, month;
    if (rc < 0) {
        request_unavailable(r, rc);
        return;
    }
    gmtime_r(&now, &tm);
    today = (int64_t)(now / 86400);
    month = (int64_t)(tm.tm_year + 1900) * 100 + tm.tm_mon + 1;
    t = (time_t)((today + 1) * 86400);
    gmtime_r(&t, &tm);
    strftime(day_at, sizeof day_at, "%Y-%m-%dT%H:%M:%SZ", &tm);
    gmtime_r(&now, &tm);
    tm.tm_mday = 1;
    tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
    if (++tm.tm_mon == 12) {
        tm.tm_mon = 0;
        tm.tm_year++;
    }
    t = timegm(&tm);
    gmtime_r(&t, &tm);
    strftime(month_at, sizeof month_at, "%Y-%m-%dT%H:%M:%SZ", &tm);
    n = (size_t)request_balance_head(r, buf, sizeof buf);
    n += (size_t)snprintf(buf + n, sizeof buf - n, ",\"caps\":{");
    for (int sc = 0; sc < 2; sc++) {
        const hot_cap_counters *f = sc ? &rep->caps.key : &rep->caps.account;
        int any = 0;
        if (!f->daily_cap && !f->monthly_cap) continue;
        if (buf[n - 1] == '}') buf[n++] = ',';
        n += (size_t)snprintf(buf + n, sizeof buf - n, "\"%s\":{", sc ? "key" : "account");
        if (f->daily_cap) {
            n += (size_t)request_cap_json(buf + n, sizeof buf - n, "daily", f->daily_cap, f->day,
                                          today, f->day_spent, f->day_held, day_at);
            any = 1;
        }
        if (f->monthly_cap) {
            if (any) buf[n++] = ',';
            n += (size_t)request_cap_json(buf + n, sizeof buf - n, "monthly", f->monthly_cap,
                                          f->month, month, f->month_spent, f->month_held, month_at);
        }
        buf[n++] = '}';
    }
    n += (size_t)snprintf(buf + n, sizeof buf - n, "}}");
    request_json(r, 200, buf, "0");
}

static void request_on_balance(void *arg, int rc, const hot_reply *rep)
{
    gw_request *r = arg;
    const hot_balance_reply *v = &rep->balance;
    char buf[256];
    if (rc < 0) {
        request_unavailable(r, rc);
        return;
    }
    if (rc != 0) {
        /* Every account billing made has its hash (created with the
         * account, rebuilt by every repair pass): none means Redis lost it,
         * and 0 points would be a wrong answer, not an empty balance. */
        request_unavailable(r, HOT_ERR_NODATA);
        return;
    }
    r->bal_held = v->held;
    r->bal_avail = v->credited - v->spent - v->held;
    if (r->bal_avail < 0) r->bal_avail = 0;
    /* An account under limits: a second read for its caps (the balance is
     * not on the billed path; calls of accounts without limits pay none). */
    if (v->limited) {
        if (hotclient_caps(r->w->hc, r->account, r->key_id, request_on_caps, r) != 0)
            request_unavailable(r, HOT_ERR_UNAVAILABLE);
        return;
    }
    request_balance_head(r, buf, sizeof buf);
    strcat(buf, "}");
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
    if (r->idem && !r->body_in) {
        /* Authenticated (a bad key got its 401 without a byte of body
         * read): now the body, whose hash the fingerprint needs before the
         * reserve. request_body_done starts over, from the auth cache. */
        request_unsuspend(r);
        r->st = ST_BODY;
        server_want_body(r->conn);
        return;
    }
    if (r->usage) {
        request_usage(r);
        return;
    }
    if (r->balance) {
        r->st = ST_BALANCE;
        if (hotclient_balance(r->w->hc, r->account, request_on_balance, r) != 0)
            request_on_balance(r, HOT_ERR_UNAVAILABLE, &(hot_reply){{0}});
        return;
    }
    r->wait_until_ms = worker_now_ms() + (uint64_t)r->w->cfg->hold_wait_ms;
    request_reserve(r);
}

/* What K lets R do: its expiry, then its scopes (on a route; the free
 * endpoints are any key's). 0 and R's account and key set, or -1 answered. */
static int request_key_allows(gw_request *r, const authcache_key *k)
{
    if (k->account == AUTHCACHE_NONE) {
        request_error(r, 401, "unauthorized", "unknown or revoked API key");
        return -1;
    }
    if (k->expires_ms && (uint64_t)k->expires_ms <= worker_wall_ms()) {
        request_error(r, 401, "key_expired",
                      "this API key has expired: use its successor or ask for a new key");
        return -1;
    }
    if (k->nscopes && r->route) {
        int ok = 0;
        for (int i = 0; i < k->nscopes && !ok; i++)
            ok = k->scopes[i] == r->route->id_hash;
        if (!ok) {
            char msg[256];
            snprintf(msg, sizeof msg, "this API key may not call route %.128s", r->route->id);
            request_error(r, 403, "route_not_allowed", msg);
            return -1;
        }
    }
    r->account = k->account;
    r->key_id = k->key_id;
    return 0;
}

/* A mirror value (hotclient.h) as the cache keeps it: scopes as hashes. */
static void request_key_entry(const hot_key_info *info, authcache_key *k)
{
    const char *p = info->scopes, *end = info->scopes + info->scopes_len;
    memset(k, 0, sizeof *k);
    k->account = info->account > 0 ? info->account : AUTHCACHE_NONE;
    k->key_id = info->key_id;
    k->expires_ms = info->expires_ms;
    /* More scopes than billing makes (a bad value) allow fewer routes, never more. */
    while (p < end && k->nscopes < AUTHCACHE_SCOPES_MAX) {
        const char *q = memchr(p, ',', (size_t)(end - p));
        if (!q) q = end;
        k->scopes[k->nscopes++] = routes_id_hash(p, (size_t)(q - p));
        p = q + 1;
    }
}

static void request_on_key(void *arg, int rc, const hot_key_info *info)
{
    gw_request *r = arg;
    authcache_key k;
    if (rc < 0) {
        request_unavailable(r, rc);
        return;
    }
    if (rc == 0 && info) {
        request_key_entry(info, &k);
    } else {
        memset(&k, 0, sizeof k);
        k.account = AUTHCACHE_NONE;
    }
    authcache_put(&r->w->keys, r->keyhash, &k, worker_now_ms());
    if (request_key_allows(r, &k) != 0) return;
    if (r->gone) {
        request_cancel(r, r->w->aborted ? "shutting down" : "client went away");
        return;
    }
    request_with_account(r);
}

/* Authenticate (cache or Redis), then reserve. */
static void request_start(gw_request *r)
{
    authcache_key k;
    if (authcache_get(&r->w->keys, r->keyhash, worker_now_ms(), &k)) {
        if (request_key_allows(r, &k) != 0) return;
        request_suspend(r);
        request_with_account(r);
        return;
    }
    r->st = ST_KEY;
    request_suspend(r);
    if (hotclient_key(r->w->hc, r->keyhash, request_on_key, r) != 0)
        request_on_key(r, HOT_ERR_UNAVAILABLE, NULL);
}

/* Per-client events are logged within a per-worker rate: a flood of
 * disconnects must cost neither the log nor the loop. */
static void request_log_gone(gw_request *r)
{
    request_ctx *x = r->w->rq;
    if (x && !log_limit_ok(&x->gone_log, worker_now_ms(), REQUEST_GONE_LOG_PER_SEC)) return;
    log_info("request %s: client went away (state %d%s)", r->rid, (int)r->st,
             r->st == ST_PROXY && proxy_call_written(&r->call)
                 ? ", at the upstream: runs to its answer"
                 : "");
}

/* Drops R if it has not reached the upstream and no Redis command of it is
 * in flight (waiting in its queue, its body still to come, queued for or
 * connecting to the upstream): its hold released, cost 0, answered 503
 * saying WHY (the client left, or the drain's grace passed). A call
 * written to the upstream goes on; with a Redis command in flight the
 * callback, which sees r->gone, answers. */
static void request_drop(gw_request *r, const char *why)
{
    switch (r->st) {
    case ST_PROXY:
        /* Written to the upstream: it may act on it, so its answer (or
         * timeout) settles it; the answer is dropped by the server. */
        if (proxy_call_written(&r->call)) break;
        proxy_cancel(&r->call);
        request_release_detached(r);
        request_cancel(r, why);
        break;
    case ST_BODYWAIT:
        request_release_detached(r);
        request_cancel(r, why);
        break;
    case ST_WAIT:
        request_waitq_leave(r);
        request_cancel(r, why);
        break;
    default:
        break;
    }
}

static void request_on_gone(gw_request *r)
{
    request_log_gone(r);
    request_drop(r, "client went away");
}

/* The drain's deadline passed: fail what has not reached the upstream.
 * Calls written to the upstream are not cancelled: they end by their answer
 * or their timeout (the proxy's timer), and the drain waits for them. */
void request_abort_all(worker *w)
{
    gw_request *r = w->suspended, *next;
    for (; r; r = next) {
        next = r->next;
        if (r->st == ST_PROXY && proxy_call_written(&r->call)) continue;
        r->gone = 1;
        /* With a Redis command in flight the request must wait for its
         * callback (which sees gone): answering now would free it under
         * that callback. hotclient_free runs such callbacks at the end. */
        if (r->st == ST_PROXY || r->st == ST_WAIT || r->st == ST_BODYWAIT)
            request_drop(r, "shutting down"); /* its client is there: say why */
    }
    /* Usage queries: their callbacks run now (503) and answer. */
    pgclient_fail_all(w->pg);
}

void request_teardown(worker *w)
{
    gw_request *r = w->suspended, *next;
    request_ctx *x = w->rq;
    for (; r; r = next) {
        next = r->next;
        r->gone = 1;
        if (r->st == ST_PROXY) {
            proxy_cancel(&r->call);
            request_release_detached(r);
            request_cancel(r, "shutting down");
        } else if (r->st == ST_WAIT || r->st == ST_BODYWAIT) {
            request_drop(r, "shutting down");
        } else if (r->waitq) {
            /* Its queue's reserve is in flight: the callback (run by
             * hotclient_free) answers it, without the queue. */
            request_waitq_leave(r);
        }
    }
    pgclient_fail_all(w->pg);
    if (!x) return;
    for (int i = 0; i < REQUEST_WAIT_BUCKETS; i++)
        while (x->buckets[i]) {
            request_waitq *q = x->buckets[i];
            x->buckets[i] = q->next;
            if (q->timer_on) evtimer_del(&q->timer);
            free(q);
        }
    free(x);
    w->rq = NULL;
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

/* The Idempotency-Key of a POST or PATCH on a route where it is not off:
 * one well-formed header (r->idem set, its hash taken), none (0; a 400 when
 * the route requires one), or a 400 (-1: R answered). */
static int request_idem_head(gw_request *r)
{
    const char *v = NULL;
    int n = 0;
    if (!r->route || r->route->idempotency == ROUTES_IDEM_OFF ||
        (strcmp(r->method, "POST") != 0 && strcmp(r->method, "PATCH") != 0))
        return 0;
    for (size_t i = 0, nh = server_header_count(r->conn); i < nh; i++) {
        const char *name, *value;
        server_header_at(r->conn, i, &name, &value);
        if (strcasecmp(name, "Idempotency-Key") == 0) {
            v = value;
            n++;
        }
    }
    if (n == 0 && r->route->idempotency == ROUTES_IDEM_REQUIRED) {
        request_error(r, 400, "idempotency_key_required",
                      "this route requires an Idempotency-Key header: a unique value per "
                      "operation, the same on every retry of it");
        return -1;
    }
    if (n == 0) return 0;
    if (n > 1 || idem_key_hash(v, r->idem_args.key) != 0) {
        request_error(r, 400, "bad_idempotency_key",
                      "Idempotency-Key must be one header of 1 to 255 visible ASCII "
                      "characters (or an sf-string of them)");
        return -1;
    }
    r->idem = 1;
    return 0;
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
    if (request_idem_head(r) != 0) return -1;
    r->st = ST_BODY;
    return 0;
}

void request_early(gw_request *r)
{
    if (r->idem) {
        /* Its fingerprint needs the body's hash before the reserve: the key
         * first, then the body (request_with_account), then the reserve. */
        request_start(r);
        return;
    }
    r->early = 1;
    request_start(r);
}

void request_body_done(gw_request *r)
{
    r->body = server_body(r->conn, &r->body_len);
    r->body_in = 1;
    if (r->idem) idem_fingerprint(r->method, r->uri, r->body, r->body_len, r->idem_args.fp);
    if (r->early) {
        /* Reserved already (request_go asked for the body). */
        request_proxy(r);
        return;
    }
    request_start(r);
}
