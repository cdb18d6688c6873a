/* creditsync.c: the repair pass from Postgres (truth) to Redis (hot copy),
 * and the detection of a Redis that lost its data.
 *
 * Every credit and key change is pushed to Redis as soon as Postgres commits
 * it (control.c); this pass redoes all pushes at start and periodically, so a
 * push lost to a crash or a Redis outage is repaired within one interval.
 * Pushes are idempotent (credit.lua takes only newer sequence numbers;
 * keypush.lua never overwrites a revoked key's tombstone, and every pass
 * pushes the tombstones too, so a revoke whose Redis write failed is
 * repaired by the next pass), so repeating them is harmless.
 *
 * Loss: a pass that pushed every account and key into one Redis (its marker,
 * set at its start, survived to its end: passend.lua) writes pg:epoch. The
 * worker checks that pg:epoch exists every CREDITSYNC_POLL_MS (one EXISTS;
 * after a Redis restart the check reconnects like any command) and, when it
 * is gone (a restart without its AOF, FLUSHALL, a failover to an empty
 * replica), rebuilds at once instead of at the next interval, then runs two
 * catch-up passes a few seconds later (a backstop only: see below). A loss
 * during a pass takes its marker:
 * the pass stops writing (keypush.lua and credit.lua check the marker on
 * every key and account, in the same step as the write) and starts again
 * from a fresh snapshot, so a snapshot older than the loss never writes the
 * epoch, a key whose tombstone the loss took, nor an account hash from
 * stale figures. So does a pass during which billing reconnected (a Redis
 * that restarted, perhaps without its last writes). And any reconnect
 * (a Redis back from a restart WITH its AOF, pg:epoch present) asks for a
 * pass at once: writes billing could not make meanwhile (a revoke's
 * tombstone) are then in Redis within a pass, not an interval. The account
 * phase holds a Postgres advisory lock exclusively that negative
 * adjustments and settlement batches (from their read to their commit)
 * take shared (control.h): so a hash a rebuild creates counts every debit
 * whose guard the loss took and every batch read from the lost outbox,
 * and the pass waits for at most the batch in flight and one settlement
 * read's BLOCK (500 ms). Settlement and adjustments wait, in turn, for the
 * account phase: one Redis round trip per account, O(accounts) (the
 * measure below: 5,000 keys in well under a second; an account costs
 * about as much).
 *
 * Trade-off: a full pass is O(accounts + keys), one round trip each; fine
 * for thousands (measured: 5,000 keys in well under a second), to be
 * replaced by a changes feed (credit_seq watermark) and pipelining past
 * that. */
#include "billing/control.h"
#include "billing/hot.h"
#include "billing/keys.h"
#include "billing/ledger.h"
#include "billing/limits.h"
#include "common/log.h"
#include "billing/workers.h"

#include <time.h>

#define CREDITSYNC_POLL_MS 250
#define CREDITSYNC_RETRY_MS 1000

/* One pass's state, passed through the ledger's iterators. */
typedef struct creditsync_ctx {
    hot_conn *hot;
    char marker[HOT_PASS_MARKER];
    long applied;       /* account pushes Redis took: it was behind (or lost them) */
    long fixes;         /* pushes that changed Redis: applied, spent repaired, keys written */
    int lost;           /* Redis lost its data since the pass began */
    billing_metrics *m; /* heartbeats during a long pass; NULL: none */
} creditsync_ctx;

static int creditsync_account(void *arg, int64_t id, int64_t seq, int64_t credited, int64_t spent)
{
    creditsync_ctx *c = arg;
    int applied, lost, repaired;
    bm_beat(c->m, BM_BEAT_CREDITSYNC);
    /* Also drops guard holds past their deadline: the sweeper leaves them,
     * since only a push of Postgres' credited total may end one (credit.lua).
     * Checks the pass's marker in the same step: a loss since the pass
     * began stops it before a hash is made from figures read before it. */
    if (hot_pass_credit(c->hot, c->marker, id, seq, credited, spent, &applied, &lost, &repaired) !=
        0)
        return -1;
    if (lost) {
        c->lost = 1;
        return -1;
    }
    c->applied += applied;
    c->fixes += applied || repaired;
    return 0;
}

static int creditsync_key(void *arg, const char *key_hash, const char *value)
{
    creditsync_ctx *c = arg;
    int lost, changed;
    bm_beat(c->m, BM_BEAT_CREDITSYNC);
    if (hot_pass_key(c->hot, c->marker, key_hash, value, &lost, &changed) != 0) return -1;
    if (lost) {
        c->lost = 1;
        return -1;
    }
    c->fixes += changed;
    return 0;
}

/* One pass with C's connection and counters. */
static int creditsync_pass_run(PGconn *pg, creditsync_ctx *c)
{
    int result;
    int rc;
    long pushed;
    unsigned connects = hot_connects(c->hot);
    if (hot_pass_begin(c->hot, c->marker) != 0) return -1;
    /* Exclusive against negative adjustments between guard and push
     * (control.h): a hash this pass creates never misses such a debit. */
    if (control_pass_lock(pg, 1) != 0) return -1;
    rc = ledger_each_account(pg, creditsync_account, c);
    if (control_pass_lock(pg, 0) != 0) {
        PQreset(pg); /* the lock goes with the session; never left held */
        return -1;
    }
    if (rc != LEDGER_OK || keys_each_mirror(pg, creditsync_key, c) != LEDGER_OK)
        return c->lost ? CREDITSYNC_LOST : -1;
    /* Limits before the epoch: after a loss, no call is served (NODATA)
     * until an account's caps and rates are back with its points. */
    if (limits_push_all(pg, c->hot, &pushed) != 0) return -1;
    /* A command of this pass was retried on a new connection: the Redis
     * may have restarted and lost the last writes before its crash
     * (appendfsync everysec) while keeping the marker: run it again
     * rather than vouch for it with the epoch. */
    if (hot_connects(c->hot) != connects) return CREDITSYNC_LOST;
    if (hot_pass_end(c->hot, c->marker, &result) != 0) return -1;
    if (result == 0) return CREDITSYNC_LOST;
    if (result == 2) log_info("creditsync: every account and key in redis; pg:epoch written");
    return 0;
}

