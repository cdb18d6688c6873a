/* metrics.c: the gateway's /metrics text (metrics.h): every worker's block
 * summed at scrape time, then the process_* families. Names follow
 * Prometheus's conventions (a `_total` counter, base units). */
#include "gateway/metrics.h"

#include "gateway/worker.h"

#include "common/log.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef POINTGATE_VERSION
#define POINTGATE_VERSION "dev"
#endif

static const char *const gw_methods[GW_METHODS] = {"GET",   "HEAD",   "POST",    "PUT",
                                                   "PATCH", "DELETE", "OPTIONS", "other"};
static const char *const gw_outcomes[GW_OUTCOMES] = {
    "charged",      "released",         "refused",
    "unauthorized", "no_route",         "billing_unavailable",
    "bad_request",  "rate_limited",     "info",
    "cancelled",    "too_many_waiting", "quota_exceeded",
    "forbidden",    "replayed",         "idempotency_conflict",
    "error"};
static const char *const gw_idem_results[GW_IDEM_RESULTS] = {"replayed",
                                                             "in_flight",
                                                             "reused",
                                                             "not_kept",
                                                             "budget_exceeded",
                                                             "stored",
                                                             "stored_without_answer",
                                                             "cleared"};
static const char *const gw_classes[GW_METRICS_CLASSES] = {"other", "1xx", "2xx",
                                                           "3xx",   "4xx", "5xx"};

int gw_metrics_method(const char *method)
{
    for (int i = 0; i < GW_METHODS - 1; i++)
        if (strcmp(method, gw_methods[i]) == 0) return i;
    return GW_METHODS - 1;
}

const char *gw_metrics_outcome_name(enum gw_outcome o)
{
    return (unsigned)o < GW_OUTCOMES ? gw_outcomes[o] : "error";
}

int gw_metrics_route_slot(gw_metrics *m, const char *id)
{
    int n = atomic_load_explicit(&m->nroutes, memory_order_relaxed); /* the only writer */
    for (int i = 0; i < n; i++)
        if (strcmp(m->route_id[i], id) == 0) return i;
    if (n == GW_METRICS_ROUTES || strlen(id) > GW_METRICS_ROUTE_ID_MAX) return GW_SLOT_OTHER;
    memcpy(m->route_id[n], id, strlen(id) + 1);
    /* The name before the count: a scrape that sees the slot sees its name. */
    atomic_store_explicit(&m->nroutes, n + 1, memory_order_release);
    return n;
}

static int64_t gw_metrics_sum(const worker *w, int n, size_t off)
{
    int64_t t = 0;
    for (int i = 0; i < n; i++)
        t += metric_gauge_get((const metric_i64 *)((const char *)&w[i].m + off));
    return t;
}

/* For a figure every worker reads from the same place (pg:backlog): each
 * reading is at most a poll old; the largest is the cautious one to show. */
static int64_t gw_metrics_max(const worker *w, int n, size_t off)
{
    int64_t t = 0;
    for (int i = 0; i < n; i++) {
        int64_t v = metric_gauge_get((const metric_i64 *)((const char *)&w[i].m + off));
        if (v > t) t = v;
    }
    return t;
}

static uint64_t gw_metrics_count(const worker *w, int n, size_t off)
{
    uint64_t t = 0;
    for (int i = 0; i < n; i++)
        t += metric_get((const metric_u64 *)((const char *)&w[i].m + off));
    return t;
}

static void gw_metrics_gauge(promtext *p, const char *name, const char *help, int64_t v)
{
    promtext_family(p, name, "gauge", help);
    promtext_i64(p, name, NULL, v);
}

static void gw_metrics_counter(promtext *p, const char *name, const char *help, uint64_t v)
{
    promtext_family(p, name, "counter", help);
    promtext_u64(p, name, NULL, v);
}

