/* config.c: bin/billing configuration from the environment (see config.h). */
#include "billing/config.h"

#include "common/env.h"
#include "common/log.h"
#include "common/redisurl.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

int config_load(billing_config *c, int need_redis, int need_listen, int need_pepper)
{
    const char *listen;
    const char *pepper;
    int rc = 0;

    memset(c, 0, sizeof *c);
    c->database_url = env_str("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/pointgate");
    c->redis_url = env_str("REDIS_URL", "redis://127.0.0.1:6379/0");
    c->admin_token = env_str("ADMIN_TOKEN", NULL);
    c->finance_token = env_str("FINANCE_TOKEN", NULL);
    c->archive_dir = env_str("ARCHIVE_DIR", NULL);
    listen = env_str("BILLING_LISTEN", "127.0.0.1:8081");
    if (need_listen &&
        env_parse_hostport(listen, c->listen_host, sizeof c->listen_host, &c->listen_port) != 0) {
        log_error("BILLING_LISTEN=%s: expected host:port", listen);
        rc = -1;
    }
    listen = env_str("BILLING_OPS_LISTEN", "127.0.0.1:9181");
    if (need_listen &&
        env_parse_hostport(listen, c->ops_host, sizeof c->ops_host, &c->ops_port) != 0) {
        log_error("BILLING_OPS_LISTEN=%s: expected host:port", listen);
        rc = -1;
    }
    if (need_listen && c->admin_token && strlen(c->admin_token) < 16) {
        log_error("ADMIN_TOKEN must be at least 16 characters");
        rc = -1;
    }
    if (need_listen && c->finance_token && strlen(c->finance_token) < 16) {
        log_error("FINANCE_TOKEN must be at least 16 characters");
        rc = -1;
    }
    pepper = env_str("KEY_PEPPER", NULL);
    if (pepper) {
        if (apikey_pepper_init(&c->pepper, pepper) != 0) {
            log_error("KEY_PEPPER must be at least 16 bytes");
            rc = -1;
        } else {
            c->has_pepper = 1;
        }
    } else if (need_pepper) {
        log_error("KEY_PEPPER is required (the secret API keys are hashed with)");
        rc = -1;
    }
    if (need_redis) {
        /* Checked here so that a bad REDIS_URL stops the command at start
         * (exit 2), not at a worker's first connect; hot_open parses it
         * again. The error never shows the password. */
        redisurl u;
        char err[256], shown[512];
        if (redisurl_parse(c->redis_url, &u, err, sizeof err) != 0) {
            redisurl_redact(c->redis_url, shown, sizeof shown);
            log_error("REDIS_URL=%s: %s", shown, err);
            rc = -1;
        } else if (u.cluster) {
            log_error("%s", REDISURL_CLUSTER_NOT_SERVED);
            rc = -1;
        }
        redisurl_wipe(&u);
    }
    if (env_int64("BILLING_API_THREADS", 4, 1, 64, &c->api_threads) != 0 ||
        env_int64("SETTLE_WORKERS", 1, 0, 16, &c->settle_workers) != 0 ||
        env_int64("SETTLE_BATCH", 2000, 1, 10000, &c->settle_batch) != 0 ||
        env_int64("SETTLE_CLAIM_IDLE_MS", 30000, 100, 86400000, &c->settle_claim_idle_ms) != 0 ||
        env_int64("SETTLE_LINGER_MS", 50, 0, 5000, &c->settle_linger_ms) != 0 ||
        env_int64("SWEEP_INTERVAL_MS", 1000, 10, 3600000, &c->sweep_interval_ms) != 0 ||
        env_int64("SWEEP_RECOVERY_MS", 15000, 0, 3600000, &c->sweep_recovery_ms) != 0 ||
        env_int64("CREDIT_SYNC_INTERVAL_MS", 30000, 100, 86400000, &c->credit_sync_interval_ms) !=
            0 ||
        env_int64("BILLING_STOP_DELAY_MS", 0, 0, 600000, &c->stop_delay_ms) != 0 ||
        env_int64("WEBHOOK_TIMEOUT_MS", 10000, 100, 120000, &c->webhook_timeout_ms) != 0 ||
        env_int64("WEBHOOK_CONNECT_TIMEOUT_MS", 3000, 50, 60000, &c->webhook_connect_timeout_ms) !=
            0 ||
        env_int64("WEBHOOK_CONCURRENCY", 16, 0, 256, &c->webhook_concurrency) != 0 ||
        env_int64("WEBHOOK_RETRY_BASE_MS", 5000, 10, 3600000, &c->webhook_retry_base_ms) != 0 ||
        env_int64("WEBHOOK_RETRY_MAX_MS", 3600000, 10, 86400000, &c->webhook_retry_max_ms) != 0 ||
        env_int64("WEBHOOK_RETRY_HORIZON_S", 86400, 1, 30 * 86400, &c->webhook_retry_horizon_s) !=
            0 ||
        env_int64("WEBHOOK_WATCH_INTERVAL_MS", 1000, 50, 3600000, &c->webhook_watch_interval_ms) !=
            0 ||
        env_int64("WEBHOOK_RETENTION_DAYS", 30, 1, 3650, &c->webhook_retention_days) != 0 ||
        env_int64("CHARGE_RETENTION_DAYS", 120, 30, 36500, &c->charge_retention_days) != 0 ||
        env_int64("ARCHIVE_INTERVAL_S", 3600, 1, 86400, &c->archive_interval_s) != 0 ||
        env_int64("STATEMENT_CLOSE_DAYS", 3, 0, 365, &c->statement_close_days) != 0)
        rc = -1;
    return rc;
}

int config_sockaddr(const char *var, const char *host, int port, struct sockaddr_in *out)
{
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &out->sin_addr) != 1) {
        log_error("%s host %s: expected an IPv4 address", var, host);
        return -1;
    }
    return 0;
}
