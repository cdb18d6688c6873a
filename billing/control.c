/* control.c: control-plane operations across Postgres and Redis (see control.h). */
#include "billing/control.h"

#include "common/hotkeys.h"
#include "common/log.h"

#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <time.h>
#include <string.h>

/* How long a negative adjustment's guard hold may live if billing dies
 * before releasing it (the sweeper then releases it, charging nothing). */
#define CONTROL_GUARD_TTL_MS 30000
#define CONTROL_GUARD_WAIT_MS 2000
#define CONTROL_GUARD_STEP_MS 50
/* The session advisory lock that keeps negative adjustments and settlement
 * batches (shared) and the account phase of repair passes (exclusive)
 * apart; see control.h. */
#define CONTROL_PASS_LOCK "x'706770617373'::bigint" /* "pgpass" */

static int control_lock_exec(PGconn *pg, const char *sql)
{
    PGresult *r = PQexec(pg, sql);
    int rc = PQresultStatus(r) == PGRES_TUPLES_OK ? 0 : -1;
    if (rc != 0) log_warn("postgres: %s", PQerrorMessage(pg));
    PQclear(r);
    return rc;
}

int control_pass_lock(PGconn *pg, int lock)
{
    return control_lock_exec(pg, lock ? "SELECT pg_advisory_lock(" CONTROL_PASS_LOCK ")"
                                      : "SELECT pg_advisory_unlock(" CONTROL_PASS_LOCK ")");
}

int control_pass_lock_shared(PGconn *pg, int lock)
{
    return control_lock_exec(pg, lock ? "SELECT pg_advisory_lock_shared(" CONTROL_PASS_LOCK ")"
                                      : "SELECT pg_advisory_unlock_shared(" CONTROL_PASS_LOCK ")");
}

int control_account_create(control_ctx *c, const char *name, ledger_account *out)
{
    int applied;
    int rc = ledger_account_create(c->pg, name, out);
    if (rc != LEDGER_OK) return rc;
    /* An account known to Redis with 0 points answers "short" rather than
     * "unknown", so a missing account hash always means a loss (the gateway
     * answers 503 for it); if this push is lost the repair pass makes it. */
    if (hot_credit(c->hot, out->id, 0, 0, 0, "", 0, &applied) != 0)
        log_warn("account %" PRId64 ": initial push to redis failed; repair pass will retry",
                 out->id);
    return LEDGER_OK;
}

/* Takes the guard hold of a negative adjustment. *guarded = 0 when Redis does
 * not know the account (nothing can be in flight against it then).
 *
 * Short while points are held: a gateway's lease may sit on them (the short
 * reserve tells it to give them back, within its next op: a fraction of a
 * second), or calls in flight that may fail. Waits for that, bounded by
 * CONTROL_GUARD_WAIT_MS, as a call would; this is the control plane, whose
 * handlers block on Postgres anyway. */
static int control_guard(control_ctx *c, int64_t account_id, int64_t amount, char rid[40],
                         int *guarded)
{
    unsigned char raw[12];
    char hex[25];
    int status;
    int64_t available, held;
    randombytes_buf(raw, sizeof raw);
    sodium_bin2hex(hex, sizeof hex, raw, sizeof raw);
    snprintf(rid, 40, "adj-%s", hex);
    *guarded = 0;
    for (int waited = 0;; waited += CONTROL_GUARD_STEP_MS) {
        if (hot_reserve(c->hot, account_id, rid, -amount, CONTROL_GUARD_TTL_MS, "_adjustment",
                        &status, &available, &held) != 0)
            return CONTROL_UNAVAILABLE;
        if (status != HOT_RESERVE_SHORT) break;
        if (available + held < -amount || waited >= CONTROL_GUARD_WAIT_MS)
            return LEDGER_INSUFFICIENT;
        struct timespec ts = {0, CONTROL_GUARD_STEP_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (status == HOT_STATUS_UNUSABLE) return CONTROL_UNAVAILABLE; /* no guard: do not debit */
    *guarded = status == HOT_RESERVE_HELD;
    return LEDGER_OK;
}

int control_credit(control_ctx *c, int64_t account_id, const char *kind, int64_t amount,
                   const char *reference, const char *reason, const char *operator_name,
                   ledger_entry *out, int *created)
{
    char guard[40] = "";
    int guarded = 0, applied, rc;
    int64_t spent = 0;
    ledger_account acct;

    *created = 0;
    if (amount < 0 && reference) {
        /* A replay answers with the entry already made, whatever is held
         * meanwhile: only a new debit needs the guard. (A concurrent first
         * attempt is still serialised by ledger_credit's row lock.) */
        rc = ledger_entry_by_reference(c->pg, account_id, reference, out);
        if (rc == LEDGER_OK)
            return ledger_same_terms(out, kind, amount) ? LEDGER_OK : LEDGER_CONFLICT;
        if (rc != LEDGER_NOT_FOUND) return rc;
    }
    if (amount < 0) {
        /* From the guard to the push, no repair pass may create the
         * account's hash from a snapshot without this debit: if Redis lost
         * its data meanwhile (the guard with it), a rebuild could otherwise
         * restore the old credited total and let calls spend the points
         * this adjustment takes. */
        if (control_pass_lock_shared(c->pg, 1) != 0) return LEDGER_ERROR;
        rc = control_guard(c, account_id, amount, guard, &guarded);
        if (rc != LEDGER_OK) goto out;
        if (!guarded) guard[0] = '\0';
    }
    rc = ledger_credit(c->pg, account_id, kind, amount, reference, reason, operator_name, out,
                       created, &spent);
    if (rc == LEDGER_OK) {
        if (*created) bm_credit(c->metrics, kind, amount); /* a replay is not a new credit */
        if (hot_credit(c->hot, account_id, out->credit_seq, out->credited_after, spent, guard, 0,
                       &applied) != 0)
            log_warn("account %" PRId64 ": credit push to redis failed; repair pass will retry",
                     account_id);
        goto out;
    }
    /* Refused or failed: drop the guard by re-pushing the current state. */
    if (guard[0] && ledger_account_get(c->pg, account_id, &acct) == LEDGER_OK)
        hot_credit(c->hot, account_id, acct.credit_seq, acct.credited, acct.spent, guard, 0,
                   &applied);
out:
    if (amount < 0 && control_pass_lock_shared(c->pg, 0) != 0) {
        /* A session whose unlock failed is broken: drop it, and the lock
         * with it, rather than block every repair pass. */
        PQreset(c->pg);
    }
    return rc;
}
