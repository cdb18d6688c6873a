/* ops.c: billing serve's ops listener and store probe (see ops.h).
 *
 * The probe runs on its own thread, once a second, on its own Postgres and
 * Redis connections with short timeouts (connect_timeout=1 and a 1 s poll
 * for the query; hiredis connect and command timeouts of 1 s), so a store
 * that hangs delays nothing but the probe: never a settlement worker, never
 * an answer of this listener, which only reads what the last probe found.
 * Scrapes therefore see outbox figures (backlog, oldest age, dead letters)
 * at most about a second old: the price of never making a scrape or a
 * readiness check wait on a slow Redis.
 *
 * The oldest age is the first entry of pg:outbox (XRANGE - + COUNT 1)
 * against Redis's own clock (TIME), from the entry id's milliseconds, which
 * Redis stamps with that clock on XADD: settlement deletes entries as it
 * acknowledges them (outbox_ack.lua), so the first entry is the oldest not
 * yet in Postgres, pending (read or claimed by a worker) or not: both are
 * lag, and a claimed entry that never commits must show as growing lag. */
#include "billing/ops.h"

#include "billing/hot.h"
#include "common/hotkeys.h"
#include "common/log.h"
#include "billing/workers.h"

#include <arpa/inet.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <microhttpd.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define OPS_PROBE_MS 1000

struct ops_server {
    const billing_config *cfg;
    billing_metrics *m;
    struct MHD_Daemon *d;
    pthread_t probe;
    int probe_started;
    atomic_int stop;
    /* The probe thread's own connections. */
    PGconn *pg;
    hot_conn *hot; /* hot.c's client, with 1 s timeouts */
};

/* ---- the probe ---------------------------------------------------------- */

/* SELECT 1 on the probe's own session, waiting at most about a second. */
static int ops_probe_pg(ops_server *s)
{
    const char *keys[3] = {"dbname", "connect_timeout", NULL};
    const char *vals[3] = {s->cfg->database_url, "1", NULL};
    PGresult *r;
    int ok = 0;
    if (s->pg && PQstatus(s->pg) != CONNECTION_OK) {
        PQfinish(s->pg);
        s->pg = NULL;
    }
    if (!s->pg) {
        s->pg = PQconnectdbParams(keys, vals, 1);
        if (PQstatus(s->pg) != CONNECTION_OK) goto fail;
    }
    if (!PQsendQuery(s->pg, "SELECT 1")) goto fail;
    for (int64_t deadline = bm_mono_ms() + 1000; PQisBusy(s->pg);) {
        struct pollfd pfd = {PQsocket(s->pg), POLLIN, 0};
        int64_t left = deadline - bm_mono_ms();
        if (left <= 0 || poll(&pfd, 1, (int)left) <= 0) goto fail;
        if (!PQconsumeInput(s->pg)) goto fail;
    }
    while ((r = PQgetResult(s->pg)) != NULL) {
        if (PQresultStatus(r) == PGRES_TUPLES_OK) ok = 1;
        PQclear(r);
    }
    if (ok) return 0;
fail:
    if (s->pg) PQfinish(s->pg);
    s->pg = NULL;
    return -1;
}

/* The Redis figures: reachable, pg:backlog, the oldest entry's age (ms), XLEN
 * of the dead letters. -1 when Redis did not answer. */