static void gw_metrics_histogram(promtext *p, const worker *w, int n, size_t off, const char *name,
                                 const char *help)
{
    metric_hist_sum sum;
    memset(&sum, 0, sizeof sum);
    for (int i = 0; i < n; i++)
        metric_hist_merge(&sum, (const metric_hist *)((const char *)&w[i].m + off),
                          &metric_latency_us);
    promtext_family(p, name, "histogram", help);
    promtext_hist(p, name, NULL, &metric_latency_us, &sum);
}

/* One route label's counters, summed over the workers (the scrape's
 * scratch: too large for the ops thread's stack). */
typedef struct gw_route_sum {
    char label[2 * GW_METRICS_ROUTE_ID_MAX + 8]; /* escaped */
    uint64_t requests[GW_METHODS][GW_METRICS_CLASSES - 1][GW_OUTCOMES];
    uint64_t charged, released;
} gw_route_sum;

static void gw_metrics_add_route(gw_route_sum *s, const gw_route_metrics *r)
{
    for (int m = 0; m < GW_METHODS; m++)
        for (int c = 0; c < GW_METRICS_CLASSES - 1; c++)
            for (int o = 0; o < GW_OUTCOMES; o++)
                s->requests[m][c][o] += metric_get(&r->requests[m][c][o]);
    s->charged += metric_get(&r->charged);
    s->released += metric_get(&r->released);
}

/* Merges every worker's route slots by name into SUMS (GW_METRICS_SLOTS
 * of them: the named ones first, then _other, _none, _billing). Returns
 * how many are in use. */
static int gw_metrics_merge_routes(gw_route_sum *sums, const worker *w, int n)
{
    static const char *const fixed[3] = {"_other", "_none", "_billing"};
    int used = 0;
    for (int i = 0; i < n; i++) {
        const gw_metrics *m = &w[i].m;
        int named = atomic_load_explicit((_Atomic int *)&m->nroutes, memory_order_acquire);
        for (int s = 0; s < named; s++) {
            char esc[sizeof sums[0].label];
            int j;
            promtext_escape(esc, sizeof esc, m->route_id[s]);
            for (j = 0; j < used && strcmp(sums[j].label, esc) != 0; j++) {
            }
            if (j == used) memcpy(sums[used++].label, esc, sizeof esc);
            gw_metrics_add_route(&sums[j], &m->route[s]);
        }
    }
    /* Names are unique per worker and at most GW_METRICS_ROUTES per worker,
     * but workers may hold different ones (a reload between first uses):
     * the merged set is bounded by what fits; the rest counts as _other. */
    for (int f = 0; f < 3; f++) {
        gw_route_sum *s = &sums[used++];
        snprintf(s->label, sizeof s->label, "%s", fixed[f]);
        for (int i = 0; i < n; i++)
            gw_metrics_add_route(s, &w[i].m.route[GW_SLOT_OTHER + f]);
    }
    return used;
}

static void gw_metrics_routes(promtext *p, const worker *w, int n)
{
    /* Every worker may name GW_METRICS_ROUTES different ids. */
    size_t cap = (size_t)n * GW_METRICS_ROUTES + 3;
    gw_route_sum *sums = calloc(cap, sizeof *sums);
    char lab[sizeof sums[0].label + 128];
    int used;
    if (!sums) {
        p->oom = 1;
        return;
    }
    used = gw_metrics_merge_routes(sums, w, n);
    promtext_family(p, "pointgate_gateway_requests_total", "counter",
                    "Calls answered, by route, method, status class and billing outcome.");
    for (int r = 0; r < used; r++)
        for (int m = 0; m < GW_METHODS; m++)
            for (int c = 0; c < GW_METRICS_CLASSES - 1; c++)
                for (int o = 0; o < GW_OUTCOMES; o++) {
                    uint64_t v = sums[r].requests[m][c][o];
                    if (v == 0) continue; /* a series appears with its first call */
                    snprintf(lab, sizeof lab,
                             "route=\"%s\",method=\"%s\",status_class=\"%s\",outcome=\"%s\"",
                             sums[r].label, gw_methods[m], gw_classes[c + 1], gw_outcomes[o]);
                    promtext_u64(p, "pointgate_gateway_requests_total", lab, v);
                }
    promtext_family(p, "pointgate_gateway_points_charged_total", "counter",
                    "Points charged, by route (settles queued for Redis included).");
    for (int r = 0; r < used; r++)
        if (sums[r].charged || r < used - 3) {
            snprintf(lab, sizeof lab, "route=\"%s\"", sums[r].label);
            promtext_u64(p, "pointgate_gateway_points_charged_total", lab, sums[r].charged);
        }
    promtext_family(p, "pointgate_gateway_points_released_total", "counter",
                    "Points held for calls and given back (not charged), by route.");
    for (int r = 0; r < used; r++)
        if (sums[r].released || r < used - 3) {
            snprintf(lab, sizeof lab, "route=\"%s\"", sums[r].label);
            promtext_u64(p, "pointgate_gateway_points_released_total", lab, sums[r].released);
        }
    free(sums);
}

