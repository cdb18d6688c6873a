/* control.h: control-plane operations that span both stores.
 * Owns the order of writes between Postgres (the truth) and Redis (the hot
 * copy) for accounts, keys and credits: Postgres first, then an immediate
 * push to Redis, which the periodic repair pass (creditsync.c) redoes if the
 * push was lost. Used by the admin API and the CLI alike, so both behave the
 * same. Does not own HTTP or argument parsing. */
#ifndef POINTGATE_CONTROL_H
#define POINTGATE_CONTROL_H

#include "common/apikey.h"
#include "billing/hot.h"
#include "billing/ledger.h"
#include "billing/metrics.h"

/* One caller's connections; belongs to one thread. */
typedef struct control_ctx {
    PGconn *pg;
    hot_conn *hot;
    const apikey_pepper *pepper;
    billing_metrics *metrics; /* NULL (the CLI): credits are not counted */
} control_ctx;

enum { CONTROL_UNAVAILABLE = -10 /* Redis unreachable: nothing was changed */ };

int control_account_create(control_ctx *c, const char *name, ledger_account *out);

/* A top-up (kind "topup") or signed adjustment (kind "adjustment"); see
 * ledger_credit for idempotency. A negative adjustment first holds the amount
 * in Redis so that calls in flight can never be left overdrawn by it. */
int control_credit(control_ctx *c, int64_t account_id, const char *kind, int64_t amount,
                   const char *reference, const char *reason, const char *operator_name,
                   ledger_entry *out, int *created);

/* The account phase of a repair pass (creditsync.c) takes this session
 * advisory lock exclusively (LOCK 1, then 0 to release); a negative
 * adjustment holds it shared from its guard to its push, and the settlement
 * worker (settlement.c) holds it shared from before it reads outbox entries
 * until they are committed to Postgres. So a pass that creates an account's
 * hash (Redis lost it) always read a credited total that includes every
 * debit whose guard the loss may have taken, and a spent that includes
 * every settlement batch read from the outbox the loss took. -1 when
 * Postgres failed. */
int control_pass_lock(PGconn *pg, int lock);

/* The same lock, shared (LOCK 1, then 0 to release). -1 when Postgres
 * failed: the caller drops the session (and any lock with it). */
int control_pass_lock_shared(PGconn *pg, int lock);

#endif
