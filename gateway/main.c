/* main.c: gateway entry point: configuration, worker threads, signals.
 * Owns process-wide setup and teardown (libsodium, libevent)
 * and the signal loop: SIGHUP reloads routes and reopens the log files,
 * SIGUSR1 only reopens them (logrotate), SIGTERM/SIGINT drain and exit.
 * Lines are written by the log writer (common/log.c) from the end of the
 * start-up to the end of the drain; before and after, synchronously.
 * Signals are blocked in every thread and taken synchronously here with
 * sigwait, so no handler ever runs inside a worker's loop. Does not own any
 * request processing (worker.c, request.c). */
#include "common/log.h"
#include "gateway/config.h"
#include "gateway/ops.h"
#include "gateway/routes.h"
#include "gateway/worker.h"

#include <event2/event.h>
#include <signal.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

/* Loads one table per worker: tables are per thread (no shared refcounts).
 * All or nothing: -1 leaves OUT untouched. */
static int main_load_routes(const gw_config *cfg, route_table **out, int n)
{
    char err[512];
    for (int i = 0; i < n; i++) {
        if (routes_load(cfg->routes_file, cfg->upstream_timeout_ms, &out[i], err, sizeof err) !=
            0) {
            log_error("routes: %s", err);
            while (i-- > 0)
                routes_unref(out[i]);
            return -1;
        }
    }
    return 0;
}

/* Many keep-alive clients plus upstream connections need more than the
 * usual 1024 descriptors; take what the hard limit allows. */
static void main_raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) log_warn("cannot raise RLIMIT_NOFILE");
    }
}

int main(void)
{
    gw_config cfg;
    worker *workers = NULL;
    route_table **tables = NULL;
    gw_ops *ops = NULL;
    sigset_t sigs;
    int nstarted = 0, ninit = 0, rc = 1, sig = 0;

    if (log_init("gateway") != 0) return 2;
    if (config_load(&cfg) != 0) return 2;
    if (sodium_init() < 0) {
        log_error("libsodium init failed");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* inherited by the workers */
    main_raise_nofile();

    workers = calloc((size_t)cfg.threads, sizeof *workers);
    tables = calloc((size_t)cfg.threads, sizeof *tables);
    if (!workers || !tables) goto out;
    if (main_load_routes(&cfg, tables, cfg.threads) != 0) goto out;
    for (; ninit < cfg.threads; ninit++) {
        if (worker_init(&workers[ninit], ninit, &cfg, tables[ninit]) != 0) {
            /* The worker owns its table now, even on failure. */
            for (int i = ninit + 1; i < cfg.threads; i++)
                routes_unref(tables[i]);
            ninit++;
            goto out;
        }
    }
    /* Bound before the workers start: a taken ops port is a start-up error. */
    if (gw_ops_new(&cfg, workers, cfg.threads, &ops) != 0 || gw_ops_start(ops) != 0) goto out;
    for (; nstarted < cfg.threads; nstarted++)
        if (worker_start(&workers[nstarted]) != 0) goto out;
    log_info("listening on %s:%d, %d threads, upstream %s; ops on %s:%d", cfg.listen_host,
             cfg.listen_port, cfg.threads, cfg.upstream, cfg.ops_host, cfg.ops_port);
    /* From here on no log line waits for stderr or a file (-1: they stay
     * synchronous, as before; log_start said so). */
    log_start();

    for (;;) {
        if (sigwait(&sigs, &sig) != 0) continue;
        if (sig == SIGUSR1 || sig == SIGHUP) log_reopen();
        if (sig == SIGUSR1) continue;
        if (sig != SIGHUP) break;
        if (main_load_routes(&cfg, tables, cfg.threads) != 0) {
            log_error("routes reload failed: keeping the current routes");
            continue;
        }
        for (int i = 0; i < cfg.threads; i++)
            worker_reload(&workers[i], tables[i]);
        log_info("routes reloaded from %s", cfg.routes_file);
    }
    /* Readiness goes first, so that load balancers move away while the
     * gateway still serves; only then does it stop accepting and drain. */
    gw_ops_set_draining(ops);
    if (cfg.stop_delay_ms > 0) {
        struct timespec d = {cfg.stop_delay_ms / 1000, (cfg.stop_delay_ms % 1000) * 1000000};
        log_info("signal %d: /readyz says draining; serving %lld ms more", sig,
                 (long long)cfg.stop_delay_ms);
        while (nanosleep(&d, &d) != 0) {
        }
    }
    log_info("signal %d: draining", sig);
    rc = 0;
out:
    for (int i = 0; i < nstarted; i++)
        worker_stop(&workers[i]);
    for (int i = 0; i < nstarted; i++)
        worker_join(&workers[i]);
    gw_ops_free(ops); /* it reads the workers' metrics: before they go */
    for (int i = 0; i < ninit; i++)
        worker_destroy(&workers[i]);
    if (ninit == 0 && tables) {
        for (int i = 0; i < cfg.threads; i++)
            if (tables[i]) routes_unref(tables[i]);
    }
    free(tables);
    free(workers);
    libevent_global_shutdown();
    if (rc == 0) log_info("stopped");
    log_stop();
    return rc;
}
