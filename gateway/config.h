/* config.h: the gateway's configuration, read once from the environment.
 * Owns parsing and validation of every GATEWAY variable; does not own the
 * routes file (routes.c) which can be reloaded at run time. Immutable after
 * config_load(), so worker threads read it without locks. */
#ifndef GATEWAY_CONFIG_H
#define GATEWAY_CONFIG_H

#include "billing/apikey.h"

#include <stdint.h>

#define CONFIG_HOST_MAX 256
#define CONFIG_URL_MAX 1024

typedef struct gw_config {
    char listen_host[CONFIG_HOST_MAX];
    int listen_port;
    char redis_host[CONFIG_HOST_MAX];
    int redis_port;
    int redis_db;
    char upstream[CONFIG_URL_MAX]; /* base URL without trailing slash */
    char routes_file[CONFIG_URL_MAX];
    char database_url[CONFIG_URL_MAX]; /* "" when unset: /_billing/usage answers 503 */
    apikey_pepper pepper;
    int threads;
    int64_t max_body;            /* request and response bodies, bytes */
    int64_t upstream_timeout_ms; /* default per-route timeout */
    int64_t hold_wait_ms;        /* how long a short call waits for holds to settle */
    int64_t hold_grace_ms;       /* hold deadline = route timeout + this */
    int64_t max_connections;     /* per worker thread */
} gw_config;

/* Fills C from the environment. Returns 0, or -1 after logging what is wrong. */
int config_load(gw_config *c);

#endif
