/* pgclient.c: libpq's asynchronous API on libevent (see pgclient.h).
 *
 *   DOWN --query--> CONNECTING --PQconnectPoll OK--> READY <--> BUSY
 *     ^                  |                              |         |
 *     +---- failure, deadline, server closed (fail all queued) ---+
 *
 * CONNECTING follows PQconnectPoll's READING/WRITING answers on PQsocket
 * (which may change between calls). BUSY: PQsendQueryParams, PQflush until
 * sent, then PQconsumeInput/PQisBusy/PQgetResult on readability until
 * PQgetResult answers NULL. READY keeps watching the socket so that a
 * server that closes an idle connection is noticed (and the next query
 * reconnects). One timer bounds a connect and each query. */
#include "gateway/pgclient.h"

#include "common/log.h"
#include "gateway/resolve.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum pg_state { PG_DOWN, PG_CONNECTING, PG_READY, PG_BUSY };

typedef struct pg_op {
    const char *sql;
    int nparams;
    char params[PGCLIENT_PARAMS_MAX][PGCLIENT_PARAM_LEN];
    pg_cb cb;
    void *arg;
} pg_op;

struct pgclient {
    struct event_base *base;
    char *conninfo; /* NULL: disabled */
    /* conninfo parsed, plus hostaddr= when its host is a name resolved at
     * start (libpq would resolve it inside PQconnectStart, on the loop) */
    const char **keys, **vals;
    PQconninfoOption *opts;
    char hostaddr[64];
    int64_t timeout_ms;
    PGconn *conn;
    enum pg_state st;
    struct event *ev; /* PQsocket; assigned on demand */
    int ev_fd;
    short ev_what;
    struct event *deadline;
    struct event *kick; /* send the next query from the loop */
    PGresult *result;   /* first result of the running query */
    pg_op *q;           /* ring of PGCLIENT_QUEUE_MAX, allocated on first use */
    int qhead, qlen;
    int warned; /* connection failures are logged once until a success */
};

static void pg_on_event(evutil_socket_t fd, short what, void *arg);

static void pg_unwatch(pgclient *c)
{
    if (c->ev_fd >= 0) event_del(c->ev);
    c->ev_fd = -1;
    c->ev_what = 0;
}

/* FORCE: register again even if fd and events look unchanged: while
 * connecting, libpq may close its socket and open another that gets the
 * same number (e.g. ::1 refused, then 127.0.0.1), which epoll forgot. */
static int pg_watch(pgclient *c, short what, int force)
{
    int fd = PQsocket(c->conn);
    if (fd < 0) return -1;
    if (!force && fd == c->ev_fd && what == c->ev_what) return 0;
    pg_unwatch(c);
    if (event_assign(c->ev, c->base, fd, what | EV_PERSIST, pg_on_event, c) != 0 ||
        event_add(c->ev, NULL) != 0)
        return -1;
    c->ev_fd = fd;
    c->ev_what = what;
    return 0;
}

static void pg_arm_deadline(pgclient *c)
{
    struct timeval tv = {(time_t)(c->timeout_ms / 1000),
                         (suseconds_t)((c->timeout_ms % 1000) * 1000)};
    evtimer_add(c->deadline, &tv);
}

static void pg_close(pgclient *c)
{
    pg_unwatch(c);
    evtimer_del(c->deadline);
    if (c->result) PQclear(c->result);
    c->result = NULL;
    if (c->conn) PQfinish(c->conn);
    c->conn = NULL;
    c->st = PG_DOWN;
}

/* Runs the callbacks of every queued query with NULL. Callbacks may queue
 * new queries (they then start a new connection): only those queued before
 * are failed here. */
static void pg_fail_queue(pgclient *c)
{
    int n = c->qlen;
    while (n-- > 0 && c->qlen > 0) {
        pg_op op = c->q[c->qhead];
        c->qhead = (c->qhead + 1) % PGCLIENT_QUEUE_MAX;
        c->qlen--;
        op.cb(op.arg, NULL);
    }
}

static void pg_fail(pgclient *c, const char *what)
{
    if (!c->warned) {
        const char *msg = c->conn ? PQerrorMessage(c->conn) : "";
        size_t n = strlen(msg);
        while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
            n--;
        log_warn("postgres: %s%s%.*s", what, n ? ": " : "", (int)n, msg);
        c->warned = 1;
    }
    pg_close(c);
    pg_fail_queue(c);
}