void gw_metrics_render(promtext *p, const worker *w, int n, int draining, int ready)
{
    uint64_t answers[GW_METRICS_CLASSES] = {0};
    int64_t redis_up = 1;
    char lab[64];

    for (int i = 0; i < n; i++) {
        for (int c = 0; c < GW_METRICS_CLASSES; c++)
            answers[c] += metric_get(&w[i].m.answers[c]);
        if (metric_gauge_get(&w[i].m.redis_ready) == 0) redis_up = 0;
    }
    promtext_family(p, "pointgate_build_info", "gauge", "The running program and its version.");
    promtext_i64(p, "pointgate_build_info", "program=\"gateway\",version=\"" POINTGATE_VERSION "\"",
                 1);
    gw_metrics_gauge(p, "pointgate_gateway_ready", "1 when /readyz answers 200.", ready);
    gw_metrics_gauge(p, "pointgate_gateway_draining",
                     "1 once a graceful stop began (SIGTERM): /readyz answers 503.", draining);
    gw_metrics_routes(p, w, n);
    promtext_family(p, "pointgate_gateway_responses_total", "counter",
                    "Answers to clients by status class, parse errors included.");
    for (int c = 1; c < GW_METRICS_CLASSES; c++) {
        snprintf(lab, sizeof lab, "status_class=\"%s\"", gw_classes[c]);
        promtext_u64(p, "pointgate_gateway_responses_total", lab, answers[c]);
    }
    gw_metrics_histogram(p, w, n, offsetof(gw_metrics, request_us),
                         "pointgate_gateway_request_duration_seconds",
                         "Calls from their head to their answer.");
    gw_metrics_histogram(p, w, n, offsetof(gw_metrics, upstream_us),
                         "pointgate_gateway_upstream_duration_seconds",
                         "Upstream calls, from their start to their answer or failure.");
    gw_metrics_histogram(p, w, n, offsetof(gw_metrics, wait_us),
                         "pointgate_gateway_hold_wait_seconds",
                         "Time calls waited for points held by calls in flight (calls that "
                         "waited).");
    gw_metrics_counter(p, "pointgate_gateway_client_connections_accepted_total",
                       "Client connections accepted.",
                       gw_metrics_count(w, n, offsetof(gw_metrics, accepted)));
    gw_metrics_gauge(p, "pointgate_gateway_client_connections", "Client connections open.",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, connections)));
    gw_metrics_counter(p, "pointgate_gateway_received_bytes_total",
                       "Bytes read from clients (heads and bodies).",
                       gw_metrics_count(w, n, offsetof(gw_metrics, received_bytes)));
    gw_metrics_counter(p, "pointgate_gateway_sent_bytes_total", "Bytes written to clients.",
                       gw_metrics_count(w, n, offsetof(gw_metrics, sent_bytes)));
    gw_metrics_gauge(p, "pointgate_gateway_calls_in_flight",
                     "Calls between their head and their answer.",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, inflight)));
    gw_metrics_gauge(p, "pointgate_gateway_waiting_calls",
                     "Calls waiting for points held by calls in flight.",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, waiting)));
    promtext_family(p, "pointgate_gateway_upstream_connections", "gauge",
                    "Upstream connections, carrying a call (active) or kept for reuse (idle).");
    promtext_i64(p, "pointgate_gateway_upstream_connections", "state=\"active\"",
                 gw_metrics_sum(w, n, offsetof(gw_metrics, up_active)));
    promtext_i64(p, "pointgate_gateway_upstream_connections", "state=\"idle\"",
                 gw_metrics_sum(w, n, offsetof(gw_metrics, up_idle)));
    gw_metrics_counter(p, "pointgate_gateway_upstream_connect_failures_total",
                       "Upstream connection attempts that failed (each address tried counts).",
                       gw_metrics_count(w, n, offsetof(gw_metrics, up_connect_fail)));
    gw_metrics_counter(p, "pointgate_gateway_upstream_timeouts_total",
                       "Upstream calls that passed their route's timeout (answered 504).",
                       gw_metrics_count(w, n, offsetof(gw_metrics, up_timeouts)));
    gw_metrics_gauge(p, "pointgate_gateway_redis_up",
                     "1 when every worker is connected to a Redis that holds its data.", redis_up);
    gw_metrics_counter(p, "pointgate_gateway_redis_round_trips_total",
                       "Redis replies received (a batch of reserves or settles is one).",
                       gw_metrics_count(w, n, offsetof(gw_metrics, redis_trips)));
    gw_metrics_counter(p, "pointgate_gateway_redis_errors_total",
                       "Redis error replies, and replies lost with a connection.",
                       gw_metrics_count(w, n, offsetof(gw_metrics, redis_errors)));
    gw_metrics_counter(p, "pointgate_gateway_redis_reconnects_total",
                       "Redis connections made after each worker's first.",
                       gw_metrics_count(w, n, offsetof(gw_metrics, redis_reconnects)));
    gw_metrics_gauge(p, "pointgate_gateway_redis_resend_queue",
                     "Settles answered and queued for resending to Redis, all workers.",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, resend_queue)));
    gw_metrics_gauge(p, "pointgate_gateway_leases", "Point leases the workers hold.",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, leases)));
    gw_metrics_gauge(p, "pointgate_gateway_leased_points",
                     "Points held in Redis by the workers' leases and not yet charged.",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, leased_points)));
    gw_metrics_gauge(p, "pointgate_gateway_refusing",
                     "Workers refusing new reserves (settlement backlog at OUTBOX_MAX_BACKLOG, "
                     "resend queue past half its bound, or settles spilled).",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, refusing)));
    gw_metrics_gauge(p, "pointgate_gateway_outbox_backlog_records",
                     "The settlement backlog (pg:backlog) as the workers last read it.",
                     gw_metrics_max(w, n, offsetof(gw_metrics, backlog)));
    gw_metrics_gauge(p, "pointgate_gateway_spill_refusing",
                     "Workers refusing reserves until their spilled settles are replayed.",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, spill_refusing)));
    promtext_family(p, "pointgate_gateway_idempotency_total", "counter",
                    "Calls with an Idempotency-Key by result: replayed, in_flight (409), reused "
                    "(422), not_kept (409), budget_exceeded (429), stored, "
                    "stored_without_answer (too large), cleared (not billable).");
    for (int i = 0; i < GW_IDEM_RESULTS; i++) {
        snprintf(lab, sizeof lab, "result=\"%s\"", gw_idem_results[i]);
        promtext_u64(
            p, "pointgate_gateway_idempotency_total", lab,
            gw_metrics_count(w, n, offsetof(gw_metrics, idem) + (size_t)i * sizeof(metric_u64)));
    }
    gw_metrics_counter(p, "pointgate_gateway_idempotency_stored_bytes_total",
                       "Bytes of answers (and markers) the workers sent to Redis to be kept for "
                       "replays (each lives IDEMPOTENCY_TTL).",
                       gw_metrics_count(w, n, offsetof(gw_metrics, idem_stored_bytes)));
    log_metrics(p);
    promtext_process(p);
}
