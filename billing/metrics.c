/* metrics.c: billing's metric registry and its exposition (metrics.h).
 * Owns the names and labels of pointgate_billing_*; the values are written
 * by the modules that do the work, the probe gauges by ops.c. */
#include "billing/metrics.h"

#include "common/log.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#ifndef POINTGATE_VERSION
#define POINTGATE_VERSION "dev"
#endif

const metric_hist_spec bm_batch_records = {
    10,
    {1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000},
    1,
};

static const char *const bm_outcome_names[BM_OUTCOMES] = {"commit", "release", "expire", "late"};
static const char *const bm_repair_names[BM_REPAIRS] = {"ok", "error", "lost"};
static const char *const bm_endpoint_names[BM_EP_N] = {
    "/healthz",
    "/v1/accounts",
    "/v1/accounts/{id}",
    "/v1/accounts/{id}/keys",
    "/v1/accounts/{id}/topups",
    "/v1/accounts/{id}/adjustments",
    "/v1/accounts/{id}/ledger",
    "/v1/reports/usage",
    "/v1/reports/statement",
    "/v1/accounts/{id}/limits",
    "/v1/keys/{id}",
    "/v1/keys/{id}/limits",
    "/v1/keys/{id}/rotate",
    "/v1/status",
    "/v1/accounts/{id}/webhooks",
    "/v1/accounts/{id}/alerts",
    "/v1/webhooks/{id}",
    "/v1/webhooks/{id}/deliveries",
    "/v1/events/{id}/replay",
    "other",
};

int64_t bm_mono_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int64_t bm_mono_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

void bm_beat(billing_metrics *m, int slot)
{
    if (!m || slot < 0 || slot >= BM_BEATS) return;
    metric_set(&m->beat_ms[slot], bm_mono_ms());
}

void bm_beat_name(int slot, char *out, size_t cap)
{
    if (slot == BM_BEAT_CREDITSYNC)
        snprintf(out, cap, "creditsync");
    else if (slot == BM_BEAT_SWEEPER)
        snprintf(out, cap, "sweeper");
    else if (slot == BM_BEAT_WEBHOOKS)
        snprintf(out, cap, "webhooks");
    else if (slot == BM_BEAT_ARCHIVE)
        snprintf(out, cap, "archive");
    else
        snprintf(out, cap, "settlement %d", slot - BM_BEAT_SETTLE0);
}

void bm_settled(billing_metrics *m, const char *outcome)
{
    if (!m) return;
    for (int i = 0; i < BM_OUTCOMES; i++)
        if (strcmp(outcome, bm_outcome_names[i]) == 0) {
            metric_add_shared(&m->settled[i], 1);
            return;
        }
}

void bm_batch(billing_metrics *m, int records, int64_t duration_us)
{
    if (!m) return;
    metric_observe_shared(&m->batch_records, &bm_batch_records, records);
    metric_observe_shared(&m->batch_duration, &metric_latency_us, duration_us);
}

void bm_dead_letter(billing_metrics *m)
{
    if (m) metric_add_shared(&m->dead_letters_total, 1);
}

void bm_sweeper_release(billing_metrics *m, int64_t points)
{
    if (!m) return;
    metric_add_shared(&m->sweeper_releases, 1);
    if (points > 0) metric_add_shared(&m->sweeper_points, (uint64_t)points);
}

void bm_repair(billing_metrics *m, int result, int64_t duration_us, long fixes)
{
    if (!m || result < 0 || result >= BM_REPAIRS) return;
    metric_add_shared(&m->repair_passes[result], 1);
    metric_observe_shared(&m->repair_duration, &metric_latency_us, duration_us);
    if (fixes > 0) metric_add_shared(&m->repair_fixes, (uint64_t)fixes);
}

void bm_api(billing_metrics *m, int endpoint, int code)
{
    if (!m || endpoint < 0 || endpoint >= BM_EP_N || code < 100 || code >= 100 + BM_CODES) return;
    metric_add_shared(&m->api[endpoint][code - 100], 1);
}

void bm_credit(billing_metrics *m, const char *kind, int64_t amount)
{
    if (!m) return;
    if (strcmp(kind, "topup") == 0) {
        metric_add_shared(&m->topups, 1);
        metric_add_shared(&m->topup_points, (uint64_t)(amount > 0 ? amount : -amount));
    } else {
        int d = amount < 0;
        metric_add_shared(&m->adjustments[d], 1);
        metric_add_shared(&m->adjustment_points[d], (uint64_t)(amount > 0 ? amount : -amount));
    }
}

