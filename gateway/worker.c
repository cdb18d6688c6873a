/* worker.c: per-thread event loop (see worker.h): setup and teardown of
 * what lives on it, route reloads and the graceful stop handed over by the
 * main thread, and the drain that follows. Clients are served by server.c,
 * requests by request.c. */
#include "gateway/worker.h"

#include "common/log.h"
#include "gateway/request.h"

#include <sodium.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define WORKER_DRAIN_TICK_MS 20
#define WORKER_AUTHCACHE_SLOTS 16384
#define WORKER_PG_TIMEOUT_MS 5000
#define WORKER_SPILL_CHECK_MS 500
/* While a stop drains with charges undelivered, a snapshot of them this
 * often: a SIGKILL before the drain's end (docker stop waits 10 s, the
 * drain up to GATEWAY_DRAIN_TIMEOUT_MS) loses only what ended since. Each
 * is an fsync on the loop, which by then only finishes calls in flight. */
#define WORKER_SNAP_MS 1000

uint64_t worker_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

uint64_t worker_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

uint64_t worker_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

void worker_random(worker *w, unsigned char *out, size_t n)
{
    if (w->rnd_used + n > sizeof w->rnd) {
        randombytes_buf(w->rnd, sizeof w->rnd);
        w->rnd_used = 0;
    }
    memcpy(out, w->rnd + w->rnd_used, n);
    sodium_memzero(w->rnd + w->rnd_used, n); /* handed out once */
    w->rnd_used += n;
}

void worker_request_id(worker *w, char out[33])
{
    unsigned char raw[16];
    struct timespec ts;
    uint64_t ms;
    clock_gettime(CLOCK_REALTIME, &ts);
    ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    for (int i = 0; i < 6; i++)
        raw[i] = (unsigned char)(ms >> (8 * (5 - i)));
    worker_random(w, raw + 6, sizeof raw - 6);
    sodium_bin2hex(out, 33, raw, sizeof raw);
}

static void worker_on_stop(worker *w);

/* T becomes this worker's: its routes get their metrics slots (named in
 * this worker's block on first sight, kept across reloads). */
static void worker_adopt_routes(worker *w, route_table *t)
{
    for (size_t i = 0; i < t->n; i++)
        t->routes[i].metric_slot = gw_metrics_route_slot(&w->m, t->routes[i].id);
}

/* The loop turned (healthz), and the gauges of state only this thread may
 * read, published for scrapes every beat instead of on every change. */
static void worker_beat(worker *w)
{
    proxy_stats ps;
    hot_stats hs;
    int64_t nl = 0, lp = 0;
    proxy_get_stats(w->px, &ps);
    hotclient_get_stats(w->hc, &hs);
    if (w->leases) lease_table_stats(w->leases, &nl, &lp);
    metric_set(&w->m.heartbeat_ms, (int64_t)worker_now_ms());
    metric_set(&w->m.up_active, ps.active);
    metric_set(&w->m.up_idle, ps.idle);
    metric_store(&w->m.up_connect_fail, ps.connect_failures);
    metric_store(&w->m.up_timeouts, ps.timeouts);
    metric_store(&w->m.redis_trips, hs.replies);
    metric_store(&w->m.redis_errors, hs.errors);
    metric_store(&w->m.redis_reconnects, hs.connects > 1 ? hs.connects - 1 : 0);
    metric_set(&w->m.leases, nl);
    metric_set(&w->m.leased_points, lp);
    metric_set(&w->m.inflight, w->inflight);
    metric_set(&w->m.redis_ready, hotclient_epoch(w->hc) != 0);
    metric_set(&w->m.resend_queue, (int64_t)hotclient_queued(w->hc));
    metric_set(&w->m.spill_refusing, hotclient_spilled(w->hc) != 0);
    metric_set(&w->m.refusing, hs.refusing);
    metric_set(&w->m.backlog, hs.backlog);
    metric_set(&w->m.stopping, w->stopping);
}

static void worker_on_beat(evutil_socket_t fd, short what, void *arg)
{
    worker_beat(arg);
}

