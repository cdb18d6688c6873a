/* config.c: environment configuration of the gateway (see config.h).
 * Every value is bounded here so that the rest of the code can trust it. */
#include "gateway/config.h"

#include "common/env.h"
#include "common/log.h"
#include "gateway/resolve.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static int config_copy(char *dst, size_t cap, const char *src, const char *name)
{
    size_t n = strlen(src);
    if (n == 0 || n >= cap) {
        log_error("%s: empty or longer than %zu bytes", name, cap - 1);
        return -1;
    }
    memcpy(dst, src, n + 1);
    return 0;
}

static int config_host_char(char c, int literal)
{
    if (literal)
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') ||
               c == ':' || c == '.';
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '.' ||
           c == '-' || c == '_';
}

int config_parse_upstream(const char *url, gw_upstream *up, char *err, size_t errlen)
{
    const char *a, *end, *host, *host_end, *port = NULL;
    size_t n;
    int literal = 0;

    memset(up, 0, sizeof *up);
    if (strncasecmp(url, "https://", 8) == 0) {
        /* The upstream client speaks plain HTTP/1.1 only. */
        snprintf(err, errlen,
                 "https is not supported: terminate TLS to the device API in a local sidecar "
                 "(stunnel, nginx, envoy) and set UPSTREAM_URL to its http:// address");
        return -1;
    }
    if (strncmp(url, "http://", 7) != 0) {
        snprintf(err, errlen, "expected http://host[:port][/prefix]");
        return -1;
    }
    a = url + 7;
    end = a + strcspn(a, "/?#");
    if (*end == '?' || *end == '#') {
        snprintf(err, errlen, "a base URL has no query or fragment");
        return -1;
    }
    n = (size_t)(end - a);
    if (n == 0 || n >= sizeof up->authority) {
        snprintf(err, errlen, "empty or overlong host");
        return -1;
    }
    if (*a == '[') { /* [v6 literal] */
        literal = 1;
        host = a + 1;
        host_end = memchr(a, ']', n);
        if (!host_end || (host_end + 1 < end && host_end[1] != ':')) {
            snprintf(err, errlen, "malformed [IPv6] host");
            return -1;
        }
        if (host_end + 1 < end) port = host_end + 2;
    } else {
        host = a;
        host_end = memchr(a, ':', n);
        if (host_end)
            port = host_end + 1;
        else
            host_end = end;
    }
    if (host_end == host) {
        snprintf(err, errlen, "empty host");
        return -1;
    }
    for (const char *h = host; h < host_end; h++) {
        if (!config_host_char(*h, literal)) {
            snprintf(err, errlen, "invalid character in host (user info is not supported)");
            return -1;
        }
    }
    up->port = 80;
    if (port) {
        int v = 0;
        if (port == end) v = -1;
        for (const char *d = port; d < end && v >= 0; d++)
            v = (*d >= '0' && *d <= '9' && v <= 65535) ? v * 10 + (*d - '0') : -1;
        if (v <= 0 || v > 65535) {
            snprintf(err, errlen, "port must be 1..65535");
            return -1;
        }
        up->port = v;
    }
    memcpy(up->host, host, (size_t)(host_end - host));
    memcpy(up->authority, a, n);
    /* The prefix is prepended to request targets as-is: printable ASCII,
     * and no trailing slash since targets start with one. */
    n = strlen(end);
    while (n > 0 && end[n - 1] == '/')
        n--;
    if (n >= sizeof up->prefix) {
        snprintf(err, errlen, "path prefix too long");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (end[i] <= ' ' || end[i] >= 0x7f) {
            snprintf(err, errlen, "invalid character in the path prefix");
            return -1;
        }
    }
    memcpy(up->prefix, end, n);
    return 0;
}

/* Blocking: startup only. Keeps every address so that a connection can
 * fall back to the next one (localhost may be ::1 then 127.0.0.1). */
static int config_resolve_upstream(gw_upstream *up)
{
    up->naddr = resolve_addrs(up->host, up->port, up->addr, up->addrlen, CONFIG_UPSTREAM_ADDRS);
    if (up->naddr > 0) return 0;
    log_error("UPSTREAM_URL: its host %s does not resolve", up->host);
    return -1;
}

