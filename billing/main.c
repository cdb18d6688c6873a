/* main.c: bin/billing, the control plane's command line.
 *
 *   billing migrate          apply pending schema migrations
 *   billing serve            admin/finance API + settlement, sweeper, credit sync
 *   billing repair           one credit-sync pass (Postgres -> Redis), then exit
 *   billing accounts|keys|topup|adjust|report|operators ...   see cli.c
 *
 * Owns argument dispatch, signal handling and the lifetime of the serve
 * threads; the work itself lives in the modules it starts. `serve` logs
 * through the log writer (common/log.c) once started, and reopens the log
 * files on SIGHUP or SIGUSR1 (logrotate); every other command writes its
 * lines synchronously, as a CLI should. */
#include "billing/api.h"
#include "billing/cli.h"
#include "billing/config.h"
#include "billing/hot.h"
#include "billing/ledger.h"
#include "common/log.h"
#include "billing/migrate.h"
#include "billing/ops.h"
#include "billing/events.h"
#include "billing/workers.h"

#include <curl/curl.h>
#include <pthread.h>
#include <signal.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <limits.h>
#include <string.h>
#include <time.h>

static void usage(FILE *f)
{
    fprintf(f, "usage: billing COMMAND\n"
               "\n"
               "commands:\n"
               "  migrate [--to N]  apply pending schema migrations (safe to run twice, or\n"
               "            at once); --to stops after migration N\n"
               "  serve     admin/finance API on BILLING_LISTEN plus the settlement,\n"
               "            sweeper and credit-sync workers; stops on SIGTERM/SIGINT\n"
               "  repair    push every account's credits and every key to Redis once\n"
               "\n"
               "  accounts create NAME | list | show ID\n"
               "  keys create ACCOUNT_ID [--name N] [--expires-at T] [--scopes R,R]\n"
               "       | list ACCOUNT_ID | rotate KEY_ID [--grace S] | revoke KEY_ID\n"
               "  topup ACCOUNT_ID AMOUNT --reference REF\n"
               "  adjust ACCOUNT_ID AMOUNT --reason TEXT [--reference REF]\n"
               "  report usage --from YYYY-MM-DD --to YYYY-MM-DD [--group-by ...] [--csv|--json]\n"
               "  report statement ACCOUNT_ID YYYY-MM [--json]\n"
               "  operators add NAME --role admin|finance | revoke NAME | list\n"
               "  status [--json]   stores, outbox lag, holds, reconcile (exit 5: attention)\n"
               "  limits show|set --account ID | --key ID [--rate Q/S] [--daily-cap N]\n"
               "                 [--monthly-cap N]   rate limits and spending caps\n"
               "  webhooks add ACCOUNT_ID URL | list ACCOUNT_ID | remove ID\n"
               "       | deliveries ID [--limit N] [--before ID] | replay EVENT_ID\n"
               "  alerts show ACCOUNT_ID | set ACCOUNT_ID --thresholds P,P [--exhausted-below P]\n"
               "  charge REQUEST_ID   the charge of one call (or the archive holding its day)\n"
               "  archive list | run  charge partitions: retention, exports (ARCHIVE_DIR)\n"
               "  period close YYYY-MM | list   closed months: their statements never change\n"
               "\n"
               "every command takes --help. exit codes: 0 done, 1 store unreachable (retry),\n"
               "2 usage error, 3 not found, 4 refused.\n"
               "\n"
               "configuration (environment): DATABASE_URL, REDIS_URL, BILLING_LISTEN,\n"
               "KEY_PEPPER, ADMIN_TOKEN, FINANCE_TOKEN; see README.md.\n");
}

/* billing migrate [--to VERSION]: --to stops after VERSION (staged
 * upgrades; the migration tests start from an older schema). */
static int cmd_migrate(int argc, char **argv)
{
    billing_config cfg;
    PGconn *pg;
    int applied = 0, rc, upto = INT_MAX;
    if (argc == 2 && strcmp(argv[0], "--to") == 0) {
        char *end;
        long v = strtol(argv[1], &end, 10);
        if (*argv[1] == '\0' || *end != '\0' || v < 1 || v > 9999) {
            fprintf(stderr, "billing: --to takes a migration number\n");
            return 2;
        }
        upto = (int)v;
    } else if (argc != 0) {
        fprintf(stderr, "usage: billing migrate [--to VERSION]\n");
        return 2;
    }
    if (config_load(&cfg, 0, 0, 0) != 0) return 2;
    pg = ledger_connect(cfg.database_url);
    if (!pg) return 1;
    rc = migrate_apply(pg, upto, &applied);
    PQfinish(pg);
    if (rc != 0) return 1;
    printf("migrations: %d applied, %d known\n", applied, migrations_count);
    return 0;
}

