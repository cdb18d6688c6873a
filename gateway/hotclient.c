/* hotclient.c: async hiredis client (see hotclient.h).
 *
 * Scripts run by EVALSHA once SCRIPT LOAD has answered on this connection;
 * before that (and after a NOSCRIPT error, e.g. SCRIPT FLUSH) by EVAL with
 * the text, which also caches it server-side. Every command keeps its
 * arguments in its op so that a NOSCRIPT retry can resend them. */
#include "gateway/hotclient.h"

#include "billing/hotkeys.h"
#include "billing/log.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HOT_ARGS_MAX 12
#define HOT_ARG_LEN 160
#define HOT_SETTLE_QUEUE_MAX 65536
#define HOT_BACKOFF_MIN_MS 50
#define HOT_BACKOFF_MAX_MS 1000
/* No reply at all for this long while commands wait: the server is stuck
 * (or the network silently dropped us). Drop the connection so waiting
 * calls fail with 503 and settles are queued, instead of hanging. */
#define HOT_STALL_MS 3000
#define HOT_WATCHDOG_MS 500

enum hot_script { HOT_SCRIPT_NONE = -1, HOT_SCRIPT_RESERVE, HOT_SCRIPT_SETTLE, HOT_NSCRIPTS };
enum hot_kind { HOT_KEY, HOT_BALANCE, HOT_RESERVE, HOT_SETTLE };

struct hotclient {
    struct event_base *base;
    char host[256];
    int port;
    int db;
    redisAsyncContext *ac;
    int connected;
    int closing;
    int writing; /* inside redisAsyncHandleWrite */
    struct event *retry;
    struct event *flush; /* resend queued settles while connected */
    struct event *watchdog;
    struct timespec last_reply;
    int backoff_ms;
    char sha[HOT_NSCRIPTS][48];
    int inflight;
    hot_settle_args *queue; /* settles waiting for Redis to come back */
    size_t qlen, qcap;      /* grows on demand up to HOT_SETTLE_QUEUE_MAX */
};

typedef struct hot_op {
    hotclient *hc;
    enum hot_kind kind;
    enum hot_script script;
    int retried;
    hot_cb cb;
    void *arg;
    hot_settle_args settle;
    int argc;
    char args[HOT_ARGS_MAX][HOT_ARG_LEN];
} hot_op;

static const char *hot_script_text(enum hot_script s)
{
    return s == HOT_SCRIPT_RESERVE ? hot_lua_reserve : hot_lua_settle;
}

static void hot_connect(hotclient *hc);
static int hot_send(hot_op *op);

static void hot_schedule_retry(hotclient *hc)
{
    struct timeval tv = {hc->backoff_ms / 1000, (hc->backoff_ms % 1000) * 1000};
    if (hc->closing) return;
    evtimer_add(hc->retry, &tv);
    hc->backoff_ms =
        hc->backoff_ms * 2 > HOT_BACKOFF_MAX_MS ? HOT_BACKOFF_MAX_MS : hc->backoff_ms * 2;
}

static void hot_on_retry(evutil_socket_t fd, short what, void *arg)
{
    hot_connect(arg);
}

