/* metrics.h: one worker's metric block, and the scrape that merges them.
 * Owns which gateway metrics exist, their names and labels, and how the
 * blocks of all workers become one /metrics text. Does not own the ops
 * listener (ops.c) or the primitives and format (common/metrics.h).
 *
 * Each worker writes only its own block (metric_add: no lock, no
 * read-modify-write), in the answer path for what each call adds and from
 * a 250 ms timer for gauges of state the loop owns (in flight, Redis up,
 * queued settles, upstream pool, leases): a gauge is then at most a beat
 * old, and a call pays nothing for it. The scrape thread reads every block
 * with relaxed loads and merges them (route slots by name: workers may
 * have named them in different orders). */
#ifndef GATEWAY_METRICS_H
#define GATEWAY_METRICS_H

#include "common/metrics.h"

#include <stdint.h>

/* 1xx .. 5xx; index 0 is anything else (never written by this server). */
#define GW_METRICS_CLASSES 6

/* The billing outcome of a call: the `outcome` label (INTERFACES in
 * README's "Operating pointgate"). Set by request.c where the answer is
 * decided; derived from the status where no site set it. */
enum gw_outcome {
    GW_OUT_CHARGED,             /* billable answer, committed */
    GW_OUT_RELEASED,            /* held, then cost 0: upstream failed or not billable */
    GW_OUT_REFUSED,             /* 402 */
    GW_OUT_UNAUTHORIZED,        /* 401 */
    GW_OUT_NO_ROUTE,            /* 404 of the gateway's own */
    GW_OUT_BILLING_UNAVAILABLE, /* 503: Redis, backlog, restore */
    GW_OUT_BAD_REQUEST,         /* another 4xx of the gateway's own */
    GW_OUT_RATE_LIMITED,        /* 429 */
    GW_OUT_INFO,                /* /_billing/ answered */
    GW_OUT_CANCELLED,           /* the client left, or the stop, before the upstream */
    GW_OUT_TOO_MANY_WAITING,    /* 503: the account's wait queue is full */
    GW_OUT_QUOTA_EXCEEDED,      /* 429: a spending cap */
    GW_OUT_FORBIDDEN,           /* 403: the key may not call this route */
    GW_OUT_REPLAYED,            /* Idempotency-Key: the first call's answer, cost 0 */
    GW_OUT_IDEM_CONFLICT,       /* Idempotency-Key: 409, 422 or 429 budget; cost 0 */
    GW_OUT_ERROR,               /* anything else (500) */
    GW_OUTCOMES
};

/* What became of calls with an Idempotency-Key (the `result` label of
 * pointgate_gateway_idempotency_total). */
enum gw_idem {
    GW_IDEM_REPLAYED,    /* a retry answered with the stored answer */
    GW_IDEM_IN_FLIGHT,   /* 409: the first call still runs */
    GW_IDEM_REUSED,      /* 422: the key came with another request */
    GW_IDEM_NOT_KEPT,    /* 409: the first answer was billable but not kept */
    GW_IDEM_BUDGET,      /* 429: the account's stored answers at their budget */
    GW_IDEM_STORED,      /* a billable answer sent to be stored with its body */
    GW_IDEM_STORED_BARE, /* a billable answer stored without it (too large) */
    GW_IDEM_CLEARED,     /* a first call not billable: its marker cleared */
    GW_IDEM_RESULTS
};

/* The `method` label: the methods a route may name, then "other". */
#define GW_METHODS 8

/* Route label slots. A worker names a slot the first time one of its route
 * tables has that id, and never renames it: a reload keeps a route's
 * series and adds the new ones, up to GW_METRICS_ROUTES ids in all (the
 * label stays bounded however often routes change); past that, "_other". */
#define GW_METRICS_ROUTES 64
#define GW_SLOT_OTHER GW_METRICS_ROUTES         /* "_other" */
#define GW_SLOT_NONE (GW_METRICS_ROUTES + 1)    /* "_none": no route matched */
#define GW_SLOT_BILLING (GW_METRICS_ROUTES + 2) /* "_billing": /_billing/ */
#define GW_METRICS_SLOTS (GW_METRICS_ROUTES + 3)
#define GW_METRICS_ROUTE_ID_MAX 128 /* routes.c's bound on an id */

