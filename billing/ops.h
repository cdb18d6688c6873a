/* ops.h: the ops listener of `billing serve` (BILLING_OPS_LISTEN, default
 * 127.0.0.1:9181): GET /metrics, /healthz and /readyz for scrapers, probes
 * and load balancers, which carry no token; so it is a listener of its own,
 * never the admin API's. Owns that listener and the reachability probe of
 * Postgres and Redis (on connections of its own, with ~1 s timeouts, once a
 * second on a thread of its own) whose results /readyz and the *_up and
 * outbox gauges report. Does not own the metrics (metrics.c) nor the
 * workers it watches (they stamp heartbeats in the registry). */
#ifndef POINTGATE_BILLING_OPS_H
#define POINTGATE_BILLING_OPS_H

#include "billing/config.h"
#include "billing/metrics.h"

typedef struct ops_server ops_server;

/* Starts the probe thread and the listener; NULL (logged) on failure. M
 * must outlive ops_stop. */
ops_server *ops_start(const billing_config *cfg, billing_metrics *m);
/* From now on /readyz answers 503 "draining" (a graceful stop's first step). */
void ops_drain(ops_server *s);
/* Stops the listener and the probe (last thing at exit). */
void ops_stop(ops_server *s);

/* How long a worker may go without a heartbeat before /healthz names it. */
#define OPS_STALL_MS 5000

#endif