void bm_webhook_attempt(billing_metrics *m, int result, int64_t duration_us)
{
    if (!m || result < 0 || result >= BM_WH_RESULTS) return;
    metric_add_shared(&m->webhook_attempts[result], 1);
    metric_observe_shared(&m->webhook_attempt_duration, &metric_latency_us, duration_us);
}

/* One path segment: [P, P+N) equals LIT. */
static int bm_seg(const char *p, size_t n, const char *lit)
{
    return strlen(lit) == n && memcmp(p, lit, n) == 0;
}

/* 1 if [P, P+N) is a decimal id (what api.c accepts: 1..18 digits). */
static int bm_id(const char *p, size_t n)
{
    if (n == 0 || n > 18) return 0;
    for (size_t i = 0; i < n; i++)
        if (p[i] < '0' || p[i] > '9') return 0;
    return 1;
}

int bm_endpoint_of(const char *url)
{
    const char *seg[5];
    size_t len[5];
    int n = 0;
    if (!url) return BM_EP_OTHER;
    if (strcmp(url, "/healthz") == 0) return BM_EP_HEALTHZ;
    for (const char *p = url; *p;) {
        const char *q;
        if (*p != '/' || n == 5) return BM_EP_OTHER;
        p++;
        q = strchr(p, '/');
        seg[n] = p;
        len[n] = q ? (size_t)(q - p) : strlen(p);
        p += len[n];
        n++;
    }
    if (n < 2 || !bm_seg(seg[0], len[0], "v1")) return BM_EP_OTHER;
    if (n == 2 && bm_seg(seg[1], len[1], "accounts")) return BM_EP_ACCOUNTS;
    if (n == 2 && bm_seg(seg[1], len[1], "status")) return BM_EP_STATUS;
    if (bm_seg(seg[1], len[1], "accounts") && bm_id(seg[2], len[2])) {
        if (n == 3) return BM_EP_ACCOUNT;
        if (n == 4 && bm_seg(seg[3], len[3], "keys")) return BM_EP_ACCOUNT_KEYS;
        if (n == 4 && bm_seg(seg[3], len[3], "topups")) return BM_EP_ACCOUNT_TOPUPS;
        if (n == 4 && bm_seg(seg[3], len[3], "adjustments")) return BM_EP_ACCOUNT_ADJUSTMENTS;
        if (n == 4 && bm_seg(seg[3], len[3], "ledger")) return BM_EP_ACCOUNT_LEDGER;
        if (n == 4 && bm_seg(seg[3], len[3], "limits")) return BM_EP_ACCOUNT_LIMITS;
        if (n == 4 && bm_seg(seg[3], len[3], "webhooks")) return BM_EP_ACCOUNT_WEBHOOKS;
        if (n == 4 && bm_seg(seg[3], len[3], "alerts")) return BM_EP_ACCOUNT_ALERTS;
        return BM_EP_OTHER;
    }
    if (n == 3 && bm_seg(seg[1], len[1], "reports")) {
        if (bm_seg(seg[2], len[2], "usage")) return BM_EP_REPORT_USAGE;
        if (bm_seg(seg[2], len[2], "statement")) return BM_EP_REPORT_STATEMENT;
    }
    if (n == 3 && bm_seg(seg[1], len[1], "keys") && bm_id(seg[2], len[2])) return BM_EP_KEY;
    if (n == 4 && bm_seg(seg[1], len[1], "keys") && bm_id(seg[2], len[2]) &&
        bm_seg(seg[3], len[3], "limits"))
        return BM_EP_KEY_LIMITS;
    if (n == 4 && bm_seg(seg[1], len[1], "keys") && bm_id(seg[2], len[2]) &&
        bm_seg(seg[3], len[3], "rotate"))
        return BM_EP_KEY_ROTATE;
    if (bm_seg(seg[1], len[1], "webhooks") && n >= 3 && bm_id(seg[2], len[2])) {
        if (n == 3) return BM_EP_WEBHOOK;
        if (n == 4 && bm_seg(seg[3], len[3], "deliveries")) return BM_EP_WEBHOOK_DELIVERIES;
    }
    /* An event id is a uuid: any segment of its length stands for it. */
    if (n == 4 && bm_seg(seg[1], len[1], "events") && len[2] == 36 &&
        bm_seg(seg[3], len[3], "replay"))
        return BM_EP_EVENT_REPLAY;
    return BM_EP_OTHER;
}