static void pg_send_next(pgclient *c)
{
    const char *params[PGCLIENT_PARAMS_MAX];
    pg_op *op;
    int rc;
    if (c->st != PG_READY || c->qlen == 0) return;
    op = &c->q[c->qhead];
    for (int i = 0; i < op->nparams; i++)
        params[i] = op->params[i];
    if (!PQsendQueryParams(c->conn, op->sql, op->nparams, NULL, params, NULL, NULL, 0)) {
        pg_fail(c, "cannot send query");
        return;
    }
    c->st = PG_BUSY;
    pg_arm_deadline(c);
    rc = PQflush(c->conn);
    if (rc < 0 || pg_watch(c, rc == 1 ? EV_READ | EV_WRITE : EV_READ, 0) != 0)
        pg_fail(c, "cannot send query");
}

/* Readable while BUSY: collect results until the query is complete. */
static void pg_read_results(pgclient *c)
{
    while (!PQisBusy(c->conn)) {
        PGresult *res = PQgetResult(c->conn);
        pg_op op;
        if (res) {
            if (!c->result)
                c->result = res;
            else
                PQclear(res);
            continue;
        }
        /* Complete: take the op off the queue before its callback, which
         * may queue another query. */
        op = c->q[c->qhead];
        c->qhead = (c->qhead + 1) % PGCLIENT_QUEUE_MAX;
        c->qlen--;
        res = c->result;
        c->result = NULL;
        c->st = PG_READY;
        evtimer_del(c->deadline);
        if (res && PQresultStatus(res) != PGRES_TUPLES_OK &&
            PQresultStatus(res) != PGRES_COMMAND_OK)
            log_warn("postgres: query failed: %s", PQresultErrorMessage(res));
        op.cb(op.arg, res);
        PQclear(res);
        /* The callback may have run pg_send_next already (via a new query). */
        if (c->st == PG_READY) pg_send_next(c);
        return;
    }
}

static void pg_on_connect_poll(pgclient *c)
{
    switch (PQconnectPoll(c->conn)) {
    case PGRES_POLLING_READING:
        if (pg_watch(c, EV_READ, 1) != 0) pg_fail(c, "connect");
        return;
    case PGRES_POLLING_WRITING:
        if (pg_watch(c, EV_WRITE, 1) != 0) pg_fail(c, "connect");
        return;
    case PGRES_POLLING_OK:
        if (PQsetnonblocking(c->conn, 1) != 0 || pg_watch(c, EV_READ, 1) != 0) {
            pg_fail(c, "connect");
            return;
        }
        if (c->warned) log_info("postgres: connected");
        c->warned = 0;
        c->st = PG_READY;
        evtimer_del(c->deadline);
        pg_send_next(c);
        return;
    default:
        pg_fail(c, "connect failed");
        return;
    }
}

static void pg_on_event(evutil_socket_t fd, short what, void *arg)
{
    pgclient *c = arg;
    if (c->st == PG_CONNECTING) {
        pg_on_connect_poll(c);
        return;
    }
    if (c->st != PG_READY && c->st != PG_BUSY) return;
    if (what & EV_WRITE) {
        int rc = PQflush(c->conn);
        if (rc < 0) {
            pg_fail(c, "send failed");
            return;
        }
        if (rc == 0 && pg_watch(c, EV_READ, 0) != 0) {
            pg_fail(c, "send failed");
            return;
        }
    }
    if (!(what & EV_READ)) return;
    if (!PQconsumeInput(c->conn) || PQstatus(c->conn) == CONNECTION_BAD) {
        /* An idle connection the server closed is no failure of anyone's. */
        if (c->st == PG_READY && c->qlen == 0) {
            log_info("postgres: connection closed, reconnecting on next use");
            pg_close(c);
            return;
        }
        pg_fail(c, "connection lost");
        return;
    }
    {
        PGnotify *n;
        while ((n = PQnotifies(c->conn)) != NULL)
            PQfreemem(n);
    }
    if (c->st == PG_BUSY) pg_read_results(c);
}

static void pg_on_kick(evutil_socket_t fd, short what, void *arg)
{
    pg_send_next(arg);
}

static void pg_on_deadline(evutil_socket_t fd, short what, void *arg)
{
    pgclient *c = arg;
    c->warned = 0; /* always worth a line */
    pg_fail(c, c->st == PG_CONNECTING ? "connect timed out" : "query timed out");
}

static int pg_connect(pgclient *c)
{
    c->conn = PQconnectStartParams(c->keys, c->vals, 0);
    if (!c->conn || PQstatus(c->conn) == CONNECTION_BAD) {
        if (!c->warned) {
            log_warn("postgres: cannot connect: %s",
                     c->conn ? PQerrorMessage(c->conn) : "out of memory");
            c->warned = 1;
        }
        pg_close(c);
        return -1;
    }
    c->st = PG_CONNECTING;
    pg_arm_deadline(c);
    /* libpq: start as if PQconnectPoll had answered WRITING. */
    if (pg_watch(c, EV_WRITE, 1) != 0) {
        pg_close(c);
        return -1;
    }
    return 0;
}

