/* proxy.c: a small keep-alive HTTP/1.1 client on the worker's loop (see proxy.h).
 *
 * Owns the pool and the connection side of a call: connecting, the idle
 * list, the caps and the queue, sending, reading and parsing the response,
 * timeouts. The message side (request header lines, the framing tail,
 * which response headers are kept) is proxy_msg.c's.
 *
 * One call runs on one connection at a time (no pipelining). A connection is
 * busy (carrying a call, or connecting for one) or idle in P's pool. Idle
 * connections are reused LIFO, so the busiest few stay warm and the rest age
 * out: at most PROXY_IDLE_MAX are kept, each for PROXY_IDLE_MS (less if the
 * server announces a shorter Keep-Alive timeout). Every connection keeps one
 * persistent read watcher from connect to close, so reuse costs no epoll_ctl,
 * and an idle connection that turns readable (the server closed it, or sent
 * junk) is closed at once. A write watcher is added only while a request
 * does not fit in the socket buffer, or while connecting.
 *
 * At most max_conns connections are open per worker (UPSTREAM_MAX_CONNECTIONS,
 * default 1024), and at most PROXY_CONNECTING_MAX of them new: connecting,
 * or connected but without a first complete response yet. A call that finds
 * none idle and a cap reached waits in a FIFO queue (inside its own timeout)
 * and gets the next connection that comes free or the next slot: a burst is
 * slowed down, not failed. The second cap is for bursts of new connections
 * (a thousand clients arriving at once): opened all together they overflow
 * the upstream's accept queue, and each SYN dropped there costs its caller a
 * one-second retransmit (measured: the p99 of `make bench` with 1,000
 * connections). A connect that completes does not mean the server took the
 * connection off its accept queue (the kernel completes the handshake), so a
 * connection stays counted until its first answer: counting only connects
 * in progress still let about 70 SYNs a run be dropped once the gateway's
 * own server accepted clients faster.
 *
 * The request goes out with one sendmsg of iovecs pointing at the caller's
 * method, target and body, P's constant parts and the call's header lines:
 * nothing is copied. The response is read into a per-connection buffer
 * (PROXY_READ_BUF, grown only for a header line longer than that, up to the
 * head bound), parsed by http1.c, and copied out into the call: kept headers
 * into hdrs, the body into a buffer of exactly Content-Length bytes (or
 * grown up to max_body when the length is not known up front).
 *
 * Callbacks run only from this file's event handlers, as the last thing the
 * handler does with the call; a failure found while starting a call (inside
 * proxy_start, or while handing a freed connection to a queued call) is
 * reported through the call's timer event made active, so request.c is never
 * re-entered from its own calls into the proxy. */
#include "gateway/proxy_int.h"

#include "common/log.h"
#include "gateway/http1.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROXY_READ_BUF (16 * 1024)
#define PROXY_TARGET_MAX 8192 /* path prefix + request target */
#define PROXY_IDLE_MAX 256    /* idle ones kept */
#define PROXY_IDLE_MS 30000
#define PROXY_IDLE_TICK_MS 1000

enum {
    PROXY_CALL_IDLE,   /* not started, done or cancelled */
    PROXY_CALL_QUEUED, /* waiting for a connection */
    PROXY_CALL_ACTIVE, /* on a connection (connecting, writing or reading) */
    PROXY_CALL_FAILED, /* result set, callback due from the loop */
};

typedef struct proxy_conn {
    proxy *p;
    TAILQ_ENTRY(proxy_conn) link; /* P's idle list, most recently used first */
    proxy_call *call;             /* NULL while idle */
    int fd;                       /* -1 before the first socket; rev/wev assigned when >= 0 */
    int idle;
    int addr0, addr, tries; /* first address tried, current one, attempts */
    int connecting;
    int fresh;           /* counted in P's nfresh: no complete response yet */
    int writing;         /* wev added */
    unsigned served;     /* complete responses read: > 0 means a reused connection */
    uint64_t idle_until; /* monotonic ms, while idle */
    struct event rev, wev;
    struct buf rbuf; /* PROXY_READ_BUF, grown up to the head bound for a long line */
    http1_parser hp;
} proxy_conn;

