/* hotclient.c: async hiredis client (see hotclient.h).
 *
 * Reserves and settles are batched: every one asked for during one pass of
 * the event loop goes to Redis as ONE reserve.lua / settle.lua call (up to
 * HOT_BATCH_MAX ops; settles first, so that points they free are there for
 * the reserves behind them). Under load a pass carries many calls, and
 * Redis then pays its per-command, per-script and per-reply costs, and the
 * outbox its per-entry costs, once per batch instead of once per call; when
 * idle a batch is a single call and nothing waits: the batch is sent at the
 * end of the same loop pass (the latency of a batch is that of its first op).
 *
 * Scripts run by EVALSHA once SCRIPT LOAD has answered on this connection;
 * before that (and after a NOSCRIPT error, e.g. SCRIPT FLUSH) by EVAL with
 * the text, which also caches it server-side. A batch keeps its ops so that
 * a NOSCRIPT retry can resend them. */
#include "gateway/hotclient.h"

#include "common/hotkeys.h"
#include "common/log.h"
#include "gateway/idem.h"
#include "gateway/redisev.h"
#include "gateway/resolve.h"
#include "gateway/spill.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Route ids are at most 128 bytes (routes.c). */
#define HOT_ROUTE_MAX 129
#define HOT_SETTLE_QUEUE_MAX 65536
/* pg:backlog is read this often (never per call): a reserve may pass for
 * this long after the backlog reached its bound, a few hundred records. */
#define HOT_BACKLOG_POLL_MS 200
/* billing writes these (common/hotkeys.h names them once merged). */
#ifndef HOT_EPOCH
#define HOT_EPOCH "pg:epoch"
#endif
#ifndef HOT_BACKLOG
#define HOT_BACKLOG "pg:backlog"
#endif
#define HOT_BACKOFF_MIN_MS 50
#define HOT_BACKOFF_MAX_MS 1000
/* No reply at all for this long while commands wait: the server is stuck
 * (or the network silently dropped us). Drop the connection so waiting
 * calls fail with 503 and settles are queued, instead of hanging. */
#define HOT_STALL_MS 3000
#define HOT_WATCHDOG_MS 500

/* Each reply struct is a view of hot_reply.v (hotclient.h): int64_t
 * fields in reply order, nothing else. */
_Static_assert(sizeof(hot_reserve_reply) == HOT_RESERVE_REPLY * sizeof(int64_t),
               "hot_reserve_reply is reserve.lua's reply");
_Static_assert(sizeof(hot_caps_reply) == HOT_CAP_FIELDS * sizeof(int64_t),
               "hot_caps_reply is the caps command's reply");
_Static_assert(sizeof(hot_settle_reply) == 3 * sizeof(int64_t), "settle.lua's reply");
_Static_assert(sizeof(hot_balance_reply) == 4 * sizeof(int64_t), "the balance's fields");

/* What a callback gets when there is no answer (RC < 0): zeros, never NULL. */
static const hot_reply hot_no_reply;

enum hot_script { HOT_SCRIPT_RESERVE, HOT_SCRIPT_SETTLE, HOT_SCRIPT_LEASE, HOT_NSCRIPTS };
/* Plain commands (reserves and settles are batches of a script). */
enum hot_kind { HOT_KEY, HOT_BALANCE, HOT_CAPS, HOT_BACKLOG_GET };

/* One reserve or settle waiting in, or sent with, a batch. */
typedef struct hot_op {
    hot_cb cb;
    void *arg;
    /* settle: its arguments; reserve: the release to queue if its reply is
     * lost (see hot_on_batch_reply) */
    hot_settle_args settle;
    int64_t amount, ttl_ms; /* reserve */
    hot_limit_args lim;     /* reserve */
    char route[HOT_ROUTE_MAX];
} hot_op;

/* Ops of one kind collected during a loop pass, sent in batches of at most
 * HOT_BATCH_MAX at its end. Grows on demand: its size is bounded by the
 * requests in flight (one op each) plus the settle queue. */
typedef struct hot_pending {
    int n, cap;
    hot_op *ops;
} hot_pending;

/* A batch sent: owns a copy of its ops until the reply. */
typedef struct hot_batch {
    hotclient *hc;
    enum hot_script script; /* HOT_SCRIPT_RESERVE or HOT_SCRIPT_SETTLE */
    int retried;
    int idem; /* an op has an Idempotency-Key: the scripts' longer form */
    int n;
    hot_op ops[];
} hot_batch;

/* A plain command (GET of a key, HMGET of a balance). */
typedef struct hot_cmd {
    hotclient *hc;
    enum hot_kind kind;
    hot_cb cb;
    hot_key_cb kcb; /* HOT_KEY's */
    void *arg;
} hot_cmd;

/* Room for one batch's arguments or one lease op's (13 fixed + 2 per
 * record). A batch is 4 fixed plus, per op, its 2 keys and its arguments:
 * a settle's 5 (rid, charge, kind, status, account), a reserve's 7 (rid,
 * price, ttl, route, key id, rate quota, window); in a batch with an
 * Idempotency-Key, 3 more per settle (key hash, marker, ttl) and 4 per
 * reserve (key hash, fingerprint, ttl, budget). The scratch space holds the
 * decimals (at most 6 per op), each op's key names, its two hashes in hex
 * and a marker of an answer not kept. */
#define HOT_OP_ARGV_MAX 13
#define HOT_BATCH_ARGV (4 + HOT_OP_ARGV_MAX * HOT_BATCH_MAX)
#define HOT_LEASE_ARGV (13 + 2 * HOT_LEASE_RECORDS_MAX)
#define HOT_ARGV_MAX (HOT_BATCH_ARGV > HOT_LEASE_ARGV ? HOT_BATCH_ARGV : HOT_LEASE_ARGV)
#define HOT_IDEM_BARE_MAX 160 /* "n|<fp>|<rid>|<status>|l" */
#define HOT_SCRATCH                                                                                \
    (HOT_BATCH_MAX *                                                                               \
     (3 * HOT_KEYNAME_MAX + 6 * 24 + 33 + HOT_ROUTE_MAX + 8 + 2 * IDEM_HEX + HOT_IDEM_BARE_MAX))

struct hotclient {
    struct event_base *base;
    char host[256];
    int port;
    int db;
    char user[REDISURL_CRED_MAX];     /* "" : the default user */
    char password[REDISURL_CRED_MAX]; /* "" : no AUTH */
    int handshake;                    /* AUTH / SELECT replies still awaited on this connection */
    int auth_refused;                 /* the last handshake was refused: logged once per streak */
    redisAsyncContext *ac;
    int connected;  /* connected AND the handshake accepted */
    unsigned epoch; /* connections made so far: lease.c's fence */
    int closing;
    int writing; /* inside redisAsyncHandleWrite (see redisev.h) */
    struct event *retry;
    struct event *flush; /* resend queued settles while connected */
    struct event *watchdog;
    struct event *backlog_timer;
    int backlog_polling; /* a GET pg:backlog in flight */
    int64_t backlog;     /* its last answer */
    hot_limits limits;
    int spilled; /* settles went to the spill file while running: fail closed */
    struct timespec last_reply;
    struct timespec connect_started;
    int backoff_ms;
    int flush_ms; /* delay of the next resend of queued settles: backs off */
    char sha[HOT_NSCRIPTS][48];
    hot_stats stats;
    const char *answer; /* a replay's stored answer, during its callback */
    size_t answer_len;
    int inflight;                      /* ops and commands sent, not yet answered */
    hot_settle_args *queue;            /* settles waiting for Redis to come back */
    size_t qlen, qcap;                 /* grows on demand up to HOT_SETTLE_QUEUE_MAX */
    hot_pending pending[HOT_NSCRIPTS]; /* by script: reserves, settles */
    struct event *batch;               /* sends the pending ops at the end of the pass */
    int batch_scheduled;
    /* formatting space for one command (hiredis copies it at once) */
    const char *argv[HOT_ARGV_MAX];
    size_t lens[HOT_ARGV_MAX];
    char scratch[HOT_SCRATCH];
};

