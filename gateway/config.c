/* config.c: environment configuration of the gateway (see config.h).
 * Every value is bounded here so that the rest of the code can trust it. */
#include "gateway/config.h"

#include "billing/env.h"
#include "billing/log.h"

#include <stdio.h>
#include <string.h>
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

int config_load(gw_config *c)
{
    const char *listen = env_str("GATEWAY_LISTEN", "127.0.0.1:8080");
    const char *redis = env_str("REDIS_URL", "redis://127.0.0.1:6379/0");
    const char *upstream = env_str("UPSTREAM_URL", NULL);
    const char *routes = env_str("ROUTES_FILE", NULL);
    const char *pepper = env_str("KEY_PEPPER", NULL);
    const char *dburl = env_str("DATABASE_URL", NULL);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int64_t v;
    size_t n;
    int rc = -1;

    memset(c, 0, sizeof *c);
    if (env_parse_hostport(listen, c->listen_host, sizeof c->listen_host, &c->listen_port) != 0) {
        log_error("GATEWAY_LISTEN=%s: expected host:port", listen);
        goto out;
    }
    if (env_parse_redis_url(redis, c->redis_host, sizeof c->redis_host, &c->redis_port,
                            &c->redis_db) != 0) {
        log_error("REDIS_URL=%s: expected redis://host:port/db", redis);
        goto out;
    }
    if (!upstream ||
        (strncmp(upstream, "http://", 7) != 0 && strncmp(upstream, "https://", 8) != 0)) {
        log_error("UPSTREAM_URL must be set to an http:// or https:// base URL");
        goto out;
    }
    if (config_copy(c->upstream, sizeof c->upstream, upstream, "UPSTREAM_URL") != 0) goto out;
    /* Paths are appended as-is, so the base must not end with a slash. */
    n = strlen(c->upstream);
    while (n > 0 && c->upstream[n - 1] == '/')
        c->upstream[--n] = '\0';
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
    rc = 0;
out:
    return rc;
}