typedef struct gw_route_metrics {
    metric_u64 requests[GW_METHODS][GW_METRICS_CLASSES - 1][GW_OUTCOMES]; /* 1xx..5xx */
    metric_u64 charged;                                                   /* points */
    metric_u64 released; /* points held, then not charged */
} gw_route_metrics;

typedef struct gw_metrics {
    metric_u64 answers[GW_METRICS_CLASSES]; /* answers begun, by status class */
    metric_u64 sent_bytes;                  /* written to clients */
    metric_u64 received_bytes;              /* read from clients */
    metric_u64 accepted;                    /* client connections accepted */
    metric_i64 connections;                 /* client connections open */
    metric_i64 waiting;                     /* calls waiting for held points */
    metric_hist request_us;                 /* head to answer */
    metric_hist upstream_us;                /* the upstream call alone */
    metric_hist wait_us;                    /* waiting for held points (calls that waited) */
    gw_route_metrics route[GW_METRICS_SLOTS];
    char route_id[GW_METRICS_ROUTES][GW_METRICS_ROUTE_ID_MAX + 1];
    _Atomic int nroutes; /* route_id[0..nroutes) are named: store-release after the name */
    /* From the loop's beat timer: gauges, and the counters other modules
     * keep in their own structs (proxy.c, hotclient.c), copied here so that
     * they stay single-owner. At most one beat (250 ms) old. */
    metric_i64 heartbeat_ms;          /* the loop's beat last ran (monotonic ms) */
    metric_i64 inflight;              /* calls in flight */
    metric_i64 redis_ready;           /* connected with Redis's data present (epoch != 0) */
    metric_i64 resend_queue;          /* settles queued for resending */
    metric_i64 spill_refusing;        /* reserves refused until a spill is replayed */
    metric_i64 refusing;              /* reserves refused: backlog, resend queue or spill */
    metric_i64 backlog;               /* pg:backlog as last polled */
    metric_i64 stopping;              /* the worker began its drain */
    metric_i64 up_active;             /* upstream connections carrying a call */
    metric_i64 up_idle;               /* upstream connections kept for reuse */
    metric_u64 up_connect_fail;       /* upstream connects that failed */
    metric_u64 up_timeouts;           /* upstream calls past their timeout */
    metric_u64 redis_trips;           /* Redis replies (a batch of ops is one) */
    metric_u64 redis_errors;          /* error replies and lost replies */
    metric_u64 redis_reconnects;      /* connections made after the first */
    metric_i64 leases;                /* point leases held */
    metric_i64 leased_points;         /* points they hold in Redis, not yet charged */
    metric_u64 idem[GW_IDEM_RESULTS]; /* calls with an Idempotency-Key, by result */
    metric_u64 idem_stored_bytes;     /* bytes of the markers sent to be stored */
} gw_metrics;

/* Loop thread: a status line was begun for an answer of STATUS. */
static inline void gw_metrics_answer(gw_metrics *m, unsigned status)
{
    unsigned c = status / 100;
    metric_add(&m->answers[c < GW_METRICS_CLASSES ? c : 0], 1);
}

/* Loop thread (or before the worker starts): the slot of route id ID,
 * naming a new one if need be; GW_SLOT_OTHER once all are named. */
int gw_metrics_route_slot(gw_metrics *m, const char *id);

/* The `method` index of METHOD. */
int gw_metrics_method(const char *method);

/* The outcome's label value (and the access log's "outcome"). */
const char *gw_metrics_outcome_name(enum gw_outcome o);

/* Loop thread: one answered call. SLOT from gw_metrics_route_slot (or
 * GW_SLOT_NONE / GW_SLOT_BILLING); CHARGED and RELEASED in points. */
static inline void gw_metrics_call(gw_metrics *m, int slot, int method, unsigned status,
                                   enum gw_outcome outcome, int64_t charged, int64_t released)
{
    gw_route_metrics *r = &m->route[slot];
    unsigned c = status / 100;
    if (c >= 1 && c < GW_METRICS_CLASSES) metric_add(&r->requests[method][c - 1][outcome], 1);
    if (charged > 0) metric_add(&r->charged, (uint64_t)charged);
    if (released > 0) metric_add(&r->released, (uint64_t)released);
}

struct worker;
/* Scrape thread: the whole exposition for N workers into P (see
 * promtext_done for the result). DRAINING and READY are the process's
 * state as /readyz reports it. */
void gw_metrics_render(promtext *p, const struct worker *w, int n, int draining, int ready);

#endif