static const char *hot_script_text(enum hot_script s)
{
    static const char *const text[HOT_NSCRIPTS] = {hot_lua_reserve, hot_lua_settle, hot_lua_lease};
    return text[s];
}

static void hot_connect(hotclient *hc);
static int hot_send_batch(hot_batch *b);

static void hot_schedule_retry(hotclient *hc)
{
    struct timeval tv = {hc->backoff_ms / 1000, (hc->backoff_ms % 1000) * 1000};
    if (hc->closing) return;
    /* Without this timer the client would never reconnect: say so loudly
     * (the watchdog tries again every HOT_WATCHDOG_MS). */
    if (evtimer_add(hc->retry, &tv) != 0) log_error("redis: cannot arm the reconnect timer");
    hc->backoff_ms =
        hc->backoff_ms * 2 > HOT_BACKOFF_MAX_MS ? HOT_BACKOFF_MAX_MS : hc->backoff_ms * 2;
}

static void hot_on_retry(evutil_socket_t fd, short what, void *arg)
{
    hot_connect(arg);
}

static void hot_enqueue_settle(hotclient *hc, const hot_settle_args *a)
{
    if (a->replay) return; /* spill.c resends it itself */
    if (hc->qlen == hc->qcap && hc->qcap < hc->limits.queue_max) {
        size_t cap = hc->qcap ? hc->qcap * 2 : 64;
        hot_settle_args *q;
        if (cap > hc->limits.queue_max) cap = hc->limits.queue_max;
        q = realloc(hc->queue, cap * sizeof *q);
        if (q) {
            hc->queue = q;
            hc->qcap = cap;
        }
    }
    if (hc->qlen >= hc->qcap) {
        /* Full (or out of memory): to the spill file rather than dropped,
         * replayed at the next start. A write(2) from the loop: it reaches
         * the page cache without waiting for the disk (fsync only at the
         * stop), and it happens only past a bound that reserves stopped
         * feeding at half of it, so only calls already in flight get
         * here. This worker then refuses reserves until the file has been
         * replayed (worker.c, once Redis is back and the queue is empty):
         * fail closed, a spilled charge is not in Redis's balances yet. */
        if (!hc->spilled)
            log_error("settle queue full (%zu): spilling settles, refusing reserves", hc->qlen);
        hc->spilled = 1;
        if (!hc->limits.spill || spill_settle(hc->limits.spill, a) != 0)
            log_error("settle lost: rid=%s account=%lld commit=%d charge=%lld", a->rid,
                      (long long)a->account, a->commit, (long long)a->charge);
        return;
    }
    hc->queue[hc->qlen++] = *a;
    /* The answer to store is the caller's memory, gone after its callback:
     * the queued settle stores the marker of a billable answer not kept. */
    hc->queue[hc->qlen - 1].idem_val = NULL;
    hc->queue[hc->qlen - 1].idem_len = 0;
    /* A commit resent later goes as `late` (settle.lua): exactly a commit
     * while its hold is there, and still a charge (from the available
     * points, never an overdraft) if the sweeper expired the hold
     * meanwhile: Redis away for this gateway only (a partition), or back
     * after the hold's deadline with billing's sweeper first. As a plain
     * commit it would find no hold and change nothing: an answered charge
     * lost. A no-op once applied (a reply lost): no hold, no swept mark. */
    if (a->commit == HOT_SETTLE_COMMIT) hc->queue[hc->qlen - 1].commit = HOT_SETTLE_LATE;
    /* Connected but refused (e.g. LOADING after a restart): try again,
     * backing off to HOT_BACKOFF_MAX_MS while refusals go on (a batch that
     * succeeds resets it). Disconnected: hot_on_connect flushes. */
    if (hc->connected && !hc->closing && !evtimer_pending(hc->flush, NULL)) {
        struct timeval tv = {hc->flush_ms / 1000, (hc->flush_ms % 1000) * 1000};
        if (evtimer_add(hc->flush, &tv) != 0)
            log_error("redis: cannot arm the settle resend timer");
        hc->flush_ms =
            hc->flush_ms * 2 > HOT_BACKOFF_MAX_MS ? HOT_BACKOFF_MAX_MS : hc->flush_ms * 2;
    }
}

static void hot_flush_queue(hotclient *hc)
{
    size_t n = hc->qlen;
    hot_settle_args *q;
    if (n == 0) return;
    /* Take the queue first: failed resends re-enter it. */
    q = malloc(n * sizeof *q);
    if (!q) return;
    memcpy(q, hc->queue, n * sizeof *q);
    hc->qlen = 0;
    log_info("resending %zu queued settles", n);
    for (size_t i = 0; i < n; i++)
        hotclient_settle(hc, &q[i], NULL, NULL); /* re-queues itself on failure */
    free(q);
}

static int64_t hot_ms_since(const struct timespec *t)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)(now.tv_sec - t->tv_sec) * 1000 + (now.tv_nsec - t->tv_nsec) / 1000000;
}

static void hot_on_watchdog(evutil_socket_t fd, short what, void *arg)
{
    hotclient *hc = arg;
    if (!hc->ac && !hc->closing && !evtimer_pending(hc->retry, NULL)) {
        hot_schedule_retry(hc); /* the reconnect timer could not be armed */
        return;
    }
    /* hiredis 0.14 has no connect timeout: a connect whose packets are
     * dropped would hold every call queued behind it for minutes. */
    if (hc->ac && !hc->connected && hot_ms_since(&hc->connect_started) > HOT_STALL_MS) {
        redisAsyncContext *ac = hc->ac;
        log_error("redis %s:%d: no connection after %d ms; trying again", hc->host, hc->port,
                  HOT_STALL_MS);
        /* Not connected: hiredis runs no disconnect callback, so the retry
         * is ours. Queued commands' callbacks run with NULL here. */
        hc->ac = NULL;
        redisAsyncFree(ac);
        hot_schedule_retry(hc);
        return;
    }
    if (hc->ac && hc->connected && hc->inflight > 0 &&
        hot_ms_since(&hc->last_reply) > HOT_STALL_MS) {
        redisAsyncContext *ac = hc->ac;
        log_error("redis: no reply for %d ms with %d commands waiting; reconnecting", HOT_STALL_MS,
                  hc->inflight);
        /* Not inside a hiredis callback, so this frees at once: pending
         * callbacks run with NULL, then hot_on_disconnect schedules a retry. */
        redisAsyncFree(ac);
    }
}