/* One pass; *APPLIED gets the account pushes Redis took, *FIXES the pushes
 * that changed Redis (whatever the result: a pass stopped midway still
 * made them). */
static int creditsync_pass_counted(PGconn *pg, hot_conn *hot, billing_metrics *m, long *applied,
                                   long *fixes)
{
    creditsync_ctx c = {.hot = hot, .m = m};
    int rc = creditsync_pass_run(pg, &c);
    *applied = c.applied;
    *fixes = c.fixes;
    return rc;
}

int creditsync_pass(PGconn *pg, hot_conn *hot)
{
    long applied = 0, fixes = 0;
    return creditsync_pass_counted(pg, hot, NULL, &applied, &fixes);
}

static int64_t creditsync_mono_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

void *creditsync_run(void *arg)
{
    worker_args *w = arg;
    hot_conn *h = hot_open(w->cfg->redis_url);
    PGconn *pg = NULL;
    int64_t next_pass = 0, retry_at = 0;
    int catchups = 0, warned = 0, reconnected = 0;
    unsigned connects = 0;
    if (!h) return NULL;
    while (!atomic_load(w->stop)) {
        int64_t now = creditsync_mono_ms(), started;
        int exists = 1, rc = -1;
        long applied = 0, fixes = 0;
        int64_t pass_us;
        bm_beat(w->metrics, BM_BEAT_CREDITSYNC);
        /* Redis unreachable (or the last pass failed): no answer, no
         * verdict; ask again in a second, not every poll (each failed
         * connect is logged). */
        if (now < retry_at) {
            worker_rest(w->stop, CREDITSYNC_POLL_MS, w->metrics, BM_BEAT_CREDITSYNC);
            continue;
        }
        if (hot_epoch_exists(h, &exists) != 0) {
            retry_at = now + CREDITSYNC_RETRY_MS;
            continue;
        }
        /* A new connection (hot.c retries a command that met a dead one on
         * a fresh one, silently) may be a Redis that restarted WITH its
         * AOF: pg:epoch is there, yet the writes billing could not make
         * while it was away (a revoke's tombstone, a new key, a credit)
         * are missing, and so are the last writes it took before a crash
         * (appendfsync everysec). Repair now, not at the next interval. */
        if (connects != 0 && hot_connects(h) != connects && !reconnected) {
            log_info("creditsync: reconnected to redis; repair pass now");
            reconnected = 1;
        }
        connects = hot_connects(h);
        if (!exists && next_pass != 0 && !warned) {
            log_warn("creditsync: pg:epoch is missing: redis lost its data; rebuilding from "
                     "postgres now");
            warned = 1;
        }
        if (exists && !reconnected && now < next_pass) {
            worker_rest(w->stop, CREDITSYNC_POLL_MS, w->metrics, BM_BEAT_CREDITSYNC);
            continue;
        }
        started = now;
        pass_us = bm_mono_us();
        if (!pg) pg = ledger_connect(w->cfg->database_url);
        if (pg && ledger_check(pg) == 0)
            rc = creditsync_pass_counted(pg, h, w->metrics, &applied, &fixes);
        now = creditsync_mono_ms();
        bm_repair(w->metrics,
                  rc == 0                 ? BM_REPAIR_OK
                  : rc == CREDITSYNC_LOST ? BM_REPAIR_LOST
                                          : BM_REPAIR_ERROR,
                  bm_mono_us() - pass_us, fixes);
        if (rc == CREDITSYNC_LOST) {
            log_warn("creditsync: redis lost its data (or reconnected) during a pass; starting "
                     "again");
            continue;
        }
        if (rc != 0) {
            log_warn("creditsync: pass failed; retrying soon");
            retry_at = now + CREDITSYNC_RETRY_MS;
            continue;
        }
        /* A reconnect during the pass (checked at the next poll) asks for
         * another: writes made before it may be lost. */
        reconnected = 0;
        if (!exists) {
            log_info("creditsync: redis rebuilt from postgres in %lld ms",
                     (long long)(now - started));
            catchups = 2;
            warned = 0;
        } else if (applied > 0 && catchups == 0) {
            /* Redis was behind on some accounts: a lost push, or an
             * account hash lost alone (recreated now from Postgres spent,
             * which its records still in the outbox will raise). The
             * first pass too: it may start late (it waits for settlement's
             * read, which holds the pass lock), after such a loss. */
            log_info("creditsync: %ld account(s) were behind in redis; repaired", applied);
            catchups = 2;
        }
        /* After a rebuild or a repair, two early passes (2 s, then 10 s).
         * For a hash lost alone they raise spent by the records that were
         * in the outbox when it was recreated, once Postgres has them
         * (credit.lua's rebuilt window); after a full loss the lock above
         * already put every batch read before it in the rebuild, and they
         * are a backstop (a settlement session that died and was resent
         * by ledger.c without the lock). */
        next_pass = now + w->cfg->credit_sync_interval_ms;
        if (catchups > 0) {
            int64_t soon = now + (catchups == 2 ? 2000 : 8000);
            if (soon < next_pass) next_pass = soon;
            catchups--;
        }
        log_debug("creditsync: pass complete in %lld ms", (long long)(now - started));
    }
    if (pg) PQfinish(pg);
    hot_close(h);
    return NULL;
}
