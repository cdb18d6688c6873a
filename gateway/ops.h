/* ops.h: the gateway's ops listener (GATEWAY_OPS_LISTEN): GET /metrics,
 * /healthz and /readyz, on a thread and event loop of its own, never a
 * worker's, and never the public listener.
 * Owns that thread, its socket and the answers' meaning: healthz = every
 * worker's loop turned within GW_OPS_STALL_MS; readyz = routes loaded,
 * every worker connected to a Redis that holds its data, not draining.
 * Does not own what a metric is (metrics.h) or the stop sequence (main.c,
 * which calls gw_ops_set_draining first so that load balancers move away
 * before connections close). */
#ifndef GATEWAY_OPS_H
#define GATEWAY_OPS_H

#include "gateway/config.h"

#define GW_OPS_STALL_MS 5000

struct worker;
typedef struct gw_ops gw_ops;

/* Binds the ops address (a failure is a start-up error: -1, logged).
 * WORKERS (N of them) must outlive the listener. */
int gw_ops_new(const gw_config *cfg, const struct worker *workers, int n, gw_ops **out);
/* Starts serving on its own thread. -1 if the thread cannot start. */
int gw_ops_start(gw_ops *o);
/* Any thread: /readyz answers 503 "draining" from now on. */
void gw_ops_set_draining(gw_ops *o);
/* Stops the thread (if started) and frees everything. NULL is a no-op. */
void gw_ops_free(gw_ops *o);

#endif