static void hot_on_flush(evutil_socket_t fd, short what, void *arg)
{
    hotclient *hc = arg;
    if (hc->connected) hot_flush_queue(hc);
}

static void hot_on_script_loaded(redisAsyncContext *ac, void *r, void *priv)
{
    hotclient *hc = ac->data;
    redisReply *rep = r;
    intptr_t idx = (intptr_t)priv;
    if (!hc || !rep) return;
    if (rep->type == REDIS_REPLY_STRING && rep->len < 48) {
        memcpy(hc->sha[idx], rep->str, (size_t)rep->len);
        hc->sha[idx][rep->len] = '\0';
    } else {
        log_warn("SCRIPT LOAD failed: %s", rep->type == REDIS_REPLY_ERROR ? rep->str : "?");
    }
}

/* The connection is up and authenticated: only now does it count (epoch,
 * backoff, the resend of queued settles). */
static void hot_ready(hotclient *hc)
{
    if (hc->auth_refused)
        log_info("redis %s:%d: connected, the credentials are accepted again", hc->host, hc->port);
    else
        log_info("redis %s:%d connected", hc->host, hc->port);
    hc->auth_refused = 0;
    hc->connected = 1;
    hc->epoch++;
    hc->stats.connects++;
    hc->backoff_ms = HOT_BACKOFF_MIN_MS;
    hot_flush_queue(hc);
}

/* The reply to AUTH or SELECT, which come first on every connection. A
 * refusal (WRONGPASS, NOPERM, a db out of range) makes the connection
 * useless: every command behind it fails (calls get 503, settles are
 * queued), the connection is dropped and the reconnect backs off as for an
 * unreachable Redis. Logged once until accepted again: the reply names no
 * secret, and the command itself is never logged. */
