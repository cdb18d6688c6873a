/* worker.c: per-thread event loop and the libmicrohttpd glue (see worker.h).
 *
 * MHD runs in external mode with its own epoll set (MHD_USE_EPOLL): the loop
 * watches MHD's epoll fd and calls MHD_run when it is readable, and arms a
 * timer from MHD_get_timeout after every run. A resumed connection needs an
 * MHD_run to be processed; MHD signals it through its ITC (in the epoll set)
 * and worker_kick also schedules a run, so neither path can be missed. */
#include "gateway/worker.h"

#include "billing/log.h"
#include "gateway/request.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define WORKER_DRAIN_TICK_MS 20
#define WORKER_IDLE_TIMEOUT_S 60
#define WORKER_CONN_MEMORY (16 * 1024)
#define WORKER_AUTHCACHE_SLOTS 16384
#define WORKER_PG_TIMEOUT_MS 5000
#define WORKER_GONE_ARM_MS 100 /* see request_suspend */

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

static void worker_run_mhd(worker *w)
{
    MHD_UNSIGNED_LONG_LONG to;
    if (!w->mhd) return;
    MHD_run(w->mhd);
    if (MHD_get_timeout(w->mhd, &to) == MHD_YES) {
        struct timeval tv = {(time_t)(to / 1000), (suseconds_t)((to % 1000) * 1000)};
        evtimer_add(w->mhd_timer, &tv);
    } else {
        evtimer_del(w->mhd_timer);
    }
}

static void worker_on_mhd(evutil_socket_t fd, short what, void *arg)
{
    worker_run_mhd(arg);
}

void worker_kick(worker *w)
{
    event_active(w->mhd_kick, EV_TIMEOUT, 0);
}

static void *worker_on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
    return request_new(cls, uri);
}

static enum MHD_Result worker_on_access(void *cls, struct MHD_Connection *conn, const char *url,
                                        const char *method, const char *version,
                                        const char *upload_data, size_t *upload_data_size,
                                        void **con_cls)
{
    if (!*con_cls) return MHD_NO; /* request_new failed: close the connection */
    return request_handle(*con_cls, conn, method, upload_data, upload_data_size);
}

static void worker_on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                                enum MHD_RequestTerminationCode toe)
{
    if (*con_cls) request_completed(*con_cls);
    *con_cls = NULL;
}

static void worker_on_stop(worker *w);

static void worker_take_routes(worker *w)
{
    route_table *t = atomic_exchange(&w->next_routes, NULL);
    if (!t) return;
    /* Requests in flight keep their reference to the old table. */
    routes_unref(w->routes);
    w->routes = t;
    log_info("worker %d: routes reloaded (%zu routes)", w->idx, t->n);
}