struct proxy {
    struct event_base *base;
    const gw_upstream *up;
    int64_t max_body;
    int max_conns;
    int nfresh;                           /* new connections without an answer yet */
    char sp_prefix[CONFIG_URL_MAX + 2];   /* " " + path prefix */
    char http_host[CONFIG_HOST_MAX + 32]; /* " HTTP/1.1\r\nHost: <authority>\r\n" */
    size_t sp_prefix_len, http_host_len;
    int addr_next; /* the address the last connect succeeded on */
    TAILQ_HEAD(proxy_conn_list, proxy_conn) idle;
    int nidle, nconns;
    TAILQ_HEAD(proxy_call_list, proxy_call)
    running; /* every started call until done or cancelled */
    TAILQ_HEAD(proxy_wait_list, proxy_call) waiting; /* FIFO of calls waiting for a connection */
    struct event idle_timer;
    int idle_timer_on;
    int serving; /* inside proxy_serve_queue */
    int freeing;
    uint64_t connect_failures, timeouts; /* proxy_stats */
};

static uint64_t proxy_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ---- lists (sys/queue.h) ---------------------------------------------- */

static void proxy_idle_unlink(proxy *p, proxy_conn *k)
{
    TAILQ_REMOVE(&p->idle, k, link);
    k->idle = 0;
    p->nidle--;
}

static void proxy_idle_push(proxy *p, proxy_conn *k)
{
    TAILQ_INSERT_HEAD(&p->idle, k, link);
    k->idle = 1;
    p->nidle++;
}

static void proxy_enqueue(proxy *p, proxy_call *c)
{
    TAILQ_INSERT_TAIL(&p->waiting, c, qlink);
    c->state = PROXY_CALL_QUEUED;
}

static void proxy_unqueue(proxy *p, proxy_call *c)
{
    TAILQ_REMOVE(&p->waiting, c, qlink);
}

/* A started call is done or cancelled: off P's running list. */
static void proxy_call_stop(proxy *p, proxy_call *c)
{
    TAILQ_REMOVE(&p->running, c, link);
    c->state = PROXY_CALL_IDLE;
    event_del(&c->timer);
}

/* ---- ending a call ------------------------------------------------------ */

/* The call's callback, with RES. The last thing its caller does with C. */
static void proxy_call_finish(proxy_call *c, enum proxy_result res)
{
    proxy *p = c->p;
    c->result = res;
    proxy_call_stop(p, c);
    c->done(c->arg, c);
}

/* Reports RES from the loop soon, not from the current stack. C must be on
 * no connection and in no queue. */
static void proxy_call_fail_later(proxy_call *c, enum proxy_result res)
{
    c->result = res;
    c->state = PROXY_CALL_FAILED;
    event_del(&c->timer);
    event_active(&c->timer, EV_TIMEOUT, 1);
}

/* ---- connections ---------------------------------------------------- */

static void proxy_on_read(evutil_socket_t fd, short what, void *arg);
static void proxy_on_write(evutil_socket_t fd, short what, void *arg);

static void proxy_conn_close(proxy_conn *k)
{
    proxy *p = k->p;
    if (k->idle) proxy_idle_unlink(p, k);
    if (k->fd >= 0) {
        event_del(&k->rev);
        event_del(&k->wev);
        close(k->fd);
    }
    if (k->fresh) p->nfresh--;
    buf_free(&k->rbuf);
    free(k);
    p->nconns--;
}

static void proxy_conn_attach(proxy_conn *k, proxy_call *c)
{
    k->call = c;
    c->conn = k;
    c->state = PROXY_CALL_ACTIVE;
    c->sent = 0;
    c->got_bytes = 0;
    http1_init(&k->hp, c->head_request, PROXY_HEADERS_MAX, (uint64_t)k->p->max_body);
}