static void hot_on_handshake(redisAsyncContext *ac, void *r, void *priv)
{
    hotclient *hc = ac->data;
    redisReply *rep = r;
    if (!hc || !rep || hc->ac != ac) return; /* NULL: the connection is being freed */
    if (rep->type != REDIS_REPLY_STATUS) {
        if (!hc->auth_refused)
            log_error("redis %s:%d: %s refused: %s (check the user and password in REDIS_URL; "
                      "calls get 503 until it is accepted)",
                      hc->host, hc->port, (const char *)priv,
                      rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
        hc->auth_refused = 1;
        redisAsyncFree(ac); /* deferred by hiredis until this callback returns */
        return;
    }
    if (--hc->handshake == 0 && !hc->connected) hot_ready(hc);
}

static void hot_on_connect(const redisAsyncContext *ac, int status)
{
    hotclient *hc = ac->data;
    if (!hc) return;
    if (status != REDIS_OK) {
        if (hc->backoff_ms == HOT_BACKOFF_MIN_MS)
            log_warn("redis %s:%d: connect failed: %s", hc->host, hc->port, ac->errstr);
        hc->ac = NULL; /* hiredis frees the context after this callback */
        hc->connected = 0;
        hot_schedule_retry(hc);
        return;
    }
    if (hc->handshake == 0) hot_ready(hc); /* else hot_on_handshake does */
}

static void hot_on_disconnect(const redisAsyncContext *ac, int status)
{
    hotclient *hc = ac->data;
    if (!hc) return;
    if (!hc->closing && !hc->auth_refused)
        log_warn("redis disconnected: %s", status == REDIS_OK ? "closed" : ac->errstr);
    hc->ac = NULL;
    hc->connected = 0;
    memset(hc->sha, 0, sizeof hc->sha);
    hot_schedule_retry(hc);
}

static void hot_connect(hotclient *hc)
{
    redisAsyncContext *ac;
    if (hc->closing || hc->ac) return;
    ac = redisAsyncConnect(hc->host, hc->port);
    if (!ac || ac->err) {
        log_warn("redis %s:%d: %s", hc->host, hc->port, ac ? ac->errstr : "out of memory");
        if (ac) redisAsyncFree(ac);
        hot_schedule_retry(hc);
        return;
    }
    ac->data = hc;
    if (redisev_attach(hc->base, ac, &hc->writing) != 0) {
        redisAsyncFree(ac);
        hot_schedule_retry(hc);
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &hc->connect_started);
    redisAsyncSetConnectCallback(ac, hot_on_connect);
    redisAsyncSetDisconnectCallback(ac, hot_on_disconnect);
    hc->ac = ac;
    /* Queued by hiredis until the connection is up and pipelined before
     * anything else: AUTH first (an ACL user may run nothing before it, not
     * even SCRIPT LOAD), then SELECT. Argv: a password may hold spaces. */
    hc->handshake = 0;
    if (hc->password[0]) {
        const char *argv[3];
        int argc = 0;
        argv[argc++] = "AUTH";
        if (hc->user[0]) argv[argc++] = hc->user;
        argv[argc++] = hc->password;
        if (redisAsyncCommandArgv(ac, hot_on_handshake, (void *)"AUTH", argc, argv, NULL) ==
            REDIS_OK)
            hc->handshake++;
    }
    if (hc->db != 0) {
        char db[16];
        snprintf(db, sizeof db, "%d", hc->db);
        if (redisAsyncCommand(ac, hot_on_handshake, (void *)"SELECT", "SELECT %s", db) == REDIS_OK)
            hc->handshake++;
    }
    for (intptr_t i = 0; i < HOT_NSCRIPTS; i++)
        redisAsyncCommand(ac, hot_on_script_loaded, (void *)i, "SCRIPT LOAD %s",
                          hot_script_text((enum hot_script)i));
}

static void hot_on_batch(evutil_socket_t fd, short what, void *arg);
static void hot_on_backlog_timer(evutil_socket_t fd, short what, void *arg);

int hotclient_new(struct event_base *base, const redisurl *url, hotclient **out)
{
    hotclient *hc = calloc(1, sizeof *hc);
    if (!hc) return -1;
    hc->base = base;
    /* hiredis resolves names inside redisAsyncConnect, on the loop: not here. */
    if (resolve_host(url->host, hc->host, sizeof hc->host) != 0) {
        free(hc);
        return -1;
    }
    hc->port = url->port;
    hc->db = url->db;
    memcpy(hc->user, url->user, sizeof hc->user);
    memcpy(hc->password, url->password, sizeof hc->password);
    hc->backoff_ms = HOT_BACKOFF_MIN_MS;
    hc->flush_ms = HOT_BACKOFF_MIN_MS;
    hc->retry = evtimer_new(base, hot_on_retry, hc);
    hc->flush = evtimer_new(base, hot_on_flush, hc);
    hc->watchdog = event_new(base, -1, EV_PERSIST, hot_on_watchdog, hc);
    hc->batch = event_new(base, -1, 0, hot_on_batch, hc);
    hc->backlog_timer = event_new(base, -1, EV_PERSIST, hot_on_backlog_timer, hc);
    hc->limits.max_backlog = INT64_MAX;
    hc->limits.queue_max = HOT_SETTLE_QUEUE_MAX;
    hc->limits.idem_ttl_ms = 86400000;
    hc->limits.idem_budget = 64 << 20;
    if (!hc->retry || !hc->flush || !hc->watchdog || !hc->batch || !hc->backlog_timer) {
        hotclient_free(hc);
        return -1;
    }
    {
        struct timeval tv = {0, HOT_WATCHDOG_MS * 1000};
        evtimer_add(hc->watchdog, &tv);
    }
    clock_gettime(CLOCK_MONOTONIC, &hc->last_reply);
    hot_connect(hc);
    *out = hc;
    return 0;
}

/* Fails every op of OPS[0..N): a settle goes to the resend queue; each
 * callback then runs with -1. */
static void hot_fail_ops(hotclient *hc, enum hot_script script, hot_op *ops, int n)
{
    for (int i = 0; i < n; i++) {
        if (script == HOT_SCRIPT_SETTLE) hot_enqueue_settle(hc, &ops[i].settle);
        if (ops[i].cb) ops[i].cb(ops[i].arg, -1, &hot_no_reply);
    }
}

void hotclient_free(hotclient *hc)
{
    if (!hc) return;
    hc->closing = 1;
    /* Ops never sent: their callbacks run now, as those of sent ones below. */
    for (int k = 0; k < HOT_NSCRIPTS; k++) {
        hot_pending *p = &hc->pending[k];
        hot_op *ops = p->ops;
        int n = p->n;
        *p = (hot_pending){0, 0, NULL}; /* callbacks cannot add: closing */
        hot_fail_ops(hc, (enum hot_script)k, ops, n);
        free(ops);
    }
    if (hc->ac) {
        redisAsyncContext *ac = hc->ac;
        hc->ac = NULL;
        redisAsyncFree(ac); /* runs pending callbacks with NULL */
    }
    if (hc->qlen) {
        /* The drain could not deliver them: to the spill file, replayed at
         * the next start (spill.h). Without one they are lost: said loudly. */
        size_t spilled = 0;
        for (size_t i = 0; i < hc->qlen && hc->limits.spill; i++)
            if (spill_settle(hc->limits.spill, &hc->queue[i]) == 0) spilled++;
        if (spilled == hc->qlen)
            log_warn("exiting with %zu settles undelivered: spilled for the next start", spilled);
        else
            log_error("exiting with %zu settles undelivered, %zu not spilled (the sweeper "
                      "expires their holds)",
                      hc->qlen, hc->qlen - spilled);
    }
    if (hc->retry) event_free(hc->retry);
    if (hc->backlog_timer) event_free(hc->backlog_timer);
    if (hc->flush) event_free(hc->flush);
    if (hc->watchdog) event_free(hc->watchdog);
    if (hc->batch) event_free(hc->batch);
    free(hc->queue);
    explicit_bzero(hc->password, sizeof hc->password);
    free(hc);
}

void hotclient_configure(hotclient *hc, const hot_limits *l)
{
    struct timeval tv = {0, HOT_BACKLOG_POLL_MS * 1000};
    hc->limits = *l;
    if (hc->limits.queue_max < 2) hc->limits.queue_max = 2;
    if (hc->limits.idem_ttl_ms <= 0) hc->limits.idem_ttl_ms = 86400000;
    if (hc->limits.idem_budget <= 0) hc->limits.idem_budget = 64 << 20;
    if (evtimer_add(hc->backlog_timer, &tv) != 0)
        log_error("redis: cannot arm the backlog poll timer");
}

long hotclient_spill_queue(const hotclient *hc, spill_file *sp)
{
    const hot_pending *p = &hc->pending[HOT_SCRIPT_SETTLE];
    long lost = 0;
    for (size_t i = 0; i < hc->qlen; i++)
        if (spill_settle(sp, &hc->queue[i]) != 0) lost++;
    for (int i = 0; i < p->n; i++)
        if (!p->ops[i].settle.replay && spill_settle(sp, &p->ops[i].settle) != 0) lost++;
    return lost;
}

void hotclient_spill_to(hotclient *hc, spill_file *sp)
{
    hc->limits.spill = sp;
}

int hotclient_refusing(const hotclient *hc)
{
    return hc->backlog >= hc->limits.max_backlog || hc->qlen >= hc->limits.queue_max / 2 ||
           hc->spilled;
}

size_t hotclient_queued(const hotclient *hc)
{
    return hc->qlen;
}

int hotclient_spilled(const hotclient *hc)
{
    return hc->spilled;
}

void hotclient_spill_replayed(hotclient *hc)
{
    if (hc->spilled) log_info("spilled settles replayed: serving again");
    hc->spilled = 0;
}

int hotclient_up(const hotclient *hc)
{
    return hc->ac != NULL;
}

unsigned hotclient_epoch(const hotclient *hc)
{
    return hc->connected ? hc->epoch : 0;
}

void hotclient_get_stats(const hotclient *hc, hot_stats *out)
{
    *out = hc->stats;
    out->backlog = hc->backlog;
    out->refusing = hotclient_refusing(hc);
}

int hotclient_busy(const hotclient *hc)
{
    int n = hc->inflight + (int)hc->qlen;
    for (int k = 0; k < HOT_NSCRIPTS; k++)
        n += hc->pending[k].n;
    return n;
}

static int hot_int(const redisReply *r, int64_t *out)
{
    if (r->type == REDIS_REPLY_INTEGER) {
        *out = (int64_t)r->integer;
        return 0;
    }
    if (r->type == REDIS_REPLY_STRING) {
        char *end;
        long long v = strtoll(r->str, &end, 10);
        if (end == r->str || *end) return -1;
        *out = (int64_t)v;
        return 0;
    }
    return -1;
}

/* A reply arrived (REP != NULL) or never will (NULL): the stall clock. */
static void hot_answered(hotclient *hc, const redisReply *rep, int ops)
{
    hc->inflight -= ops;
    hc->stats.replies += rep != NULL;
    hc->stats.errors += !rep || rep->type == REDIS_REPLY_ERROR;
    if (rep) clock_gettime(CLOCK_MONOTONIC, &hc->last_reply);
}

/* ---- plain commands ---------------------------------------------------- */

/* Turns a GET / HMGET reply into (rc, v). */
static int hot_decode_cmd(enum hot_kind kind, const redisReply *r, hot_reply *out)
{
    int64_t f[5], *v = out->v;
    hot_balance_reply *b = &out->balance;
    if (kind == HOT_BACKLOG_GET) {
        if (r->type == REDIS_REPLY_NIL)
            v[0] = 0;
        else if (hot_int(r, &v[0]) != 0)
            return -1;
        return 0;
    }
    if (kind == HOT_CAPS) {
        if (r->type != REDIS_REPLY_ARRAY || r->elements != HOT_CAP_FIELDS) return -1;
        for (int i = 0; i < HOT_CAP_FIELDS; i++)
            if (r->element[i]->type != REDIS_REPLY_NIL && hot_int(r->element[i], &v[i]) != 0)
                return -1;
        return 0;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 5) return -1;
    if (r->element[0]->type == REDIS_REPLY_NIL) return 1;
    for (int i = 0; i < 5; i++) {
        if (r->element[i]->type == REDIS_REPLY_NIL)
            f[i] = 0;
        else if (hot_int(r->element[i], &f[i]) != 0)
            return -1;
    }
    /* A lease's points not yet promised to a call are the account's to
     * spend: shown as available, not held (lease.lua). */
    b->credited = f[0];
    b->spent = f[1];
    b->held = f[2] - f[3];
    b->limited = f[4] != 0;
    return 0;
}

/* Parses a decimal of [P, END) up to SEP (or END) into *OUT; the char
 * after it, or NULL when it is not one. */
static const char *hot_field(const char *p, const char *end, char sep, int64_t *out)
{
    int64_t v = 0;
    const char *q = p;
    while (q < end && *q >= '0' && *q <= '9' && q - p < 18)
        v = v * 10 + (*q++ - '0');
    if (q == p || (q < end && *q != sep)) return NULL;
    *out = v;
    return q;
}

/* MGET key epoch, one atomic read: a miss is "unknown key" only if Redis
 * holds billing's data (the epoch, written after a complete rebuild). Two
 * commands would race a rebuild that pushes the key and writes the epoch
 * between them: a valid key answered 401 (and cached). */
static int hot_decode_key(const redisReply *r, hot_key_info *k)
{
    const redisReply *v;
    const char *p, *end;
    memset(k, 0, sizeof *k);
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) return -1;
    v = r->element[0];
    if (v->type == REDIS_REPLY_NIL)
        return r->element[1]->type == REDIS_REPLY_NIL ? HOT_ERR_NODATA : 1;
    if (v->type != REDIS_REPLY_STRING) return -1;
    p = v->str;
    end = v->str + v->len;
    if (v->len == 2 && memcmp(p, "-1", 2) == 0) {
        k->account = -1;
        return 0;
    }
    if (!(p = hot_field(p, end, '|', &k->account)) || k->account <= 0) return -1;
    if (p == end) return 0; /* "account": the form before key ids */
    {
        int64_t version;
        if (!(p = hot_field(p + 1, end, '|', &k->key_id)) || p == end ||
            !(p = hot_field(p + 1, end, '|', &version)) || p == end ||
            !(p = hot_field(p + 1, end, '|', &k->expires_ms)) || p == end)
            return -1;
    }
    k->scopes = p + 1;
    k->scopes_len = (size_t)(end - k->scopes);
    return 0;
}