/* Settles spilled while running (the resend queue overflowed) are replayed
 * by this worker once Redis is back and its queue is empty; reserves stay
 * refused until every one was answered and nothing new was spilled. */
static void worker_on_spill_check(evutil_socket_t fd, short what, void *arg)
{
    worker *w = arg;
    if (w->own_replay) {
        if (spill_replay_left(w->own_replay) > 0) return;
        spill_replay_free(w->own_replay);
        w->own_replay = NULL;
        if (spill_count(w->spill) == 0) hotclient_spill_replayed(w->hc);
        return;
    }
    if (w->stopping || !hotclient_spilled(w->hc) || hotclient_queued(w->hc) != 0 ||
        hotclient_epoch(w->hc) == 0)
        return;
    if (spill_file_handoff(w->spill, &w->own_replay) != 0) {
        log_error("worker %d: cannot replay its spill file now; at the next start", w->idx);
        return;
    }
    if (!w->own_replay) {
        hotclient_spill_replayed(w->hc); /* nothing was written after all */
        return;
    }
    if (spill_replay_start(w->own_replay, w->base, w->hc) != 0) {
        spill_replay_free(w->own_replay); /* the file stays for the next start */
        w->own_replay = NULL;
    }
}

static void worker_take_routes(worker *w)
{
    route_table *t = atomic_exchange(&w->next_routes, NULL);
    if (!t) return;
    /* Requests in flight keep their reference to the old table. */
    worker_adopt_routes(w, t);
    routes_unref(w->routes);
    w->routes = t;
    log_info("worker %d: routes reloaded (%zu routes)", w->idx, t->n);
}

/* Writes what is undelivered now (queued settles, lease records) as the
 * drain's snapshot, in place of the last one (spill.h). */
static void worker_snapshot(worker *w)
{
    spill_file *f;
    long n;
    w->snap_ms = worker_now_ms();
    if (!w->snap || !(f = spill_snap_begin(w->snap))) return;
    hotclient_spill_queue(w->hc, f);
    lease_table_spill(w->leases, f);
    n = spill_count(f);
    if (spill_snap_commit(w->snap, f) == 0) w->snap_live = n > 0;
}

static void worker_on_drain(evutil_socket_t fd, short what, void *arg)
{
    worker *w = arg;
    uint64_t elapsed = worker_now_ms() - w->stop_ms;
    /* Past the longest a call can legitimately take, fail what is left. */
    uint64_t grace = (uint64_t)w->cfg->upstream_timeout_ms + 2000;
    /* Charges answered but not in Redis yet: resent until the drain
     * timeout, then spilled (worker_destroy). */
    long undelivered = (long)hotclient_queued(w->hc) + lease_table_unsent(w->leases);
    if (grace > 15000) grace = 15000;
    if ((undelivered > 0 || w->snap_live) && worker_now_ms() - w->snap_ms >= WORKER_SNAP_MS)
        worker_snapshot(w);
    /* Done when no call is in flight, no settle is pending and every
     * answer is written. */
    if (w->inflight == 0 && hotclient_busy(w->hc) == 0 && lease_table_busy(w->leases) == 0 &&
        server_writing(w->srv) == 0) {
        event_base_loopexit(w->base, NULL);
        return;
    }
    if (elapsed > grace && !w->aborted) {
        log_warn("worker %d: %d calls still in flight at shutdown, failing them", w->idx,
                 w->inflight);
        w->aborted = 1;
        request_abort_all(w);
    }
    if (w->inflight != 0 || server_writing(w->srv) != 0) return;
    /* Nothing left that could be lost (settles in flight without an
     * answer are queued, and so spilled, when the client is freed): a
     * Redis away or stuck only keeps leases' free points, which its
     * sweeper gives back. */
    if (undelivered == 0 && (!hotclient_up(w->hc) || elapsed > grace + 2000)) {
        event_base_loopexit(w->base, NULL);
        return;
    }
    if (elapsed >= (uint64_t)w->cfg->drain_timeout_ms) {
        if (undelivered > 0)
            log_warn("worker %d: drain timeout with %ld charges undelivered: spilling them", w->idx,
                     undelivered);
        event_base_loopexit(w->base, NULL);
    }
}