static void proxy_conn_detach(proxy_conn *k)
{
    if (k->call) k->call->conn = NULL;
    k->call = NULL;
}

/* New connections per worker (see the top of the file). */
#define PROXY_CONNECTING_MAX 64

/* A new connection may be opened now. */
static int proxy_can_connect(const proxy *p)
{
    return p->nconns < p->max_conns && p->nfresh < PROXY_CONNECTING_MAX;
}

/* Opens a socket to the next untried address and starts connecting.
 * 0, or -1 when no address is left (or no socket can be had). */
static int proxy_conn_open(proxy_conn *k)
{
    proxy *p = k->p;
    const gw_upstream *up = p->up;
    while (k->tries < up->naddr) {
        int i = (k->addr0 + k->tries++) % up->naddr;
        const struct sockaddr *sa = (const struct sockaddr *)&up->addr[i];
        int one = 1;
        int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            log_warn("upstream: socket: %s", strerror(errno));
            return -1;
        }
        /* Requests go out in one write and must not wait for an ACK. */
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
            log_debug("upstream: TCP_NODELAY: %s", strerror(errno));
        if (connect(fd, sa, up->addrlen[i]) != 0 && errno != EINPROGRESS && errno != EINTR) {
            log_debug("upstream: connect to address %d of %s: %s", i, up->host, strerror(errno));
            p->connect_failures++;
            close(fd);
            continue;
        }
        k->fd = fd;
        k->addr = i;
        k->connecting = 1;
        if (!k->fresh) {
            k->fresh = 1;
            p->nfresh++;
        }
        event_assign(&k->rev, p->base, fd, EV_READ | EV_PERSIST, proxy_on_read, k);
        event_assign(&k->wev, p->base, fd, EV_WRITE | EV_PERSIST, proxy_on_write, k);
        /* Writable means connected (or failed): see proxy_on_write. */
        if (event_add(&k->wev, NULL) != 0) {
            close(fd);
            k->fd = -1;
            return -1;
        }
        k->writing = 1;
        return 0;
    }
    return -1;
}

/* Puts C on a new connection. Never runs a callback: a failure here is
 * reported from the loop. */
static void proxy_connect(proxy *p, proxy_call *c)
{
    proxy_conn *k = calloc(1, sizeof *k);
    if (k) buf_init(&k->rbuf, PROXY_HEADERS_MAX);
    if (!k || buf_reserve_exact(&k->rbuf, PROXY_READ_BUF) != BUF_OK) {
        if (k) free(k);
        log_warn("upstream: out of memory for a connection");
        proxy_call_fail_later(c, PROXY_UNAVAILABLE);
        return;
    }
    k->p = p;
    k->fd = -1;
    k->addr0 = p->addr_next;
    p->nconns++;
    proxy_conn_attach(k, c);
    if (proxy_conn_open(k) != 0) {
        proxy_conn_detach(k);
        proxy_conn_close(k);
        proxy_call_fail_later(c, PROXY_UNAVAILABLE);
    }
}

/* Connections freed up: start queued calls on new ones. */
static void proxy_serve_queue(proxy *p)
{
    if (p->serving || p->freeing) return;
    p->serving = 1;
    while (!TAILQ_EMPTY(&p->waiting) && proxy_can_connect(p)) {
        proxy_call *c = TAILQ_FIRST(&p->waiting);
        proxy_unqueue(p, c);
        proxy_connect(p, c);
    }
    p->serving = 0;
}

/* Writes what is left of the request. 0 when all is written or the rest
 * waits for writability; -1 (errno set) on error. */