static void hot_enqueue_settle(hotclient *hc, const hot_settle_args *a)
{
    if (hc->qlen == hc->qcap && hc->qcap < HOT_SETTLE_QUEUE_MAX) {
        size_t cap = hc->qcap ? hc->qcap * 2 : 64;
        hot_settle_args *q = realloc(hc->queue, cap * sizeof *q);
        if (q) {
            hc->queue = q;
            hc->qcap = cap;
        }
    }
    if (hc->qlen >= hc->qcap) {
        /* The hold stays in Redis; the sweeper releases it at its deadline
         * (a lost commit is then a call not charged, never a double charge). */
        log_error("settle queue full, dropping settle rid=%s account=%lld commit=%d", a->rid,
                  (long long)a->account, a->commit);
        return;
    }
    hc->queue[hc->qlen++] = *a;
    /* Connected but refused (e.g. LOADING after a restart): try again soon.
     * Disconnected: hot_on_connect flushes. */
    if (hc->connected && !hc->closing && !evtimer_pending(hc->flush, NULL)) {
        struct timeval tv = {0, 100 * 1000};
        evtimer_add(hc->flush, &tv);
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
    log_info("redis %s:%d connected", hc->host, hc->port);
    hc->connected = 1;
    hc->backoff_ms = HOT_BACKOFF_MIN_MS;
    hot_flush_queue(hc);
}

static void hot_on_disconnect(const redisAsyncContext *ac, int status)
{
    hotclient *hc = ac->data;
    if (!hc) return;
    if (!hc->closing)
        log_warn("redis disconnected: %s", status == REDIS_OK ? "closed" : ac->errstr);
    hc->ac = NULL;
    hc->connected = 0;
    memset(hc->sha, 0, sizeof hc->sha);
    hot_schedule_retry(hc);
}

/* ---- hiredis on libevent, without epoll_ctl churn ---------------------
 * hiredis' own libevent adapter (0.14) uses a one-shot read event, re-added
 * after every read, and adds/deletes a write event around every write:
 * about four epoll_ctl calls per batch of replies. Here the read event is
 * persistent, and a write is first tried from a deferred event at the end
 * of the current loop iteration (so all commands issued in one iteration
 * go out in one send); only a write that cannot finish (or a connect in
 * progress) waits for EV_WRITE. */
typedef struct hot_ev {
    redisAsyncContext *ac;
    hotclient *hc;
    struct event *rev; /* persistent */
    struct event *wev; /* one-shot: the socket is writable again */
    struct event *flush;
    int reading;
} hot_ev;

static void hot_ev_on_read(evutil_socket_t fd, short what, void *arg)
{
    hot_ev *e = arg;
    redisAsyncHandleRead(e->ac); /* may free E (disconnect) */
}

static void hot_ev_write_now(hot_ev *e)
{
    hotclient *hc = e->hc;
    hc->writing = 1;              /* a write that does not finish now waits for EV_WRITE */
    redisAsyncHandleWrite(e->ac); /* may free E */
    hc->writing = 0;
}

static void hot_ev_on_write(evutil_socket_t fd, short what, void *arg)
{
    hot_ev_write_now(arg);
}

static void hot_ev_add_read(void *priv)
{
    hot_ev *e = priv;
    if (e->reading) return;
    if (event_add(e->rev, NULL) == 0) e->reading = 1;
}

static void hot_ev_del_read(void *priv)
{
    hot_ev *e = priv;
    if (!e->reading) return;
    event_del(e->rev);
    e->reading = 0;
}

static void hot_ev_add_write(void *priv)
{
    hot_ev *e = priv;
    if (e->hc->writing || !(e->ac->c.flags & REDIS_CONNECTED))
        event_add(e->wev, NULL);
    else if (!event_pending(e->flush, EV_TIMEOUT, NULL))
        event_active(e->flush, EV_TIMEOUT, 0);
}

static void hot_ev_del_write(void *priv)
{
    hot_ev *e = priv;
    event_del(e->wev);
    event_del(e->flush);
}

static void hot_ev_cleanup(void *priv)
{
    hot_ev *e = priv;
    if (e->rev) event_free(e->rev);
    if (e->wev) event_free(e->wev);
    if (e->flush) event_free(e->flush);
    free(e);
}

static int hot_ev_attach(hotclient *hc, redisAsyncContext *ac)
{
    hot_ev *e;
    if (ac->ev.data) return -1;
    e = calloc(1, sizeof *e);
    if (!e) return -1;
    e->ac = ac;
    e->hc = hc;
    e->rev = event_new(hc->base, ac->c.fd, EV_READ | EV_PERSIST, hot_ev_on_read, e);
    e->wev = event_new(hc->base, ac->c.fd, EV_WRITE, hot_ev_on_write, e);
    e->flush = event_new(hc->base, -1, 0, hot_ev_on_write, e);
    if (!e->rev || !e->wev || !e->flush) {
        hot_ev_cleanup(e);
        return -1;
    }
    ac->ev.data = e;
    ac->ev.addRead = hot_ev_add_read;
    ac->ev.delRead = hot_ev_del_read;
    ac->ev.addWrite = hot_ev_add_write;
    ac->ev.delWrite = hot_ev_del_write;
    ac->ev.cleanup = hot_ev_cleanup;
    /* As hiredis' adapter: the connect completes when writable. */
    hot_ev_add_read(e);
    event_add(e->wev, NULL);
    return 0;
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
    if (hot_ev_attach(hc, ac) != 0) {
        redisAsyncFree(ac);
        hot_schedule_retry(hc);
        return;
    }
    redisAsyncSetConnectCallback(ac, hot_on_connect);
    redisAsyncSetDisconnectCallback(ac, hot_on_disconnect);
    hc->ac = ac;
    /* Queued by hiredis until the connection is up; pipelined before any op. */
    if (hc->db != 0) redisAsyncCommand(ac, NULL, NULL, "SELECT %d", hc->db);
    for (intptr_t i = 0; i < HOT_NSCRIPTS; i++)
        redisAsyncCommand(ac, hot_on_script_loaded, (void *)i, "SCRIPT LOAD %s",
                          hot_script_text((enum hot_script)i));
}

int hotclient_new(struct event_base *base, const char *host, int port, int db, hotclient **out)
{
    hotclient *hc = calloc(1, sizeof *hc);
    if (!hc) return -1;
    hc->base = base;
    snprintf(hc->host, sizeof hc->host, "%s", host);
    hc->port = port;
    hc->db = db;
    hc->backoff_ms = HOT_BACKOFF_MIN_MS;
    hc->retry = evtimer_new(base, hot_on_retry, hc);
    hc->flush = evtimer_new(base, hot_on_flush, hc);
    hc->watchdog = event_new(base, -1, EV_PERSIST, hot_on_watchdog, hc);
    if (!hc->retry || !hc->flush || !hc->watchdog) {
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

void hotclient_free(hotclient *hc)
{
    if (!hc) return;
    hc->closing = 1;
    if (hc->ac) {
        redisAsyncContext *ac = hc->ac;
        hc->ac = NULL;
        redisAsyncFree(ac); /* runs pending callbacks with NULL */
    }
    if (hc->qlen)
        log_error("exiting with %zu settles undelivered (sweeper will release)", hc->qlen);
    if (hc->retry) event_free(hc->retry);
    if (hc->flush) event_free(hc->flush);
    if (hc->watchdog) event_free(hc->watchdog);
    free(hc->queue);
    free(hc);
}

int hotclient_up(const hotclient *hc)
{
    return hc->ac != NULL;
}

int hotclient_busy(const hotclient *hc)
{
    return hc->inflight + (int)hc->qlen;
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

/* Turns a reply into (rc, v). */
static int hot_decode(const hot_op *op, const redisReply *r, int64_t v[3])
{
    if (op->kind == HOT_KEY) {
        if (r->type == REDIS_REPLY_NIL) return 1;
        return hot_int(r, &v[0]) == 0 ? 0 : -1;
    }
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3) return -1;
    if (op->kind == HOT_BALANCE && r->element[0]->type == REDIS_REPLY_NIL) return 1;
    for (int i = 0; i < 3; i++) {
        if (op->kind == HOT_BALANCE && r->element[i]->type == REDIS_REPLY_NIL) {
            v[i] = 0;
            continue;
        }
        if (hot_int(r->element[i], &v[i]) != 0) return -1;
    }
    return 0;
}

/* Errors Redis answers while it cannot serve yet; the command may succeed later. */
static int hot_transient(const char *err)
{
    static const char *const t[] = {"LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN"};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (strncmp(err, t[i], strlen(t[i])) == 0) return 1;
    return 0;
}

static void hot_on_reply(redisAsyncContext *ac, void *r, void *priv)
{
    hot_op *op = priv;
    hotclient *hc = op->hc;
    redisReply *rep = r;
    int64_t v[3] = {0, 0, 0};
    int rc = -1;

    if (rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "NOSCRIPT", 8) == 0 &&
        !op->retried && hc->ac && !hc->closing) {
        op->retried = 1;
        memset(hc->sha[op->script], 0, sizeof hc->sha[op->script]);
        if (hot_send(op) == 0) return; /* same op, still in flight */
    }
    hc->inflight--;
    if (rep) clock_gettime(CLOCK_MONOTONIC, &hc->last_reply);
    if (rep) {
        if (rep->type == REDIS_REPLY_ERROR)
            log_error("redis error: %s", rep->str);
        else
            rc = hot_decode(op, rep, v);
    }
    /* A settle must not be lost to an outage: no reply, or a transient
     * refusal, puts it back in the queue (settle is idempotent by rid). */
    if (op->kind == HOT_SETTLE &&
        (!rep || (rep->type == REDIS_REPLY_ERROR && hot_transient(rep->str))))
        hot_enqueue_settle(hc, &op->settle);
    /* A reserve sent but never answered (link dropped, e.g. by the stall
     * watchdog) may still run when Redis reads its socket: the caller gets
     * 503, so queue a release for it. Idempotent by rid: a no-op if the
     * reserve never ran. */
    if (op->kind == HOT_RESERVE && !rep && !hc->closing) hot_enqueue_settle(hc, &op->settle);
    if (op->cb) op->cb(op->arg, rc, v);
    free(op);
}

static int hot_send(hot_op *op)
{
    hotclient *hc = op->hc;
    const char *argv[HOT_ARGS_MAX + 2];
    size_t lens[HOT_ARGS_MAX + 2];
    int argc = 0;

    if (!hc->ac) return -1;
    if (op->script != HOT_SCRIPT_NONE) {
        const char *sha = hc->sha[op->script];
        if (sha[0] && !op->retried) {
            argv[argc++] = "EVALSHA";
            argv[argc++] = sha;
        } else {
            argv[argc++] = "EVAL";
            argv[argc++] = hot_script_text(op->script);
        }
    }
    for (int i = 0; i < op->argc; i++)
        argv[argc++] = op->args[i];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    /* The stall clock starts when the first command waits on an idle link. */
    if (hc->inflight == 0) clock_gettime(CLOCK_MONOTONIC, &hc->last_reply);
    if (redisAsyncCommandArgv(hc->ac, hot_on_reply, op, argc, argv, lens) != REDIS_OK) return -1;
    return 0;
}

static hot_op *hot_op_new(hotclient *hc, enum hot_kind kind, enum hot_script script, hot_cb cb,
                          void *arg)
{
    hot_op *op;
    if (!hc->ac || hc->closing) return NULL;
    op = calloc(1, sizeof *op);
    if (!op) return NULL;
    op->hc = hc;
    op->kind = kind;
    op->script = script;
    op->cb = cb;
    op->arg = arg;
    return op;
}

#define HOT_ARG(op, ...) snprintf((op)->args[(op)->argc++], HOT_ARG_LEN, __VA_ARGS__)

static int hot_submit(hot_op *op)
{
    if (hot_send(op) != 0) {
        free(op);
        return -1;
    }
    op->hc->inflight++;
    return 0;
}

int hotclient_key(hotclient *hc, const char *hash_hex, hot_cb cb, void *arg)
{
    hot_op *op = hot_op_new(hc, HOT_KEY, HOT_SCRIPT_NONE, cb, arg);
    if (!op) return -1;
    HOT_ARG(op, "GET");
    HOT_ARG(op, "%s%s", HOT_KEY_PREFIX, hash_hex);
    return hot_submit(op);
}

int hotclient_balance(hotclient *hc, int64_t account, hot_cb cb, void *arg)
{
    hot_op *op = hot_op_new(hc, HOT_BALANCE, HOT_SCRIPT_NONE, cb, arg);
    hot_keys k;
    if (!op) return -1;
    hot_keys_for(&k, account);
    HOT_ARG(op, "HMGET");
    HOT_ARG(op, "%s", k.acct);
    HOT_ARG(op, "credited");
    HOT_ARG(op, "spent");
    HOT_ARG(op, "held");
    return hot_submit(op);
}

int hotclient_reserve(hotclient *hc, int64_t account, const char *rid, int64_t amount,
                      int64_t ttl_ms, const char *route_id, hot_cb cb, void *arg)
{
    hot_op *op = hot_op_new(hc, HOT_RESERVE, HOT_SCRIPT_RESERVE, cb, arg);
    hot_keys k;
    if (!op) return -1;
    /* The release to queue if the reply is lost (see hot_on_reply). */
    op->settle.account = account;
    snprintf(op->settle.rid, sizeof op->settle.rid, "%s", rid);
    hot_keys_for(&k, account);
    HOT_ARG(op, "3");
    HOT_ARG(op, "%s", k.acct);
    HOT_ARG(op, "%s", k.holds);
    HOT_ARG(op, "%s", k.dl);
    HOT_ARG(op, "%s", rid);
    HOT_ARG(op, "%lld", (long long)amount);
    HOT_ARG(op, "%lld", (long long)ttl_ms);
    HOT_ARG(op, "%s", route_id);
    return hot_submit(op);
}

int hotclient_settle(hotclient *hc, const hot_settle_args *a, hot_cb cb, void *arg)
{
    hot_op *op = hot_op_new(hc, HOT_SETTLE, HOT_SCRIPT_SETTLE, cb, arg);
    hot_keys k;
    if (!op) {
        hot_enqueue_settle(hc, a);
        return -1;
    }
    op->settle = *a;
    hot_keys_for(&k, a->account);
    HOT_ARG(op, "4");
    HOT_ARG(op, "%s", k.acct);
    HOT_ARG(op, "%s", k.holds);
    HOT_ARG(op, "%s", k.dl);
    HOT_ARG(op, "%s", HOT_OUTBOX);
    HOT_ARG(op, "%s", a->rid);
    HOT_ARG(op, "%lld", (long long)a->charge);
    HOT_ARG(op, "%s", a->commit ? "commit" : "release");
    HOT_ARG(op, "%ld", a->status);
    HOT_ARG(op, "%lld", (long long)a->account);
    if (hot_submit(op) != 0) {
        hot_enqueue_settle(hc, a);
        return -1;
    }
    return 0;
}