static void bm_counter(promtext *p, const char *name, const char *help, const metric_u64 *c)
{
    promtext_family(p, name, "counter", help);
    promtext_u64(p, name, NULL, metric_get(c));
}

static void bm_gauge(promtext *p, const char *name, const char *help, int64_t v)
{
    promtext_family(p, name, "gauge", help);
    promtext_i64(p, name, NULL, v);
}

static void bm_histogram(promtext *p, const char *name, const char *help, const metric_hist *h,
                         const metric_hist_spec *s)
{
    metric_hist_sum sum;
    memset(&sum, 0, sizeof sum);
    metric_hist_merge(&sum, h, s);
    promtext_family(p, name, "histogram", help);
    promtext_hist(p, name, NULL, s, &sum);
}

void bm_render(billing_metrics *m, promtext *p, int ready)
{
    char lab[160];
    static const char *const dirs[2] = {"credit", "debit"};

    promtext_family(p, "pointgate_billing_settled_records_total", "counter",
                    "Outbox records applied to Postgres, by outcome.");
    for (int i = 0; i < BM_OUTCOMES; i++) {
        snprintf(lab, sizeof lab, "outcome=\"%s\"", bm_outcome_names[i]);
        promtext_u64(p, "pointgate_billing_settled_records_total", lab, metric_get(&m->settled[i]));
    }
    bm_histogram(p, "pointgate_billing_settle_batch_records", "Records per settlement transaction.",
                 &m->batch_records, &bm_batch_records);
    bm_histogram(p, "pointgate_billing_settle_batch_duration_seconds",
                 "Time to apply one settlement transaction to Postgres.", &m->batch_duration,
                 &metric_latency_us);
    bm_gauge(p, "pointgate_billing_outbox_backlog_records",
             "Outbox records not yet in Postgres (pg:backlog).", metric_gauge_get(&m->backlog));
    promtext_family(p, "pointgate_billing_outbox_oldest_age_seconds", "gauge",
                    "Age of the oldest outbox entry not yet acknowledged: the settlement lag.");
    promtext_double(p, "pointgate_billing_outbox_oldest_age_seconds", NULL,
                    (double)metric_gauge_get(&m->oldest_age_ms) / 1000.0);
    bm_gauge(p, "pointgate_billing_dead_letters", "Entries in pg:outbox:dead.",
             metric_gauge_get(&m->dead_letters));
    bm_counter(p, "pointgate_billing_dead_letters_total",
               "Calls or entries moved to pg:outbox:dead by this process.", &m->dead_letters_total);
    bm_counter(p, "pointgate_billing_sweeper_releases_total",
               "Holds released at cost 0 past their deadline.", &m->sweeper_releases);
    bm_counter(p, "pointgate_billing_sweeper_released_points_total",
               "Points of the holds the sweeper released.", &m->sweeper_points);
    promtext_family(p, "pointgate_billing_repair_passes_total", "counter",
                    "Credit-sync repair passes, by result.");
    for (int i = 0; i < BM_REPAIRS; i++) {
        snprintf(lab, sizeof lab, "result=\"%s\"", bm_repair_names[i]);
        promtext_u64(p, "pointgate_billing_repair_passes_total", lab,
                     metric_get(&m->repair_passes[i]));
    }
    bm_histogram(p, "pointgate_billing_repair_pass_duration_seconds", "Duration of a repair pass.",
                 &m->repair_duration, &metric_latency_us);
    bm_counter(p, "pointgate_billing_repair_fixes_total",
               "Pushes of a repair pass that changed Redis (it was behind Postgres).",
               &m->repair_fixes);
    promtext_family(p, "pointgate_billing_api_requests_total", "counter",
                    "Admin and finance API requests, by endpoint template and status code.");
    for (int e = 0; e < BM_EP_N; e++)
        for (int c = 0; c < BM_CODES; c++) {
            uint64_t v = metric_get(&m->api[e][c]);
            if (!v) continue;
            snprintf(lab, sizeof lab, "endpoint=\"%s\",code=\"%d\"", bm_endpoint_names[e], c + 100);
            promtext_u64(p, "pointgate_billing_api_requests_total", lab, v);
        }
    bm_counter(p, "pointgate_billing_topups_total", "Top-ups made.", &m->topups);
    bm_counter(p, "pointgate_billing_topup_points_total", "Points credited by top-ups.",
               &m->topup_points);
    promtext_family(p, "pointgate_billing_adjustments_total", "counter",
                    "Adjustments made, by direction.");
    for (int d = 0; d < 2; d++) {
        snprintf(lab, sizeof lab, "direction=\"%s\"", dirs[d]);
        promtext_u64(p, "pointgate_billing_adjustments_total", lab, metric_get(&m->adjustments[d]));
    }
    promtext_family(p, "pointgate_billing_adjustment_points_total", "counter",
                    "Points moved by adjustments (absolute), by direction.");
    for (int d = 0; d < 2; d++) {
        snprintf(lab, sizeof lab, "direction=\"%s\"", dirs[d]);
        promtext_u64(p, "pointgate_billing_adjustment_points_total", lab,
                     metric_get(&m->adjustment_points[d]));
    }
    {
        static const char *const types[BM_WEBHOOK_TYPES] = {"balance.low", "balance.exhausted",
                                                            "topup.created", "adjustment.created",
                                                            "key.revoked"};
        static const char *const results[BM_WH_RESULTS] = {"delivered", "retry", "failed"};
        promtext_family(p, "pointgate_billing_webhook_events_total", "counter",
                        "Webhook events written to the outbox, by type.");
        for (int i = 0; i < BM_WEBHOOK_TYPES; i++) {
            snprintf(lab, sizeof lab, "type=\"%s\"", types[i]);
            promtext_u64(p, "pointgate_billing_webhook_events_total", lab,
                         metric_get(&m->webhook_events[i]));
        }
        promtext_family(p, "pointgate_billing_webhook_attempts_total", "counter",
                        "Webhook delivery attempts, by result (retry: failed and scheduled "
                        "again; failed: given up after the retry horizon).");
        for (int i = 0; i < BM_WH_RESULTS; i++) {
            snprintf(lab, sizeof lab, "result=\"%s\"", results[i]);
            promtext_u64(p, "pointgate_billing_webhook_attempts_total", lab,
                         metric_get(&m->webhook_attempts[i]));
        }
        bm_histogram(p, "pointgate_billing_webhook_attempt_duration_seconds",
                     "Duration of one webhook delivery attempt.", &m->webhook_attempt_duration,
                     &metric_latency_us);
        bm_gauge(p, "pointgate_billing_webhook_pending_deliveries",
                 "Webhook deliveries not yet delivered nor given up.",
                 metric_gauge_get(&m->webhook_pending));
        promtext_family(p, "pointgate_billing_webhook_oldest_pending_age_seconds", "gauge",
                        "Age of the oldest pending webhook delivery (since it was scheduled).");
        promtext_double(p, "pointgate_billing_webhook_oldest_pending_age_seconds", NULL,
                        (double)metric_gauge_get(&m->webhook_oldest_ms) / 1000.0);
        bm_gauge(p, "pointgate_billing_webhook_in_flight", "Webhook attempts in flight.",
                 metric_gauge_get(&m->webhook_in_flight));
    }
    bm_gauge(p, "pointgate_billing_charge_partitions_ahead",
             "Daily charges partitions made past today (-1: no archive pass yet).",
             metric_gauge_get(&m->charge_days_ahead));
    bm_gauge(p, "pointgate_billing_charge_partitions_detached",
             "Days taken out of charges and not yet exported to ARCHIVE_DIR.",
             metric_gauge_get(&m->charge_detached));
    bm_gauge(p, "pointgate_billing_postgres_up", "1 when Postgres answered the last probe.",
             metric_gauge_get(&m->postgres_up));
    bm_gauge(p, "pointgate_billing_redis_up", "1 when Redis answered the last probe.",
             metric_gauge_get(&m->redis_up));
    bm_gauge(p, "pointgate_billing_ready", "1 when /readyz answers 200.", ready);
    log_metrics(p);
    promtext_family(p, "pointgate_build_info", "gauge", "The program and its version.");
    {
        char ver[64], l2[128];
        promtext_escape(ver, sizeof ver, POINTGATE_VERSION);
        snprintf(l2, sizeof l2, "program=\"billing\",version=\"%s\"", ver);
        promtext_i64(p, "pointgate_build_info", l2, 1);
    }
    promtext_process(p);
}