static int proxy_conn_send(proxy_conn *k)
{
    proxy_call *c = k->call;
    while (c->sent < c->req_len) {
        struct iovec iov[PROXY_CALL_IOV];
        struct msghdr m;
        size_t skip = c->sent;
        int n = 0;
        ssize_t w;
        for (int i = 0; i < PROXY_CALL_IOV; i++) {
            if (skip >= c->iov[i].iov_len) {
                skip -= c->iov[i].iov_len;
                continue;
            }
            iov[n].iov_base = (char *)c->iov[i].iov_base + skip;
            iov[n].iov_len = c->iov[i].iov_len - skip;
            skip = 0;
            n++;
        }
        memset(&m, 0, sizeof m);
        m.msg_iov = iov;
        m.msg_iovlen = (size_t)n;
        /* MSG_NOSIGNAL: a closed peer is an error here, not a SIGPIPE. */
        w = sendmsg(k->fd, &m, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
            if (!k->writing && event_add(&k->wev, NULL) != 0) return -1;
            k->writing = 1;
            return 0;
        }
        c->sent += (size_t)w;
        if (w > 0) c->written = 1;
    }
    if (k->writing) {
        event_del(&k->wev);
        k->writing = 0;
    }
    return 0;
}

/* Closes K, which failed (ERR: errno, or 0 for end of file) while carrying
 * its call, and retries the call once on a new connection when that is safe.
 *
 * A keep-alive connection can be closed by the server at any moment it is
 * idle (its idle timeout, a restart), and we can pick it for a call just
 * before we see that. Such a failure is recognisable: the connection was
 * reused and not one byte of the response arrived. The usual answer
 * (browsers, curl) is to send the request again on a new connection. But
 * this gateway bills calls, and the same symptom is also what a server shows
 * when it read the request, acted on it and died before answering: a door
 * opened twice for one charge. So the retry is limited:
 *   - idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE): retried,
 *     since a second execution does what the first one did;
 *   - other methods (POST, PATCH, ...): retried only if the kernel took none
 *     of the request before the error, i.e. the upstream cannot have seen it.
 *     To make that case the common one, such a call checks an idle
 *     connection for a pending close before writing on it (proxy_dispatch).
 * The cost: a POST that meets the remaining race (the server closes just as
 * we write) fails with 502 and is not charged; the caller may retry it. Only
 * one retry, and never after a response byte, so a call is never sent more
 * than twice and a partial answer is never replayed.
 *
 * DEFER: report the failure from the loop (we are inside another call's
 * processing). */
static void proxy_conn_failed(proxy_conn *k, int err, int defer)
{
    proxy *p = k->p;
    proxy_call *c = k->call;
    int retry = k->served > 0 && !c->got_bytes && !c->retried && (c->replayable || c->sent == 0);
    log_debug("upstream: %s on a %s connection after %zu of %zu request bytes%s",
              err ? strerror(err) : "connection closed", k->served ? "reused" : "new", c->sent,
              c->req_len, retry ? ": retrying on a new connection" : "");
    proxy_conn_detach(k);
    proxy_conn_close(k);
    if (retry) {
        c->retried = 1;
        proxy_connect(p, c); /* takes the slot K freed */
        proxy_serve_queue(p);
        return;
    }
    proxy_serve_queue(p);
    if (defer)
        proxy_call_fail_later(c, PROXY_UNAVAILABLE);
    else
        proxy_call_finish(c, PROXY_UNAVAILABLE);
}

/* Ends K's call with RES and closes K (its state is unknown). */
static void proxy_conn_end(proxy_conn *k, enum proxy_result res)
{
    proxy *p = k->p;
    proxy_call *c = k->call;
    proxy_conn_detach(k);
    proxy_conn_close(k);
    proxy_serve_queue(p);
    proxy_call_finish(c, res);
}

/* After a complete response on K: give it to a queued call, keep it idle,
 * or close it. KEEPALIVE_S: the server's Keep-Alive timeout, 0 if none. */
