/* metrics.h: one worker's metric block, and the scrape that merges them.
 * Owns which gateway metrics exist, their names and labels, and how the
 * blocks of all workers become one /metrics text. Does not own the ops
 * listener (ops.c) or the primitives and format (common/metrics.h).
 *
 * Each worker writes only its own block (metric_add: no lock, no
 * read-modify-write), in the answer path for what each call adds and from
 * a 1 s timer for gauges of state the loop owns (in flight, Redis up,
 * queued settles): a gauge is then at most a second old, and a call pays
 * nothing for it. The scrape thread reads every block with relaxed loads. */
#ifndef GATEWAY_METRICS_H
#define GATEWAY_METRICS_H

#include "common/metrics.h"

#include <stdint.h>

/* 1xx .. 5xx; index 0 is anything else (never written by this server). */
#define GW_METRICS_CLASSES 6

typedef struct gw_metrics {
    metric_u64 answers[GW_METRICS_CLASSES]; /* answers begun, by status class */
    metric_u64 sent_bytes;                  /* written to clients */
    metric_u64 accepted;                    /* client connections accepted */
    metric_i64 connections;                 /* client connections open */
    metric_i64 heartbeat_ms;                /* the loop's 1 s timer last ran (monotonic ms) */
    metric_i64 inflight;                    /* calls in flight */
    metric_i64 redis_ready;                 /* connected with Redis's data present (epoch != 0) */
    metric_i64 resend_queue;                /* settles queued for resending */
    metric_i64 spill_refusing;              /* reserves refused until a spill is replayed */
    metric_i64 stopping;                    /* the worker began its drain */
} gw_metrics;

/* Loop thread: a status line was begun for an answer of STATUS. */
static inline void gw_metrics_answer(gw_metrics *m, unsigned status)
{
    unsigned c = status / 100;
    metric_add(&m->answers[c < GW_METRICS_CLASSES ? c : 0], 1);
}

struct worker;
/* Scrape thread: the whole exposition for N workers into P (see
 * promtext_done for the result). DRAINING and READY are the process's
 * state as /readyz reports it. */
void gw_metrics_render(promtext *p, const struct worker *w, int n, int draining, int ready);

#endif
