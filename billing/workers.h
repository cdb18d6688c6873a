/* workers.h: the background workers of `billing serve`. Each runs on a thread
 * of its own with its own Postgres and Redis connections, loops until *stop
 * is set, and survives either store being down (it waits and retries).
 *
 *  settlement: outbox stream -> Postgres, exactly once (settlement.c)
 *  sweeper:    releases holds past their deadline, charging nothing (sweeper.c)
 *  creditsync: re-pushes every account's credits and every key to Redis at
 *              start and periodically, repairing lost pushes, and at once
 *              when Redis lost its data (pg:epoch gone) (creditsync.c)
 *  webhooks:   balance watcher and webhook deliveries; Postgres only, never
 *              Redis (whdeliver.c, the only part that links libcurl)
 *  archive:    partitions made ahead, months closed, old days exported and
 *              dropped; Postgres only (archive.c)
 */
#ifndef POINTGATE_WORKERS_H
#define POINTGATE_WORKERS_H

#include "billing/config.h"
#include "billing/metrics.h"

#include <libpq-fe.h>
#include <stdatomic.h>
#include <stdint.h>

typedef struct worker_args {
    const billing_config *cfg;
    atomic_int *stop;
    int index;                /* distinguishes several settlement workers */
    billing_metrics *metrics; /* NULL: nothing counted (heartbeats neither) */
} worker_args;

void *settlement_run(void *worker_args);
void *sweeper_run(void *worker_args);
void *creditsync_run(void *worker_args);
void *webhooks_run(void *worker_args);
void *archive_run(void *worker_args);

/* One repair pass; returns 0 when every account and key was pushed (and
 * pg:epoch written if it was missing), CREDITSYNC_LOST when Redis lost its
 * data during the pass (run it again), -1 on failure. Also used by the CLI
 * and tests. */
#define CREDITSYNC_LOST 1
struct hot_conn;
int creditsync_pass(PGconn *pg, struct hot_conn *hot);

/* Parses one outbox record "rid|acct|route|amount|hold|outcome|status"
 * stamped TS_MS into C; -1 if malformed (settlement.c; tests/fuzz). */
struct ledger_charge;
int settle_parse(const char *rec, int64_t ts_ms, struct ledger_charge *c);

/* Sleeps up to MS, waking early when *stop is set. */
void worker_sleep(atomic_int *stop, long ms);
/* The same, stamping heartbeat SLOT of M (metrics.h) as it goes: a worker
 * that waits on purpose (an interval, a backoff) is alive, and /healthz
 * must tell it from one stuck in a call. */
void worker_rest(atomic_int *stop, long ms, billing_metrics *m, int slot);

#endif
