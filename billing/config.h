/* config.h: bin/billing's configuration, read once from the environment at
 * start and read-only afterwards. Owns defaults and validation; does not own
 * the gateway's settings (gateway/ has its own). */
#ifndef POINTGATE_CONFIG_H
#define POINTGATE_CONFIG_H

#include "common/apikey.h"

#include <stdint.h>

typedef struct billing_config {
    const char *database_url;
    const char *redis_url;
    char listen_host[256];
    int listen_port;
    char ops_host[256]; /* BILLING_OPS_LISTEN: /metrics, /healthz, /readyz (ops.c) */
    int ops_port;
    const char *admin_token;   /* NULL: admin API refuses every call */
    const char *finance_token; /* NULL: no finance bootstrap token */
    apikey_pepper pepper;
    int has_pepper;
    int64_t api_threads;
    int64_t settle_workers;
    int64_t settle_batch;
    int64_t settle_claim_idle_ms;
    int64_t settle_linger_ms;
    int64_t sweep_interval_ms;
    int64_t sweep_recovery_ms; /* no expiry this long after Redis came back */
    int64_t credit_sync_interval_ms;
    int64_t stop_delay_ms; /* BILLING_STOP_DELAY_MS: /readyz 503 this long before stopping */
    /* Webhook deliveries (whdeliver.c; README "Balance alerts and webhooks"). */
    int64_t webhook_timeout_ms;         /* WEBHOOK_TIMEOUT_MS: one attempt, all of it */
    int64_t webhook_connect_timeout_ms; /* WEBHOOK_CONNECT_TIMEOUT_MS */
    int64_t webhook_concurrency;        /* WEBHOOK_CONCURRENCY: attempts in flight; 0: none */
    int64_t webhook_retry_base_ms;      /* WEBHOOK_RETRY_BASE_MS: first retry, then doubled */
    int64_t webhook_retry_max_ms;       /* WEBHOOK_RETRY_MAX_MS: longest wait between two */
    int64_t webhook_retry_horizon_s;    /* WEBHOOK_RETRY_HORIZON_S: give up this long after */
    int64_t webhook_watch_interval_ms;  /* WEBHOOK_WATCH_INTERVAL_MS: balance watcher period */
    int64_t webhook_retention_days;     /* WEBHOOK_RETENTION_DAYS: events kept this long */
    /* The charges table's life cycle (archive.c; README "Ledger retention"). */
    int64_t charge_retention_days; /* CHARGE_RETENTION_DAYS: per-call rows kept this long */
    const char *archive_dir;       /* ARCHIVE_DIR: exports; NULL: nothing is ever dropped */
    int64_t archive_interval_s;    /* ARCHIVE_INTERVAL_S: a pass this often */
    int64_t statement_close_days;  /* STATEMENT_CLOSE_DAYS: a month closes this long after
                                      its end; 0: only `billing period close` closes */
} billing_config;

/* Reads the environment. NEED_* say which parts this command requires; a
 * missing or malformed required value is logged and makes it return -1. */
int config_load(billing_config *c, int need_redis, int need_listen, int need_pepper);

struct sockaddr_in;
/* HOST:PORT (the value of the variable VAR) as an IPv4 socket address for a
 * listener. 0, or -1 after logging what VAR should hold. */
int config_sockaddr(const char *var, const char *host, int port, struct sockaddr_in *out);

#endif