static void hot_on_cmd_reply(redisAsyncContext *ac, void *r, void *priv)
{
    hot_cmd *cmd = priv;
    hotclient *hc = cmd->hc;
    redisReply *rep = r;
    hot_reply out = {{0}};
    int64_t *v = out.v;
    int rc = -1;
    hot_answered(hc, rep, 1);
    if (rep && rep->type == REDIS_REPLY_ERROR)
        log_error("redis error: %s", rep->str);
    else if (rep && cmd->kind == HOT_KEY) {
        hot_key_info k;
        rc = hot_decode_key(rep, &k);
        if (cmd->kcb) cmd->kcb(cmd->arg, rc, rc == 0 ? &k : NULL);
        free(cmd);
        return;
    } else if (rep)
        rc = hot_decode_cmd(cmd->kind, rep, &out);
    if (cmd->kind == HOT_KEY) {
        if (cmd->kcb) cmd->kcb(cmd->arg, rc, NULL);
        free(cmd);
        return;
    }
    if (cmd->kind == HOT_BACKLOG_GET) {
        hc->backlog_polling = 0;
        if (rc == 0) {
            if ((v[0] >= hc->limits.max_backlog) != (hc->backlog >= hc->limits.max_backlog))
                log_warn("settlement backlog %lld records: %s", (long long)v[0],
                         v[0] >= hc->limits.max_backlog ? "at OUTBOX_MAX_BACKLOG, refusing reserves"
                                                        : "below OUTBOX_MAX_BACKLOG, serving");
            hc->backlog = v[0];
        }
    }
    if (cmd->cb) cmd->cb(cmd->arg, rc, &out);
    free(cmd);
}

static int hot_command(hotclient *hc, enum hot_kind kind, hot_cb cb, void *arg, int argc);

static void hot_on_backlog_timer(evutil_socket_t fd, short what, void *arg)
{
    hotclient *hc = arg;
    if (!hc->connected || hc->closing || hc->backlog_polling) return;
    hc->argv[0] = "GET";
    hc->argv[1] = HOT_BACKLOG;
    if (hot_command(hc, HOT_BACKLOG_GET, NULL, NULL, 2) == 0) hc->backlog_polling = 1;
}

static int hot_command_cb(hotclient *hc, enum hot_kind kind, hot_cb cb, hot_key_cb kcb, void *arg,
                          int argc)
{
    hot_cmd *cmd;
    if (!hc->ac || hc->closing) return -1;
    cmd = malloc(sizeof *cmd);
    if (!cmd) return -1;
    *cmd = (hot_cmd){.hc = hc, .kind = kind, .cb = cb, .kcb = kcb, .arg = arg};
    if (hc->inflight == 0) clock_gettime(CLOCK_MONOTONIC, &hc->last_reply);
    if (redisAsyncCommandArgv(hc->ac, hot_on_cmd_reply, cmd, argc, hc->argv, NULL) != REDIS_OK) {
        free(cmd);
        return -1;
    }
    hc->inflight++;
    return 0;
}

static int hot_command(hotclient *hc, enum hot_kind kind, hot_cb cb, void *arg, int argc)
{
    return hot_command_cb(hc, kind, cb, NULL, arg, argc);
}

int hotclient_key(hotclient *hc, const char *hash_hex, hot_key_cb cb, void *arg)
{
    char key[HOT_KEYNAME_MAX + 80];
    snprintf(key, sizeof key, "%s%s", HOT_KEY_PREFIX, hash_hex);
    hc->argv[0] = "MGET";
    hc->argv[1] = key;
    hc->argv[2] = HOT_EPOCH;
    return hot_command_cb(hc, HOT_KEY, NULL, cb, arg, 3);
}

int hotclient_balance(hotclient *hc, int64_t account, hot_cb cb, void *arg)
{
    hot_keys k;
    hot_keys_for(&k, account);
    hc->argv[0] = "HMGET";
    hc->argv[1] = k.acct;
    hc->argv[2] = "credited";
    hc->argv[3] = "spent";
    hc->argv[4] = "held";
    hc->argv[5] = "leasefree";
    hc->argv[6] = "limited";
    return hot_command(hc, HOT_BALANCE, cb, arg, 7);
}

int hotclient_caps(hotclient *hc, int64_t account, int64_t key_id, hot_cb cb, void *arg)
{
    static const char *const sfx[HOT_CAP_FIELDS / 2] = {"cd", "cm", "d",  "ds",
                                                        "dh", "m",  "ms", "mh"};
    char names[HOT_CAP_FIELDS][40];
    hot_keys k;
    hot_keys_for(&k, account);
    hc->argv[0] = "HMGET";
    hc->argv[1] = k.lim;
    for (int i = 0; i < HOT_CAP_FIELDS; i++) {
        const char *s = sfx[i % (HOT_CAP_FIELDS / 2)];
        /* Fields a.* then k<id>.*; key 0 asks for "k0.*", which is never set. */
        if (i < HOT_CAP_FIELDS / 2)
            snprintf(names[i], sizeof names[i], "a.%s", s);
        else
            snprintf(names[i], sizeof names[i], "k%lld.%s", (long long)key_id, s);
        hc->argv[2 + i] = names[i];
    }
    /* hiredis copies the arguments at once: NAMES may go after the call. */
    return hot_command(hc, HOT_CAPS, cb, arg, 2 + HOT_CAP_FIELDS);
}

