/* proxy.h: upstream HTTP/1.1 calls on the worker's libevent loop.
 *
 * Owns the per-worker keep-alive pool of connections to the one upstream
 * (connect, reuse, idle expiry, the bound on their number and the queue of
 * calls waiting for one), writing requests, reading responses through
 * http1.c within the configured bounds, and per-call timeouts. Does not
 * know about billing, routes or clients: request.c builds the call (target,
 * header lines, body) and reads the result. Does not resolve names: the
 * addresses come resolved from config.c. Single-threaded: used only by its
 * worker thread. */
#ifndef GATEWAY_PROXY_H
#define GATEWAY_PROXY_H

#include "common/buf.h"
#include "gateway/config.h"

#include <event2/event.h>
#include <event2/event_struct.h>
#include <stddef.h>
#include <sys/queue.h>
#include <stdint.h>
#include <sys/uio.h>

typedef struct proxy proxy;
struct proxy_conn;

enum proxy_result {
    PROXY_OK,          /* an HTTP answer, any status */
    PROXY_UNAVAILABLE, /* connection refused or reset, malformed response */
    PROXY_TIMEOUT,
    PROXY_TOO_LARGE, /* response headers or body past the limit */
};

typedef struct proxy_call proxy_call;

/* What the pool has done, for the metrics (read on the loop thread). */
typedef struct proxy_stats {
    int active, idle;          /* connections now: carrying a call, kept for reuse */
    uint64_t connect_failures; /* connects that failed, each address tried counting */
    uint64_t timeouts;         /* calls ended by their timeout */
} proxy_stats;
typedef void (*proxy_done_cb)(void *arg, proxy_call *c);

#define PROXY_CALL_IOV 7

/* One upstream call. Its type is complete here only so that a caller can
 * embed it in its own per-request state (request.c's gw_request) and spare
 * an allocation per call. The caller zeroes it, adds header lines with
 * proxy_call_add_header, starts it with proxy_start, and in the callback
 * reads the result fields at the end (response headers through
 * proxy_header_next); it may take body (with buf_detach). Every other field is private to proxy.c:
 * nothing else reads or writes it. */
struct proxy_call {
    /* ---- private to proxy.c ---- */
    proxy *p;
    TAILQ_ENTRY(proxy_call) link;  /* P's started calls */
    TAILQ_ENTRY(proxy_call) qlink; /* P's calls waiting for a connection */
    struct proxy_conn *conn;       /* the connection carrying it, if any */
    int state;                     /* PROXY_CALL_* in proxy.c */
    /* Request header lines "Name: value\r\n", appended by proxy_call_add_header. */
    struct buf req_hdrs;
    /* The request as written: iovecs over memory that stays valid until the
     * call ends (the caller's method, target and body; P's constants). */
    struct iovec iov[PROXY_CALL_IOV];
    size_t req_len, sent;
    char tail[48];    /* "Content-Length: n\r\n\r\n" or "\r\n" */
    int head_request; /* HEAD: the response has no body */
    int replayable;   /* idempotent method: see proxy_conn_failed */
    int retried;
    int written;     /* some request byte was handed to the upstream (sticky) */
    int got_bytes;   /* some response byte arrived on the current connection */
    int conn_listed; /* hdrs holds a Connection header that names headers to drop */
    struct event timer;
    proxy_done_cb done;
    void *arg;
    struct buf hdrs; /* response headers as "name\0value\0" pairs: read them with
                 proxy_header_next */
    /* ---- the result: the caller's to read in the callback ---- */
    enum proxy_result result;
    long status;
    int64_t content_length; /* the response's Content-Length, -1 if none; for
                               HEAD, the size of the GET answer (no body came) */
    struct buf body;        /* body.p, body.len: the response body */
};

/* UP must outlive P. MAX_CONNS: open connections at most; calls past it
 * wait for one. */
int proxy_new(struct event_base *base, const gw_upstream *up, int64_t max_body, int max_conns,
              proxy **out);
/* Aborts calls still running (without their callbacks), closes every
 * connection and frees all. */
void proxy_free(proxy *p);

/* Appends "NAME: VALUE" to C's request headers (before proxy_start). -1 if
 * NAME is not a token, VALUE holds CR, LF or another control character, the
 * headers would pass their bound (64 KiB), or out of memory. */
int proxy_call_add_header(proxy_call *c, const char *name, const char *value);

/* Starts C (zeroed by the caller, then headers added): METHOD TARGET, where
 * TARGET ("/path?query", appended to the upstream's path prefix), METHOD
 * and BODY must stay valid until done or cancelled. DONE runs once, from
 * the loop (never from inside proxy_start or proxy_cancel), unless the call
 * is cancelled first. TIMEOUT_MS covers waiting for a connection,
 * connecting, writing and reading. -1 if it could not be started (bad
 * method or target; nothing to undo). */
int proxy_start(proxy *p, proxy_call *c, const char *target, const char *method, const char *body,
                size_t body_len, int64_t timeout_ms, proxy_done_cb done, void *arg);
/* Aborts a running call and closes its connection (its state is unknown);
 * DONE will not run. No-op if not running. */
void proxy_cancel(proxy_call *c);
/* 1 once any byte of C's request has been handed to the upstream (on any
 * connection, retries included): from then on the upstream may act on it,
 * so request.c lets the call run to its answer even if the client leaves. */
int proxy_call_written(const proxy_call *c);
/* Frees buffers of a finished or cancelled call (body may have been taken). */
void proxy_call_clear(proxy_call *c);

/* Iterates response headers: returns the offset of the next pair or 0. */
size_t proxy_header_next(const proxy_call *c, size_t off, const char **name, const char **value);

/* 1 if NAME is a hop-by-hop header (RFC 9110 7.6.1) a proxy must not forward. */
int proxy_hop_by_hop(const char *name);

/* Loop thread: P's counters and its connections now. */
void proxy_get_stats(const proxy *p, proxy_stats *out);

#endif