int config_load(gw_config *c)
{
    const char *listen = env_str("GATEWAY_LISTEN", "127.0.0.1:8080");
    const char *ops = env_str("GATEWAY_OPS_LISTEN", "127.0.0.1:9180");
    const char *redis = env_str("REDIS_URL", "redis://127.0.0.1:6379/0");
    const char *upstream = env_str("UPSTREAM_URL", NULL);
    const char *routes = env_str("ROUTES_FILE", NULL);
    const char *pepper = env_str("KEY_PEPPER", NULL);
    const char *dburl = env_str("DATABASE_URL", NULL);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int64_t v;
    size_t n;
    char err[256];
    int rc = -1;

    memset(c, 0, sizeof *c);
    if (env_parse_hostport(listen, c->listen_host, sizeof c->listen_host, &c->listen_port) != 0) {
        log_error("GATEWAY_LISTEN=%s: expected host:port", listen);
        goto out;
    }
    /* Never "off": whoever runs the gateway needs its health and metrics. */
    if (env_parse_hostport(ops, c->ops_host, sizeof c->ops_host, &c->ops_port) != 0) {
        log_error("GATEWAY_OPS_LISTEN=%s: expected host:port", ops);
        goto out;
    }
    if (strcmp(c->ops_host, c->listen_host) == 0 && c->ops_port == c->listen_port) {
        log_error("GATEWAY_OPS_LISTEN must differ from GATEWAY_LISTEN: metrics stay off the "
                  "public listener");
        goto out;
    }
    if (redisurl_parse(redis, &c->redis, err, sizeof err) != 0) {
        char shown[CONFIG_URL_MAX];
        redisurl_redact(redis, shown, sizeof shown);
        log_error("REDIS_URL=%s: %s", shown, err);
        goto out;
    }
    if (c->redis.cluster) {
        log_error("%s", REDISURL_CLUSTER_NOT_SERVED);
        goto out;
    }
    if (!upstream) {
        log_error("UPSTREAM_URL must be set to an http://host[:port][/prefix] base URL");
        goto out;
    }
    if (config_parse_upstream(upstream, &c->up, err, sizeof err) != 0) {
        char shown[CONFIG_URL_MAX];
        redisurl_redact(upstream, shown, sizeof shown); /* user info is refused, never shown */
        log_error("UPSTREAM_URL=%s: %s", shown, err);
        goto out;
    }
    if (config_copy(c->upstream, sizeof c->upstream, upstream, "UPSTREAM_URL") != 0) goto out;
    /* Paths are appended as-is, so the base must not end with a slash. */
    n = strlen(c->upstream);
    while (n > 0 && c->upstream[n - 1] == '/')
        c->upstream[--n] = '\0';
    if (config_resolve_upstream(&c->up) != 0) goto out;
    if (!routes) {
        log_error("ROUTES_FILE must be set");
        goto out;
    }
    if (config_copy(c->routes_file, sizeof c->routes_file, routes, "ROUTES_FILE") != 0) goto out;
    /* Optional: only /_billing/usage reads Postgres. */
    if (dburl && config_copy(c->database_url, sizeof c->database_url, dburl, "DATABASE_URL") != 0)
        goto out;
    if (apikey_pepper_init(&c->pepper, pepper) != 0) {
        log_error("KEY_PEPPER must be set and at least 16 bytes");
        goto out;
    }
    if (env_int64("GATEWAY_THREADS", cores > 0 ? cores : 1, 1, 256, &v) != 0) goto out;
    c->threads = (int)v;
    if (env_int64("MAX_BODY_BYTES", 1 << 20, 1, (int64_t)1 << 30, &c->max_body) != 0) goto out;
    if (env_int64("UPSTREAM_TIMEOUT_MS", 10000, 1, 3600000, &c->upstream_timeout_ms) != 0) goto out;
    if (env_int64("HOLD_WAIT_MS", c->upstream_timeout_ms + 1000, 0, 3600000, &c->hold_wait_ms) != 0)
        goto out;
    if (env_int64("HOLD_GRACE_MS", 10000, 1000, 3600000, &c->hold_grace_ms) != 0) goto out;
    if (env_int64("MAX_CONNECTIONS", 4096, 1, 1000000, &c->max_connections) != 0) goto out;
    if (env_int64("GATEWAY_HEAD_TIMEOUT_MS", 30000, 10, 3600000, &c->head_timeout_ms) != 0)
        goto out;
    if (env_int64("GATEWAY_BODY_TIMEOUT_MS", 30000, 10, 600000, &c->body_timeout_ms) != 0) goto out;
    if (env_int64("GATEWAY_MAX_WAITERS", 256, 1, 65536, &c->max_waiters) != 0) goto out;
    if (env_int64("UPSTREAM_MAX_CONNECTIONS", 1024, 1, 100000, &c->upstream_max_conns) != 0)
        goto out;
    if (env_int64("GATEWAY_LEASE_CALLS", 256, 0, 1 << 20, &c->lease_calls) != 0) goto out;
    if (env_int64("GATEWAY_LEASE_IDLE_MS", 1000, 10, 3600000, &c->lease_idle_ms) != 0) goto out;
    /* Resending what Redis has not taken yet after SIGTERM, then spilling. */
    if (env_int64("GATEWAY_STOP_DELAY_MS", 0, 0, 60000, &c->stop_delay_ms) != 0) goto out;
    if (env_int64("GATEWAY_DRAIN_TIMEOUT_MS", 30000, 0, 3600000, &c->drain_timeout_ms) != 0)
        goto out;
    if (config_copy(c->spill_dir, sizeof c->spill_dir, env_str("GATEWAY_SPILL_DIR", ".spill"),
                    "GATEWAY_SPILL_DIR") != 0 ||
        c->spill_dir[0] == '\0') {
        log_error("GATEWAY_SPILL_DIR must be a directory path");
        goto out;
    }
    /* Records in the outbox not yet in Postgres (pg:backlog). 2,000,000 at
     * about 85-110 bytes each is about 220 MB of Redis memory, well inside
     * the 1 GiB maxmemory of the local stacks: some 11 minutes of billing
     * or Postgres being down at 3,000 calls/s, about one at the bench's
     * 30,000. Size it to maxmemory, not to time (README, "Sizing Redis"). */
    if (env_int64("OUTBOX_MAX_BACKLOG", 2000000, 1, (int64_t)1 << 40, &c->max_backlog) != 0)
        goto out;
    /* Per worker, 160 bytes each (an Idempotency-Key's hash and fingerprint included); reserves
     * stop at half of it. */
    if (env_int64("GATEWAY_SETTLE_QUEUE_MAX", 65536, 2, 1 << 24, &c->settle_queue_max) != 0)
        goto out;
    if (env_int64("IDEMPOTENCY_TTL", 86400, 1, 30 * 86400, &v) != 0) goto out;
    c->idem_ttl_ms = v * 1000;
    if (env_int64("IDEMPOTENCY_MAX_BODY", 65536, 0, 1 << 20, &c->idem_max_body) != 0) goto out;
    if (env_int64("IDEMPOTENCY_ACCOUNT_BYTES", 64 << 20, 1024, (int64_t)1 << 40,
                  &c->idem_account_bytes) != 0)
        goto out;
    rc = 0;
out:
    return rc;
}
