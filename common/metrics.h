/* metrics.h: counters, gauges and histograms that one thread writes and a
 * scrape reads, and their Prometheus text exposition (format 0.0.4).
 * Owns the primitives and the text format only; each program owns which
 * metrics it has (gateway/metrics.c, billing/metrics.c) and their names.
 *
 * Why relaxed atomics and not plain integers: a scrape thread reads what a
 * worker writes, and C11 calls that a data race on plain integers. A relaxed
 * load and store of a 64-bit value compiles to plain moves on x86-64 and
 * arm64: no lock prefix, no fence, no cache line shared between writers
 * (each worker has its own block). So a value written by exactly one
 * thread uses metric_add (load + store, not a read-modify-write). A value
 * that several threads write (billing's API thread pool) uses
 * metric_add_shared, a real fetch_add: never on the gateway's hot path. */
#ifndef POINTGATE_METRICS_H
#define POINTGATE_METRICS_H

#include "common/buf.h"

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef _Atomic uint64_t metric_u64; /* a counter */
typedef _Atomic int64_t metric_i64;  /* a gauge */

/* Single writer: the owning thread only. */
static inline void metric_add(metric_u64 *c, uint64_t n)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n,
                          memory_order_relaxed);
}
/* Any thread (a fetch_add): for counters of thread pools, off hot paths. */
static inline void metric_add_shared(metric_u64 *c, uint64_t n)
{
    atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}
/* Single writer: a counter kept elsewhere by the same thread, published. */
static inline void metric_store(metric_u64 *c, uint64_t v)
{
    atomic_store_explicit(c, v, memory_order_relaxed);
}
static inline uint64_t metric_get(const metric_u64 *c)
{
    return atomic_load_explicit((metric_u64 *)c, memory_order_relaxed);
}
static inline void metric_set(metric_i64 *g, int64_t v)
{
    atomic_store_explicit(g, v, memory_order_relaxed);
}
/* Single writer, as metric_add. */
static inline void metric_gauge_add(metric_i64 *g, int64_t d)
{
    atomic_store_explicit(g, atomic_load_explicit(g, memory_order_relaxed) + d,
                          memory_order_relaxed);
}
static inline int64_t metric_gauge_get(const metric_i64 *g)
{
    return atomic_load_explicit((metric_i64 *)g, memory_order_relaxed);
}

/* A histogram with at most METRIC_HIST_MAX finite upper bounds, held as
 * integers in the metric's base unit times its scale (microseconds for a
 * `_seconds` histogram: scale 1e6; records for a size histogram: scale 1),
 * so an observation is an integer compare loop and two stores. */
#define METRIC_HIST_MAX 16
typedef struct metric_hist_spec {
    int n;                          /* finite bounds, ascending, <= METRIC_HIST_MAX */
    int64_t bound[METRIC_HIST_MAX]; /* in scaled units */
    double scale;                   /* units per base unit: 1e6 for seconds from us */
} metric_hist_spec;
typedef struct metric_hist {
    metric_u64 bucket[METRIC_HIST_MAX + 1]; /* per bucket, not cumulative; last is +Inf */
    metric_u64 sum;                         /* in scaled units */
} metric_hist;

/* Latencies in microseconds: 100 us .. 10 s. */
extern const metric_hist_spec metric_latency_us;

/* Single writer. V in the spec's scaled units (negative counts as 0). */
void metric_observe(metric_hist *h, const metric_hist_spec *s, int64_t v);
/* Any thread (fetch_add), as metric_add_shared. */
void metric_observe_shared(metric_hist *h, const metric_hist_spec *s, int64_t v);

/* A merged histogram (a scrape's sum over threads). */
typedef struct metric_hist_sum {
    uint64_t bucket[METRIC_HIST_MAX + 1];
    uint64_t sum;
} metric_hist_sum;
void metric_hist_merge(metric_hist_sum *out, const metric_hist *h, const metric_hist_spec *s);

/* ---- the text exposition: a growing buffer the scrape thread owns. Every
 * writer records an out-of-memory in `oom` instead of failing each call;
 * check it once at the end (promtext_done). */
typedef struct promtext {
    struct buf b; /* the text, NUL-terminated once anything is written */
    int oom;
} promtext;

void promtext_init(promtext *p);
void promtext_free(promtext *p);
/* 0, or -1 when some write ran out of memory (the text is then incomplete). */
int promtext_done(const promtext *p);
/* "# HELP" and "# TYPE" lines of a family; once per family, before its samples.
 * TYPE is "counter", "gauge" or "histogram". */
void promtext_family(promtext *p, const char *name, const char *type, const char *help);
/* One sample line. LABELS is NULL or preformatted `k="v",k2="v2"` (values
 * already escaped with promtext_escape). */
void promtext_u64(promtext *p, const char *name, const char *labels, uint64_t v);
void promtext_i64(promtext *p, const char *name, const char *labels, int64_t v);
void promtext_double(promtext *p, const char *name, const char *labels, double v);
/* The _bucket (cumulative, with le), _sum and _count lines of one labelled
 * histogram (its family line written before). */
void promtext_hist(promtext *p, const char *name, const char *labels, const metric_hist_spec *s,
                   const metric_hist_sum *h);
/* A label value escaped per the format (\\, \", \n) into OUT; returns OUT.
 * Truncated (never split inside an escape) when OUTLEN is short. */
char *promtext_escape(char *out, size_t outlen, const char *v);
/* The standard process_* families from /proc/self: process_cpu_seconds_total,
 * process_resident_memory_bytes, process_virtual_memory_bytes,
 * process_open_fds, process_max_fds, process_start_time_seconds. A figure
 * that cannot be read is left out (never a made-up 0). */
void promtext_process(promtext *p);

#endif
