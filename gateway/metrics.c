/* metrics.c: the gateway's /metrics text (metrics.h): every worker's block
 * summed at scrape time, then the process_* families. Names follow
 * Prometheus's conventions (a `_total` counter, base units). */
#include "gateway/metrics.h"

#include "gateway/worker.h"

#include <stddef.h>
#include <stdio.h>

#ifndef POINTGATE_VERSION
#define POINTGATE_VERSION "dev"
#endif

static int64_t gw_metrics_sum(const worker *w, int n, size_t off)
{
    int64_t t = 0;
    for (int i = 0; i < n; i++)
        t += metric_gauge_get((const metric_i64 *)((const char *)&w[i].m + off));
    return t;
}

static void gw_metrics_gauge(promtext *p, const char *name, const char *help, int64_t v)
{
    promtext_family(p, name, "gauge", help);
    promtext_i64(p, name, NULL, v);
}

void gw_metrics_render(promtext *p, const worker *w, int n, int draining, int ready)
{
    static const char *classes[GW_METRICS_CLASSES] = {"other", "1xx", "2xx", "3xx", "4xx", "5xx"};
    uint64_t answers[GW_METRICS_CLASSES] = {0}, accepted = 0;
    int64_t redis_up = 1;

    for (int i = 0; i < n; i++) {
        for (int c = 0; c < GW_METRICS_CLASSES; c++)
            answers[c] += metric_get(&w[i].m.answers[c]);
        accepted += metric_get(&w[i].m.accepted);
        if (metric_gauge_get(&w[i].m.redis_ready) == 0) redis_up = 0;
    }
    promtext_family(p, "pointgate_build_info", "gauge", "The running program and its version.");
    promtext_i64(p, "pointgate_build_info", "program=\"gateway\",version=\"" POINTGATE_VERSION "\"",
                 1);
    gw_metrics_gauge(p, "pointgate_gateway_ready", "1 when /readyz answers 200.", ready);
    gw_metrics_gauge(p, "pointgate_gateway_draining",
                     "1 once a graceful stop began (SIGTERM): /readyz answers 503.", draining);
    promtext_family(p, "pointgate_gateway_responses_total", "counter",
                    "Answers to clients by status class, parse errors included.");
    for (int c = 1; c < GW_METRICS_CLASSES; c++) {
        char lab[32];
        snprintf(lab, sizeof lab, "status_class=\"%s\"", classes[c]);
        promtext_u64(p, "pointgate_gateway_responses_total", lab, answers[c]);
    }
    promtext_family(p, "pointgate_gateway_client_connections_accepted_total", "counter",
                    "Client connections accepted.");
    promtext_u64(p, "pointgate_gateway_client_connections_accepted_total", NULL, accepted);
    gw_metrics_gauge(p, "pointgate_gateway_client_connections", "Client connections open.",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, connections)));
    gw_metrics_gauge(p, "pointgate_gateway_calls_in_flight",
                     "Calls between their head and their answer (at most 1 s old).",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, inflight)));
    gw_metrics_gauge(p, "pointgate_gateway_redis_up",
                     "1 when every worker is connected to a Redis that holds its data.", redis_up);
    gw_metrics_gauge(p, "pointgate_gateway_redis_resend_queue",
                     "Settles answered and queued for resending to Redis, all workers.",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, resend_queue)));
    gw_metrics_gauge(p, "pointgate_gateway_spill_refusing",
                     "Workers refusing reserves until their spilled settles are replayed.",
                     gw_metrics_sum(w, n, offsetof(gw_metrics, spill_refusing)));
    promtext_process(p);
}