static int ops_probe_redis(ops_server *s, int64_t *backlog, int64_t *age_ms, int64_t *dead)
{
    const char *time_argv[1] = {"TIME"};
    const char *bl_argv[2] = {"GET", HOT_BACKLOG};
    const char *first_argv[6] = {"XRANGE", HOT_OUTBOX, "-", "+", "COUNT", "1"};
    const char *dead_argv[2] = {"XLEN", HOT_OUTBOX ":dead"};
    redisReply *r;
    int64_t now = 0;
    *backlog = *age_ms = *dead = 0;
    r = hot_command_argv(s->hot, 1, time_argv, NULL);
    if (!r) return -1;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
        freeReplyObject(r);
        return -1; /* LOADING and the like: not ready */
    }
    now =
        strtoll(r->element[0]->str, NULL, 10) * 1000 + strtoll(r->element[1]->str, NULL, 10) / 1000;
    freeReplyObject(r);
    if (!(r = hot_command_argv(s->hot, 2, bl_argv, NULL))) return -1;
    if (r->type == REDIS_REPLY_STRING) *backlog = strtoll(r->str, NULL, 10);
    freeReplyObject(r);
    if (!(r = hot_command_argv(s->hot, 6, first_argv, NULL))) return -1;
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 1 &&
        r->element[0]->type == REDIS_REPLY_ARRAY && r->element[0]->elements >= 1 &&
        r->element[0]->element[0]->type == REDIS_REPLY_STRING) {
        int64_t id_ms = strtoll(r->element[0]->element[0]->str, NULL, 10);
        *age_ms = now > id_ms ? now - id_ms : 0;
    }
    freeReplyObject(r);
    if (!(r = hot_command_argv(s->hot, 2, dead_argv, NULL))) return -1;
    if (r->type == REDIS_REPLY_INTEGER) *dead = r->integer;
    freeReplyObject(r);
    return 0;
}

static void *ops_probe_run(void *arg)
{
    ops_server *s = arg;
    while (!atomic_load(&s->stop)) {
        int64_t backlog, age, dead;
        int pg = ops_probe_pg(s) == 0;
        int red = ops_probe_redis(s, &backlog, &age, &dead) == 0;
        metric_set(&s->m->postgres_up, pg);
        metric_set(&s->m->redis_up, red);
        if (red) {
            metric_set(&s->m->backlog, backlog);
            metric_set(&s->m->oldest_age_ms, age);
            metric_set(&s->m->dead_letters, dead);
        }
        worker_sleep(&s->stop, OPS_PROBE_MS);
    }
    if (s->pg) PQfinish(s->pg);
    s->pg = NULL;
    return NULL;
}

/* ---- the listener ------------------------------------------------------- */

/* The /readyz verdict; REASONS (may be NULL) gets why not. */
static int ops_ready(ops_server *s, json_t *reasons)
{
    int ready = 1;
    if (metric_gauge_get(&s->m->draining)) {
        ready = 0;
        if (reasons) json_array_append_new(reasons, json_string("draining"));
    }
    if (!metric_gauge_get(&s->m->postgres_up)) {
        ready = 0;
        if (reasons) json_array_append_new(reasons, json_string("postgres"));
    }
    if (!metric_gauge_get(&s->m->redis_up)) {
        ready = 0;
        if (reasons) json_array_append_new(reasons, json_string("redis"));
    }
    return ready;
}

