/* events.h: the webhook events outbox (schema/010): what a change writes in
 * its own transaction, and the balance crossings. Owns the list of event
 * types, the webhook_events and webhook_deliveries rows a change writes, the
 * notification that wakes the delivery thread, and the check that fires a
 * balance threshold or arms it again (the rules: alerts.h). Does not own
 * endpoints, secrets, the admin API (webhooks.c, alerts.c) nor sending
 * (whdeliver.c). Depends on ledger_query only, so that ledger.c can call it
 * without pulling the admin API into every binary. */
#ifndef POINTGATE_EVENTS_H
#define POINTGATE_EVENTS_H

#include "billing/metrics.h"

#include <jansson.h>
#include <libpq-fe.h>
#include <stdint.h>

/* Adds event TYPE ("balance.low", "balance.exhausted", "topup.created",
 * "adjustment.created", "key.revoked") of ACCOUNT with DATA (borrowed: the
 * caller keeps its reference) to the outbox, with one pending delivery per
 * enabled endpoint of the account, and notifies the delivery thread at
 * commit. Call it inside the transaction that makes the change. LEDGER_OK,
 * LEDGER_ERROR (the caller rolls back), or LEDGER_LIMIT for an unknown
 * type. */
int events_add(PGconn *pg, int64_t account, const char *type, json_t *data);

/* The events counter (metrics.h) that events_add and the watcher
 * count into: set once by `billing serve` before its threads start; NULL
 * (the CLI) counts nothing. An event is counted when written, so one whose
 * transaction then fails to commit is counted too (rare). */
void events_metrics_attach(billing_metrics *m);
void events_count(const char *type);

/* The NOTIFY channel the delivery thread listens on. */
#define WEBHOOK_CHANNEL "pointgate_webhooks"

/* SQL: one pending delivery per enabled endpoint of each event of the CTE
 * EV (columns id, account_id), for a statement that writes events itself. */
#define WEBHOOK_DELIVERIES_OF(ev)                                                                  \
    "INSERT INTO webhook_deliveries (event_id, endpoint_id) SELECT " ev ".id, w.id FROM " ev       \
    " JOIN webhook_endpoints w ON w.account_id = " ev ".account_id AND w.enabled"

/* Arms and fires ACCOUNT's thresholds against its balance now (ACCOUNT 0:
 * every account with one, skipping accounts another transaction holds
 * locked: they are checked next time). A firing flips the row and writes its
 * event and deliveries in the same statement, so a crossing fires once
 * however many billing processes watch and however often they restart.
 * Inside a credit's transaction (which holds the account's row) it is
 * exact; *FIRED and *ARMED (may be NULL) get the counts. LEDGER_OK or
 * LEDGER_ERROR. */
int events_check_balance(PGconn *pg, int64_t account, int *fired, int *armed);

#endif
