/* worker.h: one worker thread: its event loop and everything bound to it.
 * Owns the libevent base, the HTTP server (server.c: its own listening
 * socket on the shared port with SO_REUSEPORT, its connections), the Redis client,
 * its point leases, the upstream client (its keep-alive pool), the key cache and the current
 * route table. A request lives on one worker from accept to answer. Only
 * worker_stop and worker_reload may be called from another thread (main). */
#ifndef GATEWAY_WORKER_H
#define GATEWAY_WORKER_H

#include "gateway/authcache.h"
#include "gateway/config.h"
#include "gateway/hotclient.h"
#include "gateway/lease.h"
#include "gateway/metrics.h"
#include "gateway/pgclient.h"
#include "gateway/proxy.h"
#include "gateway/routes.h"
#include "gateway/server.h"
#include "gateway/spill.h"

#include <event2/event.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

struct gw_request;
struct request_ctx;

typedef struct worker {
    int idx;
    const gw_config *cfg;
    pthread_t thread;
    int started;
    struct event_base *base;
    server *srv;   /* the client side: listening socket and connections */
    int notify_fd; /* eventfd: main -> worker wake-up */
    struct event *notify_ev;
    atomic_int stop_requested;
    struct event *drain_timer;
    hotclient *hc;
    lease_table *leases;
    spill_file *spill;        /* what Redis did not take: overflow, then the stop */
    spill_replay *replay;     /* worker 0: spill files found at the start */
    spill_replay *own_replay; /* this run's overflow spill, replayed once Redis is back */
    spill_snap *snap;         /* the drain's snapshots of what is undelivered (spill.h) */
    uint64_t snap_ms;         /* when the last one was taken */
    int snap_live;            /* the last one holds items (a file exists) */
    struct event *spill_timer;
    struct event *beat_timer; /* 1 s: the heartbeat and the loop's gauges (metrics.h) */
    gw_metrics m;             /* written by this thread only; read by scrapes */
    pgclient *pg;             /* /_billing/usage only; lazily connected */
    proxy *px;
    authcache keys;
    route_table *routes;
    _Atomic(route_table *) next_routes; /* handed over by main on SIGHUP */
    struct gw_request *suspended;       /* requests waiting on Redis/upstream */
    struct request_ctx *rq;             /* request.c's per-worker state (wait queues) */
    unsigned char rnd[1024];            /* random bytes for request ids */
    size_t rnd_used;                    /* consumed from rnd */
    int inflight;
    int stopping;
    int aborted;
    uint64_t stop_ms;
} worker;

/* Creates the loop, binds the listening socket, connects Redis. Takes ROUTES. */
int worker_init(worker *w, int idx, const gw_config *cfg, route_table *routes);
int worker_start(worker *w);
/* Thread-safe: stop accepting, finish in-flight calls, leave the loop. */
void worker_stop(worker *w);
/* Thread-safe: hand a new route table (ownership passes) to the worker. */
void worker_reload(worker *w, route_table *t);
void worker_join(worker *w);
/* Frees everything; the thread must have been joined (or never started). */
void worker_destroy(worker *w);
uint64_t worker_now_ms(void);
/* The wall clock (CLOCK_REALTIME), ms since the epoch: for dates in answers. */
uint64_t worker_wall_ms(void);
uint64_t worker_now_us(void);
/* Loop thread: N <= sizeof w->rnd random bytes (libsodium's CSPRNG, drawn
 * a kilobyte at a time instead of one getrandom call per request). */
void worker_random(worker *w, unsigned char *out, size_t n);
/* Loop thread: a new reservation / request id, 32 hex chars: 48 bits of
 * wall-clock milliseconds then 80 random bits. Time first so that ids are
 * roughly increasing: Postgres then appends each charge to the right edge
 * of the charges primary key instead of a random leaf (measured: most of
 * settlement's CPU went to B-tree descents into random pages). */
void worker_request_id(worker *w, char out[33]);

#endif