static void proxy_conn_release(proxy_conn *k, unsigned keepalive_s)
{
    proxy *p = k->p;
    int64_t idle_ms = PROXY_IDLE_MS;
    /* A first answer: the server took the connection, its slot is free
     * (see the top of the file). */
    int proven = k->fresh;
    if (proven) {
        k->fresh = 0;
        p->nfresh--;
    }
    k->served++;
    buf_reset(&k->rbuf);
    buf_shrink(&k->rbuf, PROXY_READ_BUF); /* grown for a long header line */
    if (!TAILQ_EMPTY(&p->waiting) && !p->freeing) {
        proxy_call *c = TAILQ_FIRST(&p->waiting);
        proxy_unqueue(p, c);
        proxy_conn_attach(k, c);
        if (proxy_conn_send(k) != 0) proxy_conn_failed(k, errno, 1);
        if (proven) proxy_serve_queue(p); /* K took the first; the slot, the next */
        return;
    }
    /* Leave a second of margin before the server's own timeout. */
    if (keepalive_s > 0 && (int64_t)keepalive_s * 1000 - 1000 < idle_ms)
        idle_ms = (int64_t)keepalive_s * 1000 - 1000;
    if (idle_ms <= 0) {
        proxy_conn_close(k);
        return;
    }
    if (p->nidle >= PROXY_IDLE_MAX) /* the longest idle */
        proxy_conn_close(TAILQ_LAST(&p->idle, proxy_conn_list));
    proxy_idle_push(p, k);
    k->idle_until = proxy_now_ms() + (uint64_t)idle_ms;
    if (!p->idle_timer_on) {
        struct timeval tv = {PROXY_IDLE_TICK_MS / 1000, (PROXY_IDLE_TICK_MS % 1000) * 1000};
        p->idle_timer_on = evtimer_add(&p->idle_timer, &tv) == 0;
    }
}

/* The response on K is complete. LEFTOVER: bytes followed it. */
static void proxy_conn_complete(proxy_conn *k, int leftover)
{
    proxy *p = k->p;
    proxy_call *c = k->call;
    /* Bytes after the response, or a request not fully written (the server
     * answered early): the connection's state is not one we can reuse.
     *
     * Bytes that come after we looked are the harder case: a server that
     * sends a HEAD's body, or content after a 204 or 304, in a later write
     * would have them read as the next call's response, which may be another
     * client's, and billed to it. http1.c never lets a connection be reused
     * after such a bodiless answer, the only place where honest servers get
     * framing wrong often enough to matter; those calls pay a new connection.
     * We do not instead recv(MSG_PEEK) before every reuse: that is a syscall
     * on every call's hot path, and it would still miss bytes that arrive
     * just after it (the read watcher of an idle connection closes it if
     * they arrive later, see proxy_on_read). */
    int reuse = k->hp.keep_alive && !leftover && c->sent == c->req_len;
    unsigned keepalive_s = k->hp.keepalive_s;
    proxy_conn_detach(k);
    if (reuse)
        proxy_conn_release(k, keepalive_s);
    else
        proxy_conn_close(k);
    proxy_serve_queue(p);
    proxy_call_finish(c, PROXY_OK);
}

/* Parses what K has read. 0: more is needed; 1: the call ended (K may be
 * gone). */
