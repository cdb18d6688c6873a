/* proxy.h: upstream HTTP calls on a libcurl multi handle driven by the
 * worker's libevent loop. Owns the multi handle (and with it the keep-alive
 * connection pool to the upstream), a small free list of easy handles, and
 * the buffering of responses within the configured bounds. Does not know
 * about billing, routes or clients: request.c builds the call and reads the
 * result. Single-threaded: used only by its worker thread. */
#ifndef GATEWAY_PROXY_H
#define GATEWAY_PROXY_H

#include <curl/curl.h>
#include <event2/event.h>
#include <stddef.h>
#include <stdint.h>

typedef struct proxy proxy;

enum proxy_result {
    PROXY_OK,          /* an HTTP answer, any status */
    PROXY_UNAVAILABLE, /* connection refused, DNS, reset, protocol error */
    PROXY_TIMEOUT,
    PROXY_TOO_LARGE, /* response headers or body past the limit */
};

typedef struct proxy_call proxy_call;
typedef void (*proxy_done_cb)(void *arg, proxy_call *c);

struct proxy_call {
    proxy *p;
    proxy_call *prev, *next; /* running calls of P */
    CURL *easy;
    struct curl_slist *req_headers; /* owned: freed by proxy_call_clear */
    enum proxy_result result;
    long status;
    char *hdrs; /* response headers as "name\0value\0" pairs */
    size_t hdrs_len, hdrs_cap;
    char *body;
    size_t body_len, body_cap;
    int too_large;
    proxy_done_cb done;
    void *arg;
};

int proxy_new(struct event_base *base, int64_t max_body, proxy **out);
/* Aborts calls still running (without their callbacks) and frees all. */
void proxy_free(proxy *p);

/* Starts C (zeroed by the caller, then req_headers set). BODY must stay
 * valid until done or cancelled. DONE runs once, from the loop, unless the
 * call is cancelled first. -1 if it could not be started (nothing to undo). */
int proxy_start(proxy *p, proxy_call *c, const char *url, const char *method, const char *body,
                size_t body_len, int64_t timeout_ms, proxy_done_cb done, void *arg);
/* Aborts a running call; DONE will not run. No-op if not running. */
void proxy_cancel(proxy_call *c);
/* Frees buffers of a finished or cancelled call (body may have been taken). */
void proxy_call_clear(proxy_call *c);

/* Iterates response headers: returns the offset of the next pair or 0. */
size_t proxy_header_next(const proxy_call *c, size_t off, const char **name, const char **value);

/* 1 if NAME is a hop-by-hop header (RFC 9110 7.6.1) a proxy must not forward. */
int proxy_hop_by_hop(const char *name);

#endif
