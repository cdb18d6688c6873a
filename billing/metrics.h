/* metrics.h: billing serve's metric registry: every counter, gauge and
 * histogram billing exports, in one struct that `billing serve` owns and
 * hands to the threads that write it (workers, API pool, ops probe), and
 * its Prometheus text (names in docs/ARCHITECTURE.md "Operations").
 * Owns the names, labels and buckets; does not own the primitives or the
 * text format (common/metrics.h) nor the HTTP listener (ops.c).
 *
 * Why one shared struct and metric_add_shared, not per-thread blocks as in
 * the gateway: billing's writers are a handful of threads (settlement
 * workers, the API pool, sweeper, credit sync) that each do a Postgres round
 * trip per counted event, so a relaxed fetch_add costs nothing measurable,
 * and one block keeps the scrape a plain read. A NULL registry (the CLI,
 * which nobody scrapes) counts nothing: every writer below checks. */
#ifndef POINTGATE_BILLING_METRICS_H
#define POINTGATE_BILLING_METRICS_H

#include "common/metrics.h"

#include <stdint.h>

/* Endpoint templates of the admin API: never the raw path (bounded labels). */
enum bm_endpoint {
    BM_EP_HEALTHZ,
    BM_EP_ACCOUNTS,
    BM_EP_ACCOUNT,
    BM_EP_ACCOUNT_KEYS,
    BM_EP_ACCOUNT_TOPUPS,
    BM_EP_ACCOUNT_ADJUSTMENTS,
    BM_EP_ACCOUNT_LEDGER,
    BM_EP_REPORT_USAGE,
    BM_EP_REPORT_STATEMENT,
    BM_EP_ACCOUNT_LIMITS,
    BM_EP_KEY,
    BM_EP_KEY_LIMITS,
    BM_EP_KEY_ROTATE,
    BM_EP_STATUS,
    BM_EP_ACCOUNT_WEBHOOKS,
    BM_EP_ACCOUNT_ALERTS,
    BM_EP_WEBHOOK,
    BM_EP_WEBHOOK_DELIVERIES,
    BM_EP_EVENT_REPLAY,
    BM_EP_OTHER,
    BM_EP_N
};

enum bm_outcome { BM_COMMIT, BM_RELEASE, BM_EXPIRE, BM_LATE, BM_OUTCOMES };
enum bm_repair { BM_REPAIR_OK, BM_REPAIR_ERROR, BM_REPAIR_LOST, BM_REPAIRS };
/* Webhook event types (webhooks.c's order) and delivery attempt results:
 * delivered (a 2xx), retry (failed, scheduled again), failed (given up). */
#define BM_WEBHOOK_TYPES 5
enum bm_webhook_result { BM_WH_DELIVERED, BM_WH_RETRY, BM_WH_FAILED, BM_WH_RESULTS };

/* Heartbeat slots: creditsync, sweeper, then settlement workers 0..15
 * (SETTLE_WORKERS is at most 16, config.c), then the webhook thread, then
 * the archive thread. */
#define BM_BEAT_CREDITSYNC 0
#define BM_BEAT_SWEEPER 1
#define BM_BEAT_SETTLE0 2
#define BM_BEAT_WEBHOOKS 18
#define BM_BEAT_ARCHIVE 19
#define BM_BEATS 20

/* HTTP status codes 100..599 are counted one slot each. */
#define BM_CODES 500

typedef struct billing_metrics {
    metric_u64 settled[BM_OUTCOMES];
    metric_hist batch_records;  /* bm_batch_records spec */
    metric_hist batch_duration; /* metric_latency_us */
    metric_u64 dead_letters_total;
    metric_u64 sweeper_releases, sweeper_points;
    metric_u64 repair_passes[BM_REPAIRS];
    metric_hist repair_duration; /* metric_latency_us */
    metric_u64 repair_fixes;
    metric_u64 api[BM_EP_N][BM_CODES];
    metric_u64 topups, topup_points;
    metric_u64 adjustments[2], adjustment_points[2]; /* [0] credit, [1] debit */
    /* Webhooks: events written (webhooks.c, alerts.c), attempts by result
     * and their duration, and the delivery thread's gauges (whdeliver.c,
     * read from Postgres once a second). */
    metric_u64 webhook_events[BM_WEBHOOK_TYPES];
    metric_u64 webhook_attempts[BM_WH_RESULTS];
    metric_hist webhook_attempt_duration; /* metric_latency_us */
    metric_i64 webhook_pending, webhook_oldest_ms, webhook_in_flight;
    /* The charges table (archive.c, after each pass): days of partitions
     * made beyond today (-1: not known yet), days detached not exported. */
    metric_i64 charge_days_ahead, charge_detached;
    /* Written by the ops probe (ops.c) once a second; read by scrapes. */
    metric_i64 postgres_up, redis_up;
    metric_i64 backlog, oldest_age_ms, dead_letters;
    metric_i64 draining;
    /* Monotonic ms of each worker's last loop turn; 0: never turned (or
     * the slot is unused: beat_used). */
    metric_i64 beat_ms[BM_BEATS];
    int beat_used[BM_BEATS]; /* set before the threads start; read-only after */
} billing_metrics;

extern const metric_hist_spec bm_batch_records;

/* CLOCK_MONOTONIC in ms (heartbeats, durations). */
int64_t bm_mono_ms(void);
int64_t bm_mono_us(void);

/* Stamps worker SLOT's heartbeat (its owner thread only). */
void bm_beat(billing_metrics *m, int slot);
/* The heartbeat slot's name ("settlement 0", "sweeper", "creditsync") into OUT. */
void bm_beat_name(int slot, char *out, size_t cap);

/* Counting helpers: all accept m == NULL (nothing counted). */
void bm_settled(billing_metrics *m, const char *outcome);
void bm_batch(billing_metrics *m, int records, int64_t duration_us);
void bm_dead_letter(billing_metrics *m);
void bm_sweeper_release(billing_metrics *m, int64_t points);
void bm_repair(billing_metrics *m, int result, int64_t duration_us, long fixes);
void bm_api(billing_metrics *m, int endpoint, int code);
/* A new credit entry (replays are not counted): kind "topup" or "adjustment". */
void bm_credit(billing_metrics *m, const char *kind, int64_t amount);

/* One webhook attempt's result and duration. */
void bm_webhook_attempt(billing_metrics *m, int result, int64_t duration_us);

/* The endpoint template of a request (METHOD is not part of it). */
int bm_endpoint_of(const char *url);

/* The whole exposition (billing families, log lines, build info, process_*)
 * into P; READY is the /readyz verdict (ops.c decides it). */
void bm_render(billing_metrics *m, promtext *p, int ready);

#endif