/* Parses CONNINFO into keyword/value arrays, adding hostaddr= for a host
 * given by name. -1 (logged) if it does not parse or resolve. */
static int pg_params(pgclient *c, const char *conninfo)
{
    char *err = NULL;
    const char *host = NULL;
    int n = 0, has_addr = 0, i = 0;
    c->opts = PQconninfoParse(conninfo, &err);
    if (!c->opts) {
        log_error("DATABASE_URL: %s", err ? err : "out of memory");
        PQfreemem(err);
        return -1;
    }
    for (PQconninfoOption *o = c->opts; o->keyword; o++) {
        if (!o->val) continue;
        n++;
        if (strcmp(o->keyword, "host") == 0) host = o->val;
        if (strcmp(o->keyword, "hostaddr") == 0) has_addr = 1;
    }
    c->keys = calloc((size_t)n + 2, sizeof *c->keys);
    c->vals = calloc((size_t)n + 2, sizeof *c->vals);
    if (!c->keys || !c->vals) return -1;
    for (PQconninfoOption *o = c->opts; o->keyword; o++) {
        if (!o->val) continue;
        c->keys[i] = o->keyword;
        c->vals[i++] = o->val;
    }
    /* A socket directory, several hosts or a given address: left to libpq. */
    if (host && !has_addr && host[0] != '/' && !strchr(host, ',') && !resolve_is_numeric(host)) {
        if (resolve_host(host, c->hostaddr, sizeof c->hostaddr) != 0) return -1;
        c->keys[i] = "hostaddr";
        c->vals[i] = c->hostaddr;
    }
    return 0;
}

int pgclient_new(struct event_base *base, const char *conninfo, int64_t timeout_ms, pgclient **out)
{
    pgclient *c = calloc(1, sizeof *c);
    if (!c) return -1;
    c->base = base;
    c->timeout_ms = timeout_ms;
    c->ev_fd = -1;
    if (conninfo && *conninfo && (!(c->conninfo = strdup(conninfo)) || pg_params(c, conninfo) != 0))
        goto fail;
    c->ev = event_new(base, -1, 0, pg_on_event, c);
    c->deadline = evtimer_new(base, pg_on_deadline, c);
    c->kick = event_new(base, -1, 0, pg_on_kick, c);
    if (!c->ev || !c->deadline || !c->kick) goto fail;
    *out = c;
    return 0;
fail:
    pgclient_free(c);
    return -1;
}

void pgclient_fail_all(pgclient *c)
{
    if (!c) return;
    pg_close(c);
    pg_fail_queue(c);
}

void pgclient_free(pgclient *c)
{
    if (!c) return;
    free(c->conninfo);
    c->conninfo = NULL; /* callbacks that queue again are refused */
    if (c->ev) pgclient_fail_all(c);
    if (c->ev) event_free(c->ev);
    if (c->deadline) event_free(c->deadline);
    if (c->kick) event_free(c->kick);
    free(c->q);
    free(c->keys);
    free(c->vals);
    if (c->opts) PQconninfoFree(c->opts);
    free(c);
}

int pgclient_busy(const pgclient *c)
{
    return c ? c->qlen : 0;
}

int pgclient_query(pgclient *c, const char *sql, int nparams, const char *const *params, pg_cb cb,
                   void *arg)
{
    pg_op *op;
    if (!c->conninfo) return PGCLIENT_DISABLED;
    if (nparams < 0 || nparams > PGCLIENT_PARAMS_MAX) return PGCLIENT_UNAVAILABLE;
    for (int i = 0; i < nparams; i++)
        if (strlen(params[i]) >= PGCLIENT_PARAM_LEN) return PGCLIENT_UNAVAILABLE;
    if (c->qlen >= PGCLIENT_QUEUE_MAX) return PGCLIENT_FULL;
    if (!c->q && !(c->q = calloc(PGCLIENT_QUEUE_MAX, sizeof *c->q))) return PGCLIENT_UNAVAILABLE;
    /* Lazily (re)connect; nothing is queued while DOWN, so a failure here
     * concerns this query only. */
    if (c->st == PG_DOWN && pg_connect(c) != 0) return PGCLIENT_UNAVAILABLE;
    op = &c->q[(c->qhead + c->qlen) % PGCLIENT_QUEUE_MAX];
    memset(op, 0, sizeof *op);
    op->sql = sql;
    op->nparams = nparams;
    for (int i = 0; i < nparams; i++)
        strcpy(op->params[i], params[i]);
    op->cb = cb;
    op->arg = arg;
    c->qlen++;
    /* READY: send from the loop, so that a send failure (whose callbacks
     * run at once) never calls back from inside this function. */
    if (c->st == PG_READY) event_active(c->kick, EV_TIMEOUT, 0);
    return 0;
}