static void worker_on_drain(evutil_socket_t fd, short what, void *arg)
{
    worker *w = arg;
    uint64_t elapsed = worker_now_ms() - w->stop_ms;
    /* Past the longest a call can legitimately take, fail what is left. */
    uint64_t grace = (uint64_t)w->cfg->upstream_timeout_ms + 2000;
    if (grace > 15000) grace = 15000;
    if (w->inflight == 0 && hotclient_busy(w->hc) == 0) {
        event_base_loopexit(w->base, NULL);
        return;
    }
    if (elapsed > grace && !w->aborted) {
        log_warn("worker %d: %d calls still in flight at shutdown, failing them", w->idx,
                 w->inflight);
        w->aborted = 1;
        request_abort_all(w);
    }
    if (w->inflight == 0 && (elapsed > grace + 2000 || !hotclient_up(w->hc))) {
        event_base_loopexit(w->base, NULL);
        return;
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
    MHD_socket ls;
    if (w->stopping) return;
    w->stopping = 1;
    w->stop_ms = worker_now_ms();
    /* Stop accepting; connections already open are still served. */
    ls = MHD_quiesce_daemon(w->mhd);
    if (ls != MHD_INVALID_SOCKET) close(ls);
    event_add(w->drain_timer, &tick);
}

static int worker_resolve(const gw_config *cfg, struct sockaddr_storage *ss, int *ipv6)
{
    struct addrinfo hints, *res = NULL;
    char port[16];
    int rc;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    snprintf(port, sizeof port, "%d", cfg->listen_port);
    rc = getaddrinfo(cfg->listen_host, port, &hints, &res);
    if (rc != 0 || !res) {
        log_error("GATEWAY_LISTEN host %s: %s", cfg->listen_host, gai_strerror(rc));
        return -1;
    }
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *ipv6 = res->ai_family == AF_INET6;
    freeaddrinfo(res);
    return 0;
}

int worker_init(worker *w, int idx, const gw_config *cfg, route_table *routes)
{
    struct sockaddr_storage ss;
    const union MHD_DaemonInfo *di;
    int ipv6 = 0;

    memset(w, 0, sizeof *w);
    w->notify_fd = -1;
    w->rnd_used = sizeof w->rnd; /* drawn on first use */
    w->idx = idx;
    w->cfg = cfg;
    w->routes = routes;
    atomic_init(&w->next_routes, NULL);
    if (worker_resolve(cfg, &ss, &ipv6) != 0) return -1;
    w->base = event_base_new();
    if (!w->base) goto oom;
    w->mhd_timer = evtimer_new(w->base, worker_on_mhd, w);
    w->mhd_kick = event_new(w->base, -1, 0, worker_on_mhd, w);
    w->drain_timer = event_new(w->base, -1, EV_PERSIST, worker_on_drain, w);
    w->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->notify_fd < 0) goto oom;
    w->notify_ev = event_new(w->base, w->notify_fd, EV_READ | EV_PERSIST, worker_on_notify, w);
    if (!w->mhd_timer || !w->mhd_kick || !w->notify_ev || !w->drain_timer ||
        event_add(w->notify_ev, NULL) != 0)
        goto oom;
    {
        struct timeval tv = {0, WORKER_GONE_ARM_MS * 1000};
        /* Many requests share this duration: O(1) queue instead of the heap. */
        w->gone_arm_tv = event_base_init_common_timeout(w->base, &tv);
        if (!w->gone_arm_tv) goto oom;
    }
    if (authcache_init(&w->keys, WORKER_AUTHCACHE_SLOTS) != 0) goto oom;
    if (proxy_new(w->base, &cfg->up, cfg->max_body, (int)cfg->upstream_max_conns, &w->px) != 0)
        goto oom;
    /* These two resolve their host names (and say so when that fails). */
    if (hotclient_new(w->base, cfg->redis_host, cfg->redis_port, cfg->redis_db, &w->hc) != 0) {
        log_error("worker %d: cannot set up its Redis client", idx);
        return -1;
    }
    if (pgclient_new(w->base, cfg->database_url, WORKER_PG_TIMEOUT_MS, &w->pg) != 0) {
        log_error("worker %d: cannot set up its Postgres client", idx);
        return -1;
    }
    w->mhd = MHD_start_daemon(
        MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG | (ipv6 ? MHD_USE_IPv6 : 0),
        (uint16_t)cfg->listen_port, NULL, NULL, worker_on_access, w, MHD_OPTION_SOCK_ADDR,
        (struct sockaddr *)&ss, MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned int)1,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned int)cfg->max_connections,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)WORKER_IDLE_TIMEOUT_S,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)WORKER_CONN_MEMORY,
        MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned int)1024, MHD_OPTION_URI_LOG_CALLBACK,
        worker_on_uri, w, MHD_OPTION_NOTIFY_COMPLETED, worker_on_completed, w, MHD_OPTION_END);
    if (!w->mhd) {
        log_error("cannot listen on %s:%d", cfg->listen_host, cfg->listen_port);
        return -1;
    }
    di = MHD_get_daemon_info(w->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    if (!di) {
        log_error("MHD has no epoll fd");
        return -1;
    }
    w->mhd_ev = event_new(w->base, di->epoll_fd, EV_READ | EV_PERSIST, worker_on_mhd, w);
    if (!w->mhd_ev || event_add(w->mhd_ev, NULL) != 0) goto oom;
    return 0;
oom:
    log_error("worker %d: out of memory", idx);
    return -1;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    worker_run_mhd(w);
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
    /* Order matters: requests are answered while MHD, Redis and the proxy
     * still exist; Redis callbacks run (with failure) inside hotclient_free. */
    if (w->mhd) {
        w->aborted = 1;
        request_abort_all(w); /* upstream calls and waits; releases via hc */
    }
    hotclient_free(w->hc); /* pending Redis callbacks answer their requests */
    w->hc = NULL;
    pgclient_free(w->pg); /* likewise for usage queries */
    w->pg = NULL;
    proxy_free(w->px);
    w->px = NULL;
    if (w->mhd) MHD_stop_daemon(w->mhd);
    w->mhd = NULL;
    if (w->mhd_ev) event_free(w->mhd_ev);
    if (w->mhd_timer) event_free(w->mhd_timer);
    if (w->mhd_kick) event_free(w->mhd_kick);
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