/* Main thread wrote to the eventfd: look at what it asked for. Using an
 * eventfd (not event_active across threads) keeps libevent lock-free. */
static void worker_on_notify(evutil_socket_t fd, short what, void *arg)
{
    worker *w = arg;
    uint64_t v;
    if (read(fd, &v, sizeof v) < 0) { /* EAGAIN: nothing pending */
    }
    worker_take_routes(w);
    if (atomic_load(&w->stop_requested)) worker_on_stop(w);
}

static void worker_on_stop(worker *w)
{
    struct timeval tick = {0, WORKER_DRAIN_TICK_MS * 1000};
    if (w->stopping) return;
    w->stopping = 1;
    worker_beat(w);
    w->stop_ms = worker_now_ms();
    /* Stop accepting and close idle connections; requests in progress are
     * still served, and their connections closed after the answer. */
    server_quiesce(w->srv);
    lease_table_close(w->leases);
    spill_replay_stop(w->replay); /* what is not replayed yet stays in its file */
    spill_replay_stop(w->own_replay);
    w->snap = spill_snap_new(w->cfg->spill_dir, w->idx);
    if (hotclient_queued(w->hc) > 0 || lease_table_unsent(w->leases) > 0) worker_snapshot(w);
    event_add(w->drain_timer, &tick);
}

int worker_init(worker *w, int idx, const gw_config *cfg, route_table *routes)
{
    memset(w, 0, sizeof *w);
    w->notify_fd = -1;
    w->rnd_used = sizeof w->rnd; /* drawn on first use */
    w->idx = idx;
    w->cfg = cfg;
    w->routes = routes;
    worker_adopt_routes(w, routes);
    atomic_init(&w->next_routes, NULL);
    w->base = event_base_new();
    if (!w->base) goto oom;
    w->drain_timer = event_new(w->base, -1, EV_PERSIST, worker_on_drain, w);
    w->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->notify_fd < 0) goto oom;
    w->notify_ev = event_new(w->base, w->notify_fd, EV_READ | EV_PERSIST, worker_on_notify, w);
    if (!w->notify_ev || !w->drain_timer || event_add(w->notify_ev, NULL) != 0) goto oom;
    if (authcache_init(&w->keys, WORKER_AUTHCACHE_SLOTS) != 0) goto oom;
    if (proxy_new(w->base, &cfg->up, cfg->max_body, (int)cfg->upstream_max_conns, &w->px) != 0)
        goto oom;
    /* These two resolve their host names (and say so when that fails). */
    if (hotclient_new(w->base, &cfg->redis, &w->hc) != 0) {
        log_error("worker %d: cannot set up its Redis client", idx);
        return -1;
    }
    w->spill = spill_file_new(cfg->spill_dir, idx);
    w->spill_timer = event_new(w->base, -1, EV_PERSIST, worker_on_spill_check, w);
    w->beat_timer = event_new(w->base, -1, EV_PERSIST, worker_on_beat, w);
    if (!w->spill || !w->spill_timer || !w->beat_timer) goto oom;
    {
        struct timeval tv = {0, 250000}; /* readiness follows Redis within 250 ms */
        if (event_add(w->beat_timer, &tv) != 0) goto oom;
    }
    {
        struct timeval tv = {0, WORKER_SPILL_CHECK_MS * 1000};
        if (event_add(w->spill_timer, &tv) != 0) goto oom;
    }
    {
        hot_limits hl = {.max_backlog = cfg->max_backlog,
                         .queue_max = (size_t)cfg->settle_queue_max,
                         .spill = w->spill,
                         .idem_ttl_ms = cfg->idem_ttl_ms,
                         .idem_budget = cfg->idem_account_bytes};
        hotclient_configure(w->hc, &hl);
    }
    /* One worker replays what an earlier run spilled, while serving (every
     * item is idempotent, and holds it would upgrade are not in the way). */
    if (idx == 0) {
        if (spill_replay_load(cfg->spill_dir, &w->replay) != 0) return -1;
        if (w->replay && spill_replay_start(w->replay, w->base, w->hc) != 0) goto oom;
    }
    {
        lease_config lc = {.calls = cfg->lease_calls,
                           .idle_ms = cfg->lease_idle_ms,
                           .ttl_ms = cfg->upstream_timeout_ms + cfg->hold_grace_ms};
        if (lease_table_new(w->base, w->hc, &lc, &w->leases) != 0) goto oom;
    }
    if (pgclient_new(w->base, cfg->database_url, WORKER_PG_TIMEOUT_MS, &w->pg) != 0) {
        log_error("worker %d: cannot set up its Postgres client", idx);
        return -1;
    }
    /* Last: the port is open only once everything behind it is ready. */
    if (server_new(w, cfg, &w->srv) != 0) return -1;
    worker_beat(w); /* alive from the start; not ready until Redis answers */
    return 0;
