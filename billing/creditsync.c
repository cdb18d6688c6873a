/* creditsync.c: the repair pass from Postgres (truth) to Redis (hot copy).
 *
 * Every credit and key change is pushed to Redis as soon as Postgres commits
 * it (control.c); this pass redoes all pushes at start and periodically, so a
 * push lost to a crash or a Redis outage is repaired within one interval, and
 * a Redis that lost its data is rebuilt. Pushes are idempotent (credit.lua
 * takes only newer sequence numbers), so repeating them is harmless.
 * Trade-off: a full pass is O(accounts + keys); fine for thousands, to be
 * replaced by a changes feed (credit_seq watermark) past that. */
#include "billing/hot.h"
#include "billing/ledger.h"
#include "billing/log.h"
#include "billing/workers.h"

static int creditsync_account(void *arg, int64_t id, int64_t seq, int64_t credited, int64_t spent)
{
    int applied;
    /* Also drops guard holds past their deadline: the sweeper leaves them,
     * since only a push of Postgres' credited total may end one (credit.lua). */
    return hot_credit(arg, id, seq, credited, spent, "", 1, &applied);
}

static int creditsync_key(void *arg, const char *key_hash, int64_t account, int revoked)
{
    return revoked ? hot_key_del(arg, key_hash) : hot_key_set(arg, key_hash, account);
}

int creditsync_pass(PGconn *pg, hot_conn *hot)
{
    if (ledger_each_account(pg, creditsync_account, hot) != LEDGER_OK) return -1;
    if (ledger_each_key(pg, creditsync_key, hot) != LEDGER_OK) return -1;
    return 0;
}

void *creditsync_run(void *arg)
{
    worker_args *w = arg;
    hot_conn *h = hot_open(w->cfg->redis_url);
    PGconn *pg = NULL;
    if (!h) return NULL;
    while (!atomic_load(w->stop)) {
        long wait = (long)w->cfg->credit_sync_interval_ms;
        if (!pg) pg = ledger_connect(w->cfg->database_url);
        if (pg && ledger_check(pg) == 0 && creditsync_pass(pg, h) == 0) {
            log_debug("creditsync: pass complete");
        } else {
            log_warn("creditsync: pass failed; retrying soon");
            wait = 1000;
        }
        worker_sleep(w->stop, wait);
    }
    if (pg) PQfinish(pg);
    hot_close(h);
    return NULL;
}