/* ---- batches ------------------------------------------------------------ */

static void hot_on_batch_reply(redisAsyncContext *ac, void *r, void *priv)
{
    hot_batch *b = priv;
    hotclient *hc = b->hc;
    redisReply *rep = r;
    size_t per;
    int ok;

    if (rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0 &&
        !b->retried && hc->ac && !hc->closing) {
        b->retried = 1;
        memset(hc->sha[b->script], 0, sizeof hc->sha[b->script]);
        /* Learn the SHA again, or every later batch would carry the text. */
        redisAsyncCommand(hc->ac, hot_on_script_loaded, (void *)(intptr_t)b->script,
                          "SCRIPT LOAD %s", hot_script_text(b->script));
        if (hot_send_batch(b) == 0) return; /* same batch, still in flight */
    }
    hot_answered(hc, rep, b->n);
    per = b->script == HOT_SCRIPT_RESERVE ? HOT_RESERVE_REPLY + (b->idem ? 1 : 0) : 3;
    ok = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == (size_t)b->n * per;
    /* Integers, but a replay's stored answer (the 9th of a reserve's). */
    for (size_t i = 0; ok && i < rep->elements; i++)
        if (rep->element[i]->type != REDIS_REPLY_INTEGER &&
            !(per == HOT_RESERVE_REPLY + 1 && i % per == HOT_RESERVE_REPLY &&
              rep->element[i]->type == REDIS_REPLY_STRING))
            ok = 0;
    if (rep && rep->type == REDIS_REPLY_ERROR) {
        log_error("redis error on a batch of %d: %s", b->n, rep->str);
        /* A replica (after a failover) refuses writes: reconnect rather
         * than fail every call until a restart. */
        if (strstr(rep->str, "READONLY") && hc->ac && hc->connected) redisAsyncDisconnect(hc->ac);
    } else if (rep && !ok) {
        log_error("redis: unexpected reply to a batch of %d", b->n);
    }
    if (ok) hc->flush_ms = HOT_BACKOFF_MIN_MS;
    for (int i = 0; i < b->n; i++) {
        hot_op *op = &b->ops[i];
        hot_reply out = {{0}};
        int64_t *v = out.v;
        int rc = -1;
        if (ok) {
            for (size_t j = 0; j < per && j < HOT_RESERVE_REPLY; j++)
                v[j] = (int64_t)rep->element[per * (size_t)i + j]->integer;
            rc = 0;
            if (per > HOT_RESERVE_REPLY && v[0] == HOT_RESERVE_REPLAY) {
                const redisReply *e = rep->element[per * (size_t)i + HOT_RESERVE_REPLY];
                if (e->type == REDIS_REPLY_STRING) {
                    hc->answer = e->str;
                    hc->answer_len = e->len;
                } else {
                    rc = -1; /* a replay without its answer: not usable */
                }
            }
            if (v[0] == HOT_STATUS_UNUSABLE) {
                /* Nothing changed for this op; the script logged why. Not
                 * retried: a human must repair the account's keys. A
                 * reserve fails (503); a settle answers with what it did:
                 * charged nothing. */
                log_error("redis: account %lld has unusable data (rid %s, %s): not applied",
                          (long long)op->settle.account, op->settle.rid,
                          b->script == HOT_SCRIPT_SETTLE ? "settle" : "reserve");
                if (b->script == HOT_SCRIPT_RESERVE) rc = -1;
            }
        } else if (b->script == HOT_SCRIPT_SETTLE) {
            /* A settle must not be lost: no reply, an error (e.g. READONLY
             * during a failover, OOM) or a reply we cannot read puts it
             * back in the queue; settle is idempotent by rid, and the
             * script writes nothing when it fails. */
            hot_enqueue_settle(hc, &op->settle);
        } else if (!hc->closing && (rep || (ac && (ac->c.flags & REDIS_CONNECTED)))) {
            /* A reserve without a usable answer may still have run (a link
             * dropped after Redis read it, e.g. by the stall watchdog): the
             * caller gets 503, so queue a release for it. Idempotent by
             * rid: a no-op if no hold was taken. Not when the connection
             * never came up: then Redis never saw it. */
            hot_enqueue_settle(hc, &op->settle);
        }
        if (op->cb) op->cb(op->arg, rc, &out);
        hc->answer = NULL;
        hc->answer_len = 0;
    }
    free(b);
}

/* Argument building for hot_send_batch, without printf: a batch has about
 * eight arguments per op and the printf family was a visible part of the
 * gateway's profile. Strings that outlive the send (the ops' own fields,
 * literals) are pointed to, not copied: hiredis copies every argument into
 * its output buffer inside redisAsyncCommandArgv. */
typedef struct hot_args {
    hotclient *hc;
    int argc;
    char *at, *end; /* free part of hc->scratch */
} hot_args;

static int hot_arg(hot_args *a, const char *s, size_t len)
{
    if (a->argc == HOT_ARGV_MAX) return -1;
    a->hc->argv[a->argc] = s;
    a->hc->lens[a->argc++] = len;
    return 0;
}

static int hot_arg_str(hot_args *a, const char *s)
{
    return hot_arg(a, s, strlen(s));
}

/* V in decimal, written into the scratch space. */
static int hot_arg_i64(hot_args *a, int64_t v)
{
    char tmp[24], *p = tmp + sizeof tmp;
    uint64_t u = v < 0 ? -(uint64_t)v : (uint64_t)v;
    size_t len;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) *--p = '-';
    len = (size_t)(tmp + sizeof tmp - p);
    if ((size_t)(a->end - a->at) < len) return -1;
    memcpy(a->at, p, len);
    a->at += len;
    return hot_arg(a, a->at - len, len);
}

/* The 32 bytes of H as 64 hex digits, written into the scratch space. */
static int hot_arg_hex(hot_args *a, const unsigned char h[32])
{
    if ((size_t)(a->end - a->at) < IDEM_HEX) return -1;
    idem_hex(h, a->at);
    a->at += IDEM_HEX;
    return hot_arg(a, a->at - IDEM_HEX, IDEM_HEX - 1);
}

/* A settle's idempotency arguments (settle.lua: key hash, marker, ttl). */
static int hot_arg_settle_idem(hot_args *a, const hot_settle_args *s)
{
    hotclient *hc = a->hc;
    int rc = 0;
    if (!s->has_idem) {
        rc |= hot_arg(a, "", 0);
        rc |= hot_arg(a, "", 0);
        return rc | hot_arg(a, "0", 1);
    }
    rc |= hot_arg_hex(a, s->idem.key);
    if (s->commit == HOT_SETTLE_RELEASE) {
        rc |= hot_arg(a, "", 0); /* clears its in-flight marker */
    } else if (s->idem_val) {
        rc |= hot_arg(a, s->idem_val, s->idem_len);
    } else {
        size_t n;
        if ((size_t)(a->end - a->at) < HOT_IDEM_BARE_MAX) return -1;
        n = idem_marker_bare(a->at, HOT_IDEM_BARE_MAX, s->idem.fp, s->rid, s->status,
                             IDEM_WHY_LATE);
        if (n == 0) return -1;
        a->at += n;
        rc |= hot_arg(a, a->at - n, n);
    }
    return rc | hot_arg_i64(a, hc->limits.idem_ttl_ms);
}