oom:
    log_error("worker %d: out of memory", idx);
    return -1;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    event_base_dispatch(w->base);
    return NULL;
}

int worker_start(worker *w)
{
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0) return -1;
    w->started = 1;
    return 0;
}

static void worker_notify(worker *w)
{
    uint64_t one = 1;
    if (write(w->notify_fd, &one, sizeof one) < 0) log_error("worker %d: notify failed", w->idx);
}

void worker_stop(worker *w)
{
    atomic_store(&w->stop_requested, 1);
    worker_notify(w);
}

void worker_reload(worker *w, route_table *t)
{
    route_table *old = atomic_exchange(&w->next_routes, t);
    if (old) routes_unref(old); /* never seen by the worker */
    worker_notify(w);
}

void worker_join(worker *w)
{
    if (w->started) pthread_join(w->thread, NULL);
    w->started = 0;
}

void worker_destroy(worker *w)
{
    route_table *t;
    /* Order matters: requests are answered while the server, Redis and the
     * proxy still exist; Redis callbacks run (with failure) inside
     * hotclient_free. */
    if (w->srv) {
        w->aborted = 1;
        request_teardown(w); /* upstream calls and waits; releases via hc */
    }
    /* Records and settles Redis has not taken go to the spill file: after
     * a drain, as its last snapshot (replacing the one before whole, so
     * that a lease's ops are never replayed from two lists). */
    {
        spill_file *last = w->snap ? spill_snap_begin(w->snap) : NULL;
        if (last) hotclient_spill_to(w->hc, last);
        lease_table_shutdown(w->leases, last ? last : w->spill); /* answers the calls waiting */
        hotclient_free(w->hc); /* pending Redis callbacks answer their requests */
        w->hc = NULL;
        if (last) spill_snap_commit(w->snap, last);
        spill_snap_free(w->snap);
        w->snap = NULL;
    }
    spill_replay_free(w->replay);
    w->replay = NULL;
    spill_replay_free(w->own_replay);
    w->own_replay = NULL;
    if (w->spill_timer) event_free(w->spill_timer);
    if (w->beat_timer) event_free(w->beat_timer);
    spill_file_close(w->spill); /* fsync of the file and the directory */
    w->spill = NULL;
    lease_table_free(w->leases);
    w->leases = NULL;
    pgclient_free(w->pg); /* likewise for usage queries */
    w->pg = NULL;
    proxy_free(w->px);
    w->px = NULL;
    server_free(w->srv); /* closes the connections left */
    w->srv = NULL;
    if (w->notify_ev) event_free(w->notify_ev);
    if (w->notify_fd >= 0) close(w->notify_fd);
    if (w->drain_timer) event_free(w->drain_timer);
    authcache_free(&w->keys);
    if (w->routes) routes_unref(w->routes);
    t = atomic_exchange(&w->next_routes, NULL);
    if (t) routes_unref(t);
    if (w->base) event_base_free(w->base);
    memset(w, 0, sizeof *w);
}