static enum MHD_Result ops_send(struct MHD_Connection *conn, int status, char *body,
                                const char *ctype)
{
    struct MHD_Response *resp;
    enum MHD_Result ret;
    if (!body) {
        status = 500;
        body = strdup("{\"error\":\"internal\"}");
        ctype = "application/json";
        if (!body) return MHD_NO;
    }
    resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", ctype);
    MHD_add_response_header(resp, "Cache-Control", "no-store");
    ret = MHD_queue_response(conn, (unsigned)status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result ops_json(struct MHD_Connection *conn, int status, json_t *j)
{
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    return ops_send(conn, status, text, "application/json");
}

static enum MHD_Result ops_healthz(ops_server *s, struct MHD_Connection *conn)
{
    json_t *stalled = json_array();
    int64_t now = bm_mono_ms();
    char name[32];
    if (!stalled) return MHD_NO;
    for (int i = 0; i < BM_BEATS; i++) {
        if (!s->m->beat_used[i] || now - metric_gauge_get(&s->m->beat_ms[i]) <= OPS_STALL_MS)
            continue;
        bm_beat_name(i, name, sizeof name);
        json_array_append_new(stalled, json_string(name));
    }
    if (json_array_size(stalled) == 0) {
        json_decref(stalled);
        return ops_json(conn, 200, json_pack("{s:s}", "status", "ok"));
    }
    return ops_json(conn, 503, json_pack("{s:s, s:o}", "status", "stalled", "stalled", stalled));
}

static enum MHD_Result ops_readyz(ops_server *s, struct MHD_Connection *conn)
{
    json_t *reasons = json_array();
    if (!reasons) return MHD_NO;
    if (ops_ready(s, reasons)) {
        json_decref(reasons);
        return ops_json(conn, 200, json_pack("{s:s}", "status", "ready"));
    }
    return ops_json(conn, 503, json_pack("{s:s, s:o}", "status", "not_ready", "reasons", reasons));
}

static enum MHD_Result ops_metrics(ops_server *s, struct MHD_Connection *conn)
{
    promtext p;
    promtext_init(&p);
    bm_render(s->m, &p, ops_ready(s, NULL));
    if (promtext_done(&p) != 0 || !p.b.p) {
        promtext_free(&p);
        return ops_send(conn, 500, NULL, NULL);
    }
    /* The buffer goes to MHD, which frees it. */
    return ops_send(conn, 200, p.b.p, "text/plain; version=0.0.4; charset=utf-8");
}

static enum MHD_Result ops_handler(void *cls, struct MHD_Connection *conn, const char *url,
                                   const char *method, const char *version, const char *upload_data,
                                   size_t *upload_size, void **con_cls)
{
    ops_server *s = cls;
    /* The first call only announces the request; any body is ignored. */
    if (!*con_cls) {
        *con_cls = s;
        return MHD_YES;
    }
    if (*upload_size > 0) {
        *upload_size = 0;
        return MHD_YES;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return ops_json(
            conn, 405,
            json_pack("{s:s, s:s}", "error", "method_not_allowed", "message", "use GET"));
    if (strcmp(url, "/metrics") == 0) return ops_metrics(s, conn);
    if (strcmp(url, "/healthz") == 0) return ops_healthz(s, conn);
    if (strcmp(url, "/readyz") == 0) return ops_readyz(s, conn);
    return ops_json(conn, 404,
                    json_pack("{s:s, s:s}", "error", "not_found", "message", "no such endpoint"));
}

ops_server *ops_start(const billing_config *cfg, billing_metrics *m)
{
    ops_server *s = calloc(1, sizeof *s);
    struct sockaddr_in addr;
    if (!s) return NULL;
    s->cfg = cfg;
    s->m = m;
    s->hot = hot_open(cfg->redis_url); /* config_load checked the URL already */
    if (!s->hot) goto fail;
    hot_set_timeout(s->hot, 1000);
    if (config_sockaddr("BILLING_OPS_LISTEN", cfg->ops_host, cfg->ops_port, &addr) != 0) goto fail;
    if (pthread_create(&s->probe, NULL, ops_probe_run, s) != 0) {
        log_error("ops: cannot start the probe thread");
        goto fail;
    }
    s->probe_started = 1;
    /* One thread: every answer is a read of atomics (and a text render). */
    s->d =
        MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL, 0, NULL, NULL,
                         ops_handler, s, MHD_OPTION_SOCK_ADDR, &addr, MHD_OPTION_CONNECTION_TIMEOUT,
                         10u, MHD_OPTION_CONNECTION_LIMIT, 64u, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
                         (size_t)(64 * 1024), MHD_OPTION_END);
    if (!s->d) {
        log_error("ops: cannot listen on %s:%d", cfg->ops_host, cfg->ops_port);
        goto fail;
    }
    log_info("ops listener (/metrics, /healthz, /readyz) on %s:%d", cfg->ops_host, cfg->ops_port);
    return s;
fail:
    ops_stop(s);
    return NULL;
}

void ops_drain(ops_server *s)
{
    if (s) metric_set(&s->m->draining, 1);
}

void ops_stop(ops_server *s)
{
    if (!s) return;
    if (s->d) MHD_stop_daemon(s->d);
    atomic_store(&s->stop, 1);
    if (s->probe_started) pthread_join(s->probe, NULL);
    hot_close(s->hot);
    free(s);
}