/* The key names of ACCOUNT, written into the scratch space once per run of
 * ops on the same account (a batch is mostly one or a few accounts). */
static int hot_arg_keys(hot_args *a, int64_t account, int64_t *last, const char **acct,
                        const char **holds)
{
    hot_keys k;
    size_t la, lh;
    if (*acct && *last == account) {
        if (hot_arg_str(a, *acct) != 0) return -1;
        return hot_arg_str(a, *holds);
    }
    hot_keys_for(&k, account);
    la = strlen(k.acct) + 1;
    lh = strlen(k.holds) + 1;
    if ((size_t)(a->end - a->at) < la + lh) return -1;
    *acct = memcpy(a->at, k.acct, la);
    *holds = memcpy(a->at + la, k.holds, lh);
    a->at += la + lh;
    *last = account;
    if (hot_arg(a, *acct, la - 1) != 0) return -1;
    return hot_arg(a, *holds, lh - 1);
}

/* Formats B as one EVALSHA (or EVAL) into the client's argv and sends it.
 * -1 when the arguments do not fit (a bug: the space is sized for the
 * largest batch) or hiredis refuses the command. */
static int hot_send_batch(hot_batch *b)
{
    hotclient *hc = b->hc;
    const char *sha = hc->sha[b->script];
    const char *acct = NULL, *holds = NULL;
    int64_t last = 0;
    int settle = b->script == HOT_SCRIPT_SETTLE, rc = 0;
    hot_args a = {hc, 0, hc->scratch, hc->scratch + sizeof hc->scratch};

    if (!hc->ac) return -1;
    b->idem = 0;
    for (int i = 0; i < b->n; i++)
        if (b->ops[i].settle.has_idem) b->idem = 1;
    if (sha[0] && !b->retried) {
        rc |= hot_arg(&a, "EVALSHA", 7);
        rc |= hot_arg_str(&a, sha);
    } else {
        rc |= hot_arg(&a, "EVAL", 4);
        rc |= hot_arg_str(&a, hot_script_text(b->script));
    }
    rc |= hot_arg_i64(&a, 2 * b->n + settle);
    if (settle) rc |= hot_arg_str(&a, HOT_OUTBOX);
    for (int i = 0; i < b->n && rc == 0; i++)
        rc |= hot_arg_keys(&a, b->ops[i].settle.account, &last, &acct, &holds);
    for (int i = 0; i < b->n && rc == 0; i++) {
        const hot_op *op = &b->ops[i];
        const hot_settle_args *s = &op->settle;
        rc |= hot_arg_str(&a, s->rid);
        if (settle) {
            rc |= hot_arg_i64(&a, s->charge);
            if (s->commit == HOT_SETTLE_LATE)
                rc |= hot_arg(&a, "late", 4);
            else
                rc |= s->commit ? hot_arg(&a, "commit", 6) : hot_arg(&a, "release", 7);
            rc |= hot_arg_i64(&a, s->status);
            rc |= hot_arg_i64(&a, s->account);
            if (b->idem) rc |= hot_arg_settle_idem(&a, s);
        } else {
            rc |= hot_arg_i64(&a, op->amount);
            rc |= hot_arg_i64(&a, op->ttl_ms);
            rc |= hot_arg_str(&a, op->route);
            rc |= hot_arg_i64(&a, op->lim.key_id);
            rc |= hot_arg_i64(&a, op->lim.rate_quota);
            rc |= hot_arg_i64(&a, op->lim.rate_window_ms);
            if (b->idem && s->has_idem) {
                rc |= hot_arg_hex(&a, s->idem.key);
                rc |= hot_arg_hex(&a, s->idem.fp);
                rc |= hot_arg_i64(&a, hc->limits.idem_ttl_ms);
                rc |= hot_arg_i64(&a, hc->limits.idem_budget);
            } else if (b->idem) {
                rc |= hot_arg(&a, "", 0);
                rc |= hot_arg(&a, "", 0);
                rc |= hot_arg(&a, "0", 1);
                rc |= hot_arg(&a, "0", 1);
            }
        }
    }
    if (rc != 0) {
        log_error("redis: a batch of %d does not fit its argument space", b->n);
        return -1;
    }
    /* The stall clock starts when the first command waits on an idle link. */
    if (hc->inflight == 0) clock_gettime(CLOCK_MONOTONIC, &hc->last_reply);
    if (redisAsyncCommandArgv(hc->ac, hot_on_batch_reply, b, a.argc, hc->argv, hc->lens) !=
        REDIS_OK)
        return -1;
    return 0;
}

/* Sends OPS[0..N) of SCRIPT as one batch; if that cannot be done, fails them. */
static void hot_send_ops(hotclient *hc, enum hot_script script, hot_op *ops, int n)
{
    hot_batch *b = malloc(sizeof *b + (size_t)n * sizeof b->ops[0]);
    if (!b) {
        log_error("out of memory: failing %d redis ops", n);
        hot_fail_ops(hc, script, ops, n);
        return;
    }
    b->hc = hc;
    b->script = script;
    b->retried = 0;
    b->n = n;
    memcpy(b->ops, ops, (size_t)n * sizeof b->ops[0]);
    if (hot_send_batch(b) == 0) {
        hc->inflight += n;
        return;
    }
    hot_fail_ops(hc, script, b->ops, n);
    free(b);
}

/* Sends every pending op of SCRIPT, HOT_BATCH_MAX at a time. The pending
 * array is taken first: callbacks of failed ops may queue new ones, which
 * go to the next pass. */
static void hot_send_pending(hotclient *hc, enum hot_script script)
{
    hot_pending taken = hc->pending[script];
    if (taken.n == 0) return;
    hc->pending[script] = (hot_pending){0, 0, NULL};
    for (int at = 0; at < taken.n; at += HOT_BATCH_MAX)
        hot_send_ops(hc, script, taken.ops + at,
                     taken.n - at < HOT_BATCH_MAX ? taken.n - at : HOT_BATCH_MAX);
    if (hc->pending[script].ops == NULL)
        hc->pending[script] = (hot_pending){0, taken.cap, taken.ops}; /* reuse it */
    else
        free(taken.ops);
}

/* Answers every pending reserve with RC without sending it (never sent:
 * no release to queue). */
static void hot_refuse_reserves(hotclient *hc, int rc)
{
    hot_pending taken = hc->pending[HOT_SCRIPT_RESERVE];
    hc->pending[HOT_SCRIPT_RESERVE] = (hot_pending){0, 0, NULL};
    for (int i = 0; i < taken.n; i++)
        if (taken.ops[i].cb) taken.ops[i].cb(taken.ops[i].arg, rc, &hot_no_reply);
    free(taken.ops);
}

static void hot_on_batch(evutil_socket_t fd, short what, void *arg)
{
    hotclient *hc = arg;
    hc->batch_scheduled = 0;
    hot_send_pending(hc, HOT_SCRIPT_SETTLE);
    /* Settles always go; new holds not while settlement is too far behind
     * or this worker cannot keep more settles (fail closed, 503). */
    if (hc->backlog >= hc->limits.max_backlog)
        hot_refuse_reserves(hc, HOT_ERR_BACKLOG);
    else if (hotclient_refusing(hc))
        hot_refuse_reserves(hc, HOT_ERR_UNAVAILABLE);
    else
        hot_send_pending(hc, HOT_SCRIPT_RESERVE);
}

