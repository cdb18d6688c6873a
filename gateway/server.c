/* server.c: the HTTP/1.1 server on the worker's loop (see server.h): the
 * listening socket and accepting, the timeout sweep, setup, quiesce and
 * teardown. Does not own a connection's life (reading, framing, answers,
 * closing): server_conn.c does; this file hands it each accepted socket
 * and closes what passed a deadline.
 *
 * Timeouts cost no timer per connection: each state with a deadline has a
 * list ordered by the time the connection entered it (all share one
 * duration), and a per-worker tick closes what has passed its deadline. */
#include "gateway/server_int.h"

#include "gateway/worker.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- accepting ------------------------------------------------------- */

static void server_on_backoff(evutil_socket_t fd, short what, void *arg)
{
    server *s = arg;
    if (s->lev && event_add(s->lev, NULL) != 0) log_error("cannot watch the listening socket");
}

static void server_on_accept(evutil_socket_t lfd, short what, void *arg)
{
    server *s = arg;
    for (int i = 0; i < SERVER_ACCEPT_BATCH; i++) {
        struct sockaddr_storage peer;
        socklen_t len = sizeof peer;
        int fd;
        memset(&peer, 0, sizeof peer);
        fd = accept4(lfd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* The socket stays readable (level-triggered): without a
                 * pause this would spin until a descriptor frees up. */
                struct timeval tv = {0, SERVER_BACKOFF_MS * 1000};
                log_warn("accept: %s; pausing accepts", strerror(errno));
                event_del(s->lev);
                evtimer_add(s->backoff, &tv);
            } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
                log_warn("accept: %s", strerror(errno));
            }
            return;
        }
        /* Over the limit: accepted and closed at once, so the client learns
         * now instead of waiting in a backlog that SO_REUSEPORT would not
         * hand to another worker anyway. */
        if (s->nconns >= s->cfg->max_connections) {
            close(fd);
            continue;
        }
        server_conn_new(s, fd, &peer);
    }
}

/* ---- the timeout sweep ----------------------------------------------- */

static void server_on_tick(evutil_socket_t fd, short what, void *arg)
{
    server *s = arg;
    uint64_t now = worker_now_ms();
    for (int l = 0; l < L_NONE; l++) {
        server_conn *c;
        while ((c = TAILQ_FIRST(&s->lists[l])) && now - c->since_ms >= s->timeout_ms[l]) {
            if (l == L_BODY) {
                server_body_timeout(c, now);
                continue;
            }
            if (l == L_HEAD && c->in_len > 0 && log_limit_ok(&s->log, now, SERVER_LOG_PER_SEC))
                log_info("client connection: request head not complete within %llu ms; closing",
                         (unsigned long long)s->timeout_ms[l]);
            server_close(c);
        }
    }
}

/* ---- setup and teardown ---------------------------------------------- */

static int server_listen(const gw_config *cfg)
{
    struct addrinfo hints, *res = NULL;
    char port[16];
    int fd = -1, one = 1, rc;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    snprintf(port, sizeof port, "%d", cfg->listen_port);
    rc = getaddrinfo(cfg->listen_host, port, &hints, &res);
    if (rc != 0 || !res) {
        log_error("GATEWAY_LISTEN host %s: %s", cfg->listen_host, gai_strerror(rc));
        goto fail;
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) goto fail_errno;
    /* One listening socket per worker on the same port: the kernel spreads
     * new connections over them. */
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
        bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 1024) != 0)
        goto fail_errno;
    freeaddrinfo(res);
    return fd;
fail_errno:
    log_error("cannot listen on %s:%d: %s", cfg->listen_host, cfg->listen_port, strerror(errno));
fail:
    if (fd >= 0) close(fd);
    if (res) freeaddrinfo(res);
    return -1;
}

int server_new(struct worker *w, const gw_config *cfg, server **out)
{
    server *s = calloc(1, sizeof *s);
    uint64_t tick_ms;
    struct timeval tv;
    if (!s) goto oom;
    for (int l = 0; l < L_COUNT; l++)
        TAILQ_INIT(&s->lists[l]);
    s->w = w;
    s->cfg = cfg;
    s->base = w->base;
    s->timeout_ms[L_IDLE] = SERVER_IDLE_TIMEOUT_MS;
    s->timeout_ms[L_HEAD] = (uint64_t)cfg->head_timeout_ms;
    s->timeout_ms[L_IO] = SERVER_IO_TIMEOUT_MS;
    s->timeout_ms[L_BODY] = (uint64_t)cfg->body_timeout_ms;
    s->timeout_ms[L_LINGER] = SERVER_LINGER_MS;
    s->early_close = (event_base_get_features(s->base) & EV_FEATURE_EARLY_CLOSE) != 0;
    s->lfd = server_listen(cfg);
    if (s->lfd < 0) {
        free(s);
        return -1;
    }
    s->lev = event_new(s->base, s->lfd, EV_READ | EV_PERSIST, server_on_accept, s);
    s->backoff = evtimer_new(s->base, server_on_backoff, s);
    s->tick = event_new(s->base, -1, EV_PERSIST, server_on_tick, s);
    /* A second's precision is plenty for these timeouts, unless the head
     * timeout is set shorter (tests). */
    tick_ms = (uint64_t)(cfg->head_timeout_ms < cfg->body_timeout_ms ? cfg->head_timeout_ms
                                                                     : cfg->body_timeout_ms) /
              4;
    if (tick_ms > 1000) tick_ms = 1000;
    if (tick_ms < 10) tick_ms = 10;
    tv.tv_sec = (time_t)(tick_ms / 1000);
    tv.tv_usec = (suseconds_t)((tick_ms % 1000) * 1000);
    if (!s->lev || !s->backoff || !s->tick || event_add(s->lev, NULL) != 0 ||
        event_add(s->tick, &tv) != 0) {
        server_free(s);
        goto oom;
    }
    *out = s;
    return 0;
oom:
    log_error("server: out of memory");
    return -1;
}

static void server_close_listener(server *s)
{
    if (s->lev) event_free(s->lev);
    s->lev = NULL;
    if (s->backoff) evtimer_del(s->backoff);
    if (s->lfd >= 0) close(s->lfd);
    s->lfd = -1;
}

void server_quiesce(server *s)
{
    server_conn *c, *next;
    if (s->stopping) return;
    s->stopping = 1;
    /* Connections still in the listen queue are reset by the close, as
     * MHD's quiesce did; new ones are refused. */
    server_close_listener(s);
    while ((c = TAILQ_FIRST(&s->lists[L_IDLE])) != NULL)
        server_close(c);
    for (c = TAILQ_FIRST(&s->lists[L_HEAD]); c; c = next) {
        next = TAILQ_NEXT(c, link);
        if (c->in_len == 0) server_close(c); /* connected, nothing sent yet */
    }
}

int server_writing(const server *s)
{
    /* Lingering connections too: closing them early would reset the
     * answer they were just sent (see server_end). */
    return s->nwriting + !TAILQ_EMPTY(&s->lists[L_LINGER]);
}

void server_free(server *s)
{
    if (!s) return;
    for (int l = 0; l < L_COUNT; l++)
        while (!TAILQ_EMPTY(&s->lists[l]))
            server_close(TAILQ_FIRST(&s->lists[l]));
    server_close_listener(s);
    if (s->backoff) event_free(s->backoff);
    if (s->tick) event_free(s->tick);
    free(s);
}