static int proxy_conn_parse(proxy_conn *k)
{
    proxy_call *c = k->call;
    size_t off = 0, used;
    http1_event ev;
    for (;;) {
        enum http1_ev e = http1_next(&k->hp, k->rbuf.p + off, k->rbuf.len - off, &used, &ev);
        off += used;
        switch (e) {
        case HTTP1_MORE:
            if (off > 0) memmove(k->rbuf.p, k->rbuf.p + off, k->rbuf.len - off);
            k->rbuf.len -= off;
            return 0;
        case HTTP1_HEADER:
            if (proxy_call_keep_header(c, &ev) != 0) goto oom;
            continue;
        case HTTP1_HEAD_DONE:
            c->status = k->hp.status;
            c->content_length = k->hp.content_length;
            if (c->conn_listed) proxy_call_drop_listed(c);
            /* A known length is allocated once, exactly. The parser has
             * checked max_body, the body's bound too: a refusal here is
             * the allocator's. */
            if (k->hp.framing == HTTP1_LENGTH &&
                buf_reserve_exact(&c->body, (size_t)k->hp.content_length) != BUF_OK)
                goto oom;
            continue;
        case HTTP1_BODY:
            if (buf_append(&c->body, ev.data, ev.len) != BUF_OK) goto oom;
            continue;
        case HTTP1_DONE:
            proxy_conn_complete(k, off < k->rbuf.len);
            return 1;
        case HTTP1_TOO_LARGE:
            log_debug("upstream: response too large");
            proxy_conn_end(k, PROXY_TOO_LARGE);
            return 1;
        default:
            log_warn("upstream: malformed response (status %d)", k->hp.status);
            proxy_conn_end(k, PROXY_UNAVAILABLE);
            return 1;
        }
    }
oom:
    log_warn("upstream: out of memory for a response");
    proxy_conn_end(k, PROXY_UNAVAILABLE);
    return 1;
}

static void proxy_on_read(evutil_socket_t fd, short what, void *arg)
{
    proxy_conn *k = arg;
    proxy_call *c = k->call;
    if (!c) {
        /* Idle and readable: the server closed it (end of file or reset)
         * or sent bytes nobody asked for. It cannot carry a call. */
        proxy_conn_close(k);
        return;
    }
    if (k->connecting) return; /* the write watcher reports the connect */
    for (;;) {
        size_t room;
        ssize_t n;
        /* Full with a partial line: grown, within the head bound (http1.c
         * fails a longer line first). */
        if (k->rbuf.len == k->rbuf.cap && buf_reserve(&k->rbuf, 1) != BUF_OK) {
            proxy_conn_end(k, PROXY_TOO_LARGE);
            return;
        }
        room = k->rbuf.cap - k->rbuf.len;
        n = recv(fd, k->rbuf.p + k->rbuf.len, room, 0);
        if (n > 0) {
            c->got_bytes = 1;
            k->rbuf.len += (size_t)n;
            if (proxy_conn_parse(k) != 0) return;
            if ((size_t)n < room) return; /* drained, most likely: wait for the next event */
            continue;
        }
        if (n == 0) {
            /* End of file ends a close-delimited body, and nothing else. */
            enum http1_ev e = http1_eof(&k->hp);
            if (e == HTTP1_DONE)
                proxy_conn_complete(k, 0);
            else if (c->got_bytes)
                proxy_conn_end(k, e == HTTP1_TOO_LARGE ? PROXY_TOO_LARGE : PROXY_UNAVAILABLE);
            else
                proxy_conn_failed(k, 0, 0);
            return;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        proxy_conn_failed(k, errno, 0);
        return;
    }
}

static void proxy_on_write(evutil_socket_t fd, short what, void *arg)
{
    proxy_conn *k = arg;
    proxy *p = k->p;
    if (!k->call) { /* cannot happen: idle connections have no write watcher */
        proxy_conn_close(k);
        return;
    }
    if (k->connecting) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
        if (err != 0) {
            log_debug("upstream: connect to address %d of %s: %s", k->addr, p->up->host,
                      strerror(err));
            p->connect_failures++;
            event_del(&k->rev);
            event_del(&k->wev);
            close(k->fd);
            k->fd = -1;
            k->writing = 0;
            if (proxy_conn_open(k) == 0) return; /* the next address */
            proxy_conn_end(k, PROXY_UNAVAILABLE);
            return;
        }
        k->connecting = 0;
        p->addr_next = k->addr;
        if (event_add(&k->rev, NULL) != 0) {
            proxy_conn_end(k, PROXY_UNAVAILABLE);
            return;
        }
    }
    if (proxy_conn_send(k) != 0) proxy_conn_failed(k, errno, 0);
}

