/* config.h: the gateway's configuration, read once from the environment.
 * Owns parsing and validation of every GATEWAY variable; does not own the
 * routes file (routes.c) which can be reloaded at run time. Immutable after
 * config_load(), so worker threads read it without locks. */
#ifndef GATEWAY_CONFIG_H
#define GATEWAY_CONFIG_H

#include "common/apikey.h"
#include "common/redisurl.h"

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define CONFIG_HOST_MAX 256
#define CONFIG_URL_MAX 1024
#define CONFIG_UPSTREAM_ADDRS 8

/* UPSTREAM_URL, split and resolved once at startup (getaddrinfo blocks, so
 * it never runs on a worker's loop; a changed address needs a restart). */
typedef struct gw_upstream {
    char host[CONFIG_HOST_MAX];      /* without the brackets of an IPv6 literal */
    int port;                        /* 80 when the URL has none */
    char authority[CONFIG_HOST_MAX]; /* the Host header: host[:port] as written */
    char prefix[CONFIG_URL_MAX];     /* path prefix, no trailing slash; "" for none */
    struct sockaddr_storage addr[CONFIG_UPSTREAM_ADDRS]; /* in getaddrinfo's order */
    socklen_t addrlen[CONFIG_UPSTREAM_ADDRS];
    int naddr; /* >= 1 */
} gw_upstream;

typedef struct gw_config {
    char listen_host[CONFIG_HOST_MAX];
    int listen_port;
    char ops_host[CONFIG_HOST_MAX]; /* GATEWAY_OPS_LISTEN: /metrics, /healthz, /readyz (ops.h) */
    int ops_port;
    int64_t stop_delay_ms;         /* SIGTERM: /readyz says 503 this long before the drain begins */
    redisurl redis;                /* REDIS_URL: host, port, db, ACL user and password */
    char upstream[CONFIG_URL_MAX]; /* base URL without trailing slash */
    gw_upstream up;                /* the same, parsed and resolved */
    char routes_file[CONFIG_URL_MAX];
    char database_url[CONFIG_URL_MAX]; /* "" when unset: /_billing/usage answers 503 */
    apikey_pepper pepper;
    int threads;
    int64_t max_body;            /* request and response bodies, bytes */
    int64_t upstream_timeout_ms; /* default per-route timeout */
    int64_t hold_wait_ms;        /* how long a short call waits for holds to settle */
    int64_t hold_grace_ms;       /* hold deadline = route timeout + this */
    int64_t max_connections;     /* per worker thread */
    int64_t head_timeout_ms;     /* a client's request head must arrive within this */
    int64_t body_timeout_ms;     /* and its body within this of the body's start (total) */
    /* Calls of one account waiting on one worker for points its calls in
     * flight hold (GATEWAY_MAX_WAITERS). Past it a call is answered 503
     * too_many_waiting: not 402, which would be the false refusal the wait
     * exists to avoid (the points are there, held), and not a longer
     * queue, which would let one account's burst hold unbounded memory. */
    int64_t max_waiters;
    int64_t upstream_max_conns;     /* open upstream connections per worker thread */
    int64_t lease_calls;            /* point lease size in calls (lease.h); 0: none */
    int64_t lease_idle_ms;          /* a lease unused this long goes back */
    int64_t drain_timeout_ms;       /* SIGTERM: resend undelivered settles this long, then spill */
    char spill_dir[CONFIG_URL_MAX]; /* GATEWAY_SPILL_DIR: spill files (spill.h) */
    int64_t max_backlog;            /* OUTBOX_MAX_BACKLOG: refuse reserves at pg:backlog >= this */
    int64_t settle_queue_max;       /* settles kept for resending per worker; then spilled */
    /* Idempotency-Key (README, "Safe retries"): how long a billable answer
     * is kept for replays (IDEMPOTENCY_TTL, seconds), the largest body kept
     * (IDEMPOTENCY_MAX_BODY, bytes; past it the answer is not kept and a
     * retry gets 409 idempotency_response_too_large), and the bytes of
     * stored answers an account may have at once (IDEMPOTENCY_ACCOUNT_BYTES;
     * past it a new key gets 429 idempotency_budget_exceeded). */
    int64_t idem_ttl_ms;
    int64_t idem_max_body;
    int64_t idem_account_bytes;
} gw_config;

/* Fills C from the environment and resolves the upstream's host (blocking:
 * call before any loop runs). Returns 0, or -1 after logging what is wrong. */
int config_load(gw_config *c);

/* Splits an upstream base URL, http://host[:port][/prefix], into UP (no
 * resolution). 0, or -1 with a reason in ERR. */
int config_parse_upstream(const char *url, gw_upstream *up, char *err, size_t errlen);

#endif