/* Adds an op to the pending ops of SCRIPT, sent at the end of this loop
 * pass (never from here: callbacks run only from the loop). Returns the op
 * to fill, or NULL when out of memory. */
static hot_op *hot_add(hotclient *hc, enum hot_script script, hot_cb cb, void *arg)
{
    hot_pending *p = &hc->pending[script];
    hot_op *op;
    if (p->n == p->cap) {
        int cap = p->cap ? p->cap * 2 : 64;
        hot_op *ops = realloc(p->ops, (size_t)cap * sizeof *ops);
        if (!ops) return NULL;
        p->ops = ops;
        p->cap = cap;
    }
    if (!hc->batch_scheduled) {
        /* Active now, run after the callbacks already due in this pass:
         * everything they ask for joins the batch. */
        event_active(hc->batch, EV_TIMEOUT, 0);
        hc->batch_scheduled = 1;
    }
    op = &p->ops[p->n++];
    memset(&op->settle, 0, sizeof op->settle);
    op->cb = cb;
    op->arg = arg;
    return op;
}

int hotclient_reserve(hotclient *hc, int64_t account, const char *rid, int64_t amount,
                      int64_t ttl_ms, const char *route_id, const hot_limit_args *lim,
                      const hot_idem_args *idem, hot_cb cb, void *arg)
{
    hot_op *op;
    if (!hc->ac || hc->closing || strlen(route_id) >= HOT_ROUTE_MAX ||
        strlen(rid) >= sizeof op->settle.rid)
        return -1;
    op = hot_add(hc, HOT_SCRIPT_RESERVE, cb, arg);
    if (!op) return -1;
    /* The release to queue if the reply is lost (see hot_on_batch_reply). */
    op->settle.account = account;
    memcpy(op->settle.rid, rid, strlen(rid) + 1);
    op->amount = amount;
    op->ttl_ms = ttl_ms;
    if (lim)
        op->lim = *lim;
    else
        memset(&op->lim, 0, sizeof op->lim);
    memcpy(op->route, route_id, strlen(route_id) + 1);
    /* Its release (a lost reply) clears the in-flight marker too. */
    if (idem) {
        op->settle.has_idem = 1;
        op->settle.idem = *idem;
    }
    return 0;
}

const char *hotclient_reserve_answer(const hotclient *hc, size_t *len)
{
    *len = hc->answer_len;
    return hc->answer;
}

int hotclient_settle(hotclient *hc, const hot_settle_args *a, hot_cb cb, void *arg)
{
    hot_op *op;
    if (!hc->ac || hc->closing) {
        hot_enqueue_settle(hc, a);
        return -1;
    }
    op = hot_add(hc, HOT_SCRIPT_SETTLE, cb, arg);
    if (!op) {
        hot_enqueue_settle(hc, a);
        return -1;
    }
    op->settle = *a;
    return 0;
}

/* ---- lease ops ---------------------------------------------------------- */

typedef struct hot_lease_cmd {
    hotclient *hc;
    hot_lease_cb cb;
    void *arg;
} hot_lease_cmd;

static void hot_on_lease_reply(redisAsyncContext *ac, void *r, void *priv)
{
    hot_lease_cmd *cmd = priv;
    hotclient *hc = cmd->hc;
    redisReply *rep = r;
    hot_lease_reply out = {0, 0, 0, 0, 0};
    int64_t *v[5] = {&out.status, &out.amount, &out.available, &out.contended, &out.charged};
    int rc = -1;
    hot_answered(hc, rep, 1);
    if (rep && rep->type == REDIS_REPLY_ERROR) {
        log_error("redis error on a lease op: %s", rep->str);
        if (strncmp(rep->str, "NOSCRIPT", 8) == 0 && hc->ac && !hc->closing) {
            /* Learn it again; lease.c resends the op, by EVAL meanwhile. */
            memset(hc->sha[HOT_SCRIPT_LEASE], 0, sizeof hc->sha[HOT_SCRIPT_LEASE]);
            redisAsyncCommand(hc->ac, hot_on_script_loaded, (void *)(intptr_t)HOT_SCRIPT_LEASE,
                              "SCRIPT LOAD %s", hot_lua_lease);
        }
        if (strstr(rep->str, "READONLY") && hc->ac && hc->connected) redisAsyncDisconnect(hc->ac);
    } else if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 5) {
        rc = 0;
        for (int i = 0; i < 5; i++)
            if (hot_int(rep->element[i], v[i]) != 0) rc = -1;
    } else if (rep) {
        log_error("redis: unexpected reply to a lease op");
    }
    if (cmd->cb) cmd->cb(cmd->arg, rc, &out);
    free(cmd);
}

int hotclient_lease(hotclient *hc, const hot_lease_args *l, hot_lease_cb cb, void *arg)
{
    const char *sha = hc->sha[HOT_SCRIPT_LEASE];
    hot_args a = {hc, 0, hc->scratch, hc->scratch + sizeof hc->scratch};
    hot_lease_cmd *cmd;
    hot_keys k;
    int rc = 0;

    if (!hc->ac || hc->closing || l->nrec < 0 || l->nrec > 2 * HOT_LEASE_RECORDS_MAX) return -1;
    hot_keys_for(&k, l->account);
    if (sha[0]) {
        rc |= hot_arg(&a, "EVALSHA", 7);
        rc |= hot_arg_str(&a, sha);
    } else {
        rc |= hot_arg(&a, "EVAL", 4);
        rc |= hot_arg_str(&a, hot_lua_lease);
    }
    rc |= hot_arg(&a, "3", 1);
    rc |= hot_arg_str(&a, k.acct);
    rc |= hot_arg_str(&a, k.holds);
    rc |= hot_arg_str(&a, HOT_OUTBOX);
    rc |= hot_arg_str(&a, l->lid);
    rc |= hot_arg_i64(&a, l->seq);
    rc |= hot_arg_i64(&a, l->ttl_ms);
    rc |= hot_arg_i64(&a, l->charge);
    rc |= hot_arg_i64(&a, l->resize);
    rc |= hot_arg_i64(&a, l->busy);
    if (l->close == HOT_LEASE_LATE)
        rc |= hot_arg(&a, "late", 4);
    else
        rc |= hot_arg(&a, l->close ? "1" : "0", 1);
    for (int i = 0; i < l->nrec && rc == 0; i++)
        rc |= hot_arg(&a, l->recs[i], l->lens[i]);
    if (rc != 0) {
        log_error("redis: a lease op of %d records does not fit its argument space", l->nrec);
        return -1;
    }
    cmd = malloc(sizeof *cmd);
    if (!cmd) return -1;
    *cmd = (hot_lease_cmd){.hc = hc, .cb = cb, .arg = arg};
    if (hc->inflight == 0) clock_gettime(CLOCK_MONOTONIC, &hc->last_reply);
    if (redisAsyncCommandArgv(hc->ac, hot_on_lease_reply, cmd, a.argc, hc->argv, hc->lens) !=
        REDIS_OK) {
        free(cmd);
        return -1;
    }
    hc->inflight++;
    return 0;
}