/* 0 if an idle connection shows no sign of having been closed. */
static int proxy_conn_alive(proxy_conn *k)
{
    char b;
    ssize_t n = recv(k->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

/* Puts C on an idle connection, a new one, or in the queue. */
static void proxy_dispatch(proxy *p, proxy_call *c)
{
    proxy_conn *k;
    while ((k = TAILQ_FIRST(&p->idle)) != NULL) {
        proxy_idle_unlink(p, k);
        /* A call that may not be replayed checks for a close first: one
         * syscall that turns the usual stale-connection race into a clean
         * retry-free fallback (see proxy_conn_failed). */
        if (!c->replayable && !proxy_conn_alive(k)) {
            proxy_conn_close(k);
            continue;
        }
        proxy_conn_attach(k, c);
        if (proxy_conn_send(k) != 0) proxy_conn_failed(k, errno, 1);
        return;
    }
    if (proxy_can_connect(p))
        proxy_connect(p, c);
    else
        proxy_enqueue(p, c);
}

/* ---- timers ----------------------------------------------------------- */

static void proxy_on_call_timer(evutil_socket_t fd, short what, void *arg)
{
    proxy_call *c = arg;
    proxy *p = c->p;
    if (c->state == PROXY_CALL_FAILED) {
        proxy_call_finish(c, c->result);
        return;
    }
    if (c->state == PROXY_CALL_QUEUED) {
        proxy_unqueue(p, c);
    } else if (c->conn) {
        proxy_conn *k = c->conn;
        proxy_conn_detach(k);
        proxy_conn_close(k);
        proxy_serve_queue(p);
    }
    log_debug("upstream: call timed out");
    p->timeouts++;
    proxy_call_finish(c, PROXY_TIMEOUT);
}

static void proxy_on_idle_timer(evutil_socket_t fd, short what, void *arg)
{
    proxy *p = arg;
    uint64_t now = proxy_now_ms();
    proxy_conn *k, *next;
    p->idle_timer_on = 0;
    for (k = TAILQ_FIRST(&p->idle); k; k = next) {
        next = TAILQ_NEXT(k, link);
        if (k->idle_until <= now) proxy_conn_close(k);
    }
    if (!TAILQ_EMPTY(&p->idle)) {
        struct timeval tv = {PROXY_IDLE_TICK_MS / 1000, (PROXY_IDLE_TICK_MS % 1000) * 1000};
        p->idle_timer_on = evtimer_add(&p->idle_timer, &tv) == 0;
    }
}

/* ---- the API ---------------------------------------------------------- */

int proxy_new(struct event_base *base, const gw_upstream *up, int64_t max_body, int max_conns,
              proxy **out)
{
    proxy *p = calloc(1, sizeof *p);
    int n;
    if (!p) return -1;
    TAILQ_INIT(&p->idle);
    TAILQ_INIT(&p->running);
    TAILQ_INIT(&p->waiting);
    p->base = base;
    p->up = up;
    p->max_body = max_body;
    p->max_conns = max_conns > 0 ? max_conns : 1;
    n = snprintf(p->sp_prefix, sizeof p->sp_prefix, " %s", up->prefix);
    if (n < 0 || (size_t)n >= sizeof p->sp_prefix) goto fail;
    p->sp_prefix_len = (size_t)n;
    n = snprintf(p->http_host, sizeof p->http_host, " HTTP/1.1\r\nHost: %s\r\n", up->authority);
    if (n < 0 || (size_t)n >= sizeof p->http_host) goto fail;
    p->http_host_len = (size_t)n;
    evtimer_assign(&p->idle_timer, base, proxy_on_idle_timer, p);
    *out = p;
    return 0;
fail:
    free(p);
    return -1;
}

void proxy_get_stats(const proxy *p, proxy_stats *out)
{
    out->active = p->nconns - p->nidle;
    out->idle = p->nidle;
    out->connect_failures = p->connect_failures;
    out->timeouts = p->timeouts;
}

void proxy_free(proxy *p)
{
    if (!p) return;
    p->freeing = 1; /* no queued call is started from here on */
    while (!TAILQ_EMPTY(&p->running))
        proxy_cancel(TAILQ_FIRST(&p->running));
    while (!TAILQ_EMPTY(&p->idle))
        proxy_conn_close(TAILQ_FIRST(&p->idle));
    event_del(&p->idle_timer);
    free(p);
}

int proxy_start(proxy *p, proxy_call *c, const char *target, const char *method, const char *body,
                size_t body_len, int64_t timeout_ms, proxy_done_cb done, void *arg)
{
    size_t tlen = strlen(target), mlen = strlen(method), tail_len;
    struct timeval tv = {(time_t)(timeout_ms / 1000), (suseconds_t)((timeout_ms % 1000) * 1000)};
    int with_length;

    if (c->state != PROXY_CALL_IDLE || !http1_token(method, mlen)) return -1;
    /* The target goes on the request line verbatim: printable ASCII only,
     * so nothing a client sent can split or extend that line. */
    if (tlen == 0 || target[0] != '/' || p->sp_prefix_len + tlen > PROXY_TARGET_MAX ||
        !http1_target_ok(target, tlen))
        return -1;

    /* Zeroed by the caller, or cleared: the bounds before the first byte. */
    if (!c->hdrs.p) buf_init(&c->hdrs, PROXY_HEADERS_MAX);
    if (!c->body.p) buf_init(&c->body, (size_t)p->max_body);
    c->p = p;
    c->done = done;
    c->arg = arg;
    c->status = 0;
    c->content_length = -1;
    c->conn_listed = 0;
    c->retried = 0;
    c->written = 0;
    c->head_request = strcmp(method, "HEAD") == 0;
    c->replayable = proxy_idempotent(method);
    /* As curl did: methods that carry content always say how much. */
    with_length = body_len > 0 || strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0 ||
                  strcmp(method, "PATCH") == 0;
    if (with_length) {
        tail_len = proxy_length_tail(c->tail, body_len);
    } else {
        memcpy(c->tail, "\r\n", 2);
        tail_len = 2;
    }
    c->iov[0] = (struct iovec){(void *)method, mlen};
    c->iov[1] = (struct iovec){p->sp_prefix, p->sp_prefix_len};
    c->iov[2] = (struct iovec){(void *)target, tlen};
    c->iov[3] = (struct iovec){p->http_host, p->http_host_len};
    c->iov[4] = (struct iovec){c->req_hdrs.p, c->req_hdrs.len};
    c->iov[5] = (struct iovec){c->tail, tail_len};
    c->iov[6] = (struct iovec){(void *)body, body ? body_len : 0};
    c->req_len = 0;
    for (int i = 0; i < PROXY_CALL_IOV; i++)
        c->req_len += c->iov[i].iov_len;

    evtimer_assign(&c->timer, p->base, proxy_on_call_timer, c);
    if (evtimer_add(&c->timer, &tv) != 0) return -1;
    TAILQ_INSERT_HEAD(&p->running, c, link);
    c->state = PROXY_CALL_ACTIVE; /* until dispatched: proxy_dispatch sets the real state */
    proxy_dispatch(p, c);
    return 0;
}

int proxy_call_written(const proxy_call *c)
{
    return c->written;
}

void proxy_cancel(proxy_call *c)
{
    proxy *p = c->p;
    if (c->state == PROXY_CALL_IDLE) return;
    if (c->state == PROXY_CALL_QUEUED) {
        proxy_unqueue(p, c);
    } else if (c->conn) {
        proxy_conn *k = c->conn;
        proxy_conn_detach(k);
        proxy_conn_close(k);
    }
    proxy_call_stop(p, c);
    proxy_serve_queue(p);
}