static int cmd_repair(void)
{
    billing_config cfg;
    PGconn *pg;
    hot_conn *hot;
    int rc = 1;
    if (config_load(&cfg, 1, 0, 0) != 0) return 2;
    pg = ledger_connect(cfg.database_url);
    hot = hot_open(cfg.redis_url);
    /* A loss of Redis's data during the pass: run it again (a few times). */
    for (int i = 0; i < 3 && pg && hot && rc != 0; i++) {
        int pass = creditsync_pass(pg, hot);
        if (pass == 0) {
            printf("repair: every account and key pushed to redis\n");
            rc = 0;
        } else if (pass != CREDITSYNC_LOST) {
            break;
        }
    }
    if (pg) PQfinish(pg);
    hot_close(hot);
    return rc;
}

static int cmd_serve(void)
{
    billing_config cfg;
    atomic_int stop = 0;
    sigset_t sigs;
    int sig = 0, nthreads = 0, rc = 1;
    pthread_t threads[20];
    worker_args args[20];
    api_server *api = NULL;
    ops_server *ops = NULL;
    billing_metrics *metrics = NULL;

    if (config_load(&cfg, 1, 1, 1) != 0) return 2;
    if (!cfg.admin_token) log_warn("ADMIN_TOKEN is not set: every admin call will be refused");
    /* Block the stop and reopen signals in every thread; the main thread
     * waits for them. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    /* The registry outlives every thread that writes it (freed after the
     * joins); each worker's heartbeat starts now, so /healthz counts a
     * worker stalled only 5 s after it could have turned. */
    metrics = calloc(1, sizeof *metrics);
    if (!metrics) goto out;
    for (int i = 0; i < cfg.settle_workers + 2; i++) {
        metrics->beat_used[i] = 1;
        bm_beat(metrics, i);
    }
    metrics->beat_used[BM_BEAT_WEBHOOKS] = 1;
    bm_beat(metrics, BM_BEAT_WEBHOOKS);
    metrics->beat_used[BM_BEAT_ARCHIVE] = 1;
    bm_beat(metrics, BM_BEAT_ARCHIVE);
    metric_set(&metrics->charge_days_ahead, -1);
    events_metrics_attach(metrics);
    ops = ops_start(&cfg, metrics);
    if (!ops) goto out;
    api = api_start(&cfg, metrics);
    if (!api) goto out;
    for (int i = 0; i < cfg.settle_workers + 2; i++) {
        void *(*fn)(void *) = i == 0 ? creditsync_run : i == 1 ? sweeper_run : settlement_run;
        args[i] = (worker_args){&cfg, &stop, i - 2, metrics};
        if (pthread_create(&threads[nthreads], NULL, fn, &args[i]) != 0) {
            log_error("cannot start worker thread");
            goto out;
        }
        nthreads++;
    }
    /* The webhook thread: the balance watcher and deliveries. */
    args[nthreads] = (worker_args){&cfg, &stop, 0, metrics};
    if (pthread_create(&threads[nthreads], NULL, webhooks_run, &args[nthreads]) != 0) {
        log_error("cannot start the webhook thread");
        goto out;
    }
    nthreads++;
    /* The archive thread: partitions ahead, months closed, old days out. */
    args[nthreads] = (worker_args){&cfg, &stop, 0, metrics};
    if (pthread_create(&threads[nthreads], NULL, archive_run, &args[nthreads]) != 0) {
        log_error("cannot start the archive thread");
        goto out;
    }
    nthreads++;
    log_info("billing serving: %lld settlement worker(s), sweep every %lld ms",
             (long long)cfg.settle_workers, (long long)cfg.sweep_interval_ms);
    /* From here on no log line waits for stderr or a file. */
    log_start();
    for (;;) {
        if (sigwait(&sigs, &sig) != 0) continue;
        if (sig != SIGHUP && sig != SIGUSR1) break;
        log_reopen();
    }
    log_info("signal %d: stopping", sig);
    /* Not ready first, so load balancers move away while everything still
     * serves (BILLING_STOP_DELAY_MS, default 0); the ops listener answers
     * until the very end. */
    ops_drain(ops);
    if (cfg.stop_delay_ms > 0)
        nanosleep(
            &(struct timespec){cfg.stop_delay_ms / 1000, (cfg.stop_delay_ms % 1000) * 1000000L},
            NULL);
    rc = 0;
out:
    ops_drain(ops);
    atomic_store(&stop, 1);
    api_stop(api);
    for (int i = 0; i < nthreads; i++)
        pthread_join(threads[i], NULL);
    ops_stop(ops);
    free(metrics);
    log_stop();
    return rc;
}

int main(int argc, char **argv)
{
    int rc;
    if (log_init("billing") != 0) return 2;
    /* Before any thread: libcurl's global state (webhook deliveries). */
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        log_error("libcurl failed to initialise");
        return 1;
    }
    if (sodium_init() < 0) {
        log_error("libsodium failed to initialise");
        return 1;
    }
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "migrate") == 0) return cmd_migrate(argc - 2, argv + 2);
    if (strcmp(argv[1], "serve") == 0) return cmd_serve();
    if (strcmp(argv[1], "repair") == 0) return cmd_repair();
    rc = cli_run(argc - 1, argv + 1);
    if (rc >= 0) return rc;
    fprintf(stderr, "billing: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
