/* events.c: the webhook events outbox and the balance crossings (see
 * events.h). */
#include "billing/events.h"

#include "billing/ledger.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const events_types[] = {"balance.low", "balance.exhausted", "topup.created",
                                           "adjustment.created", "key.revoked"};
static billing_metrics *_Atomic events_metrics;

void events_metrics_attach(billing_metrics *m)
{
    atomic_store(&events_metrics, m);
}

static int events_type_index(const char *type)
{
    for (int i = 0; i < (int)(sizeof events_types / sizeof events_types[0]); i++)
        if (strcmp(type, events_types[i]) == 0) return i;
    return -1;
}

void events_count(const char *type)
{
    billing_metrics *m = atomic_load(&events_metrics);
    int i = events_type_index(type);
    if (m && i >= 0) metric_add_shared(&m->webhook_events[i], 1);
}

int events_add(PGconn *pg, int64_t account, const char *type, json_t *data)
{
    char ids[24];
    char *payload;
    const char *p[3] = {ids, type, NULL};
    PGresult *r;
    if (events_type_index(type) < 0) return LEDGER_LIMIT;
    payload = data ? json_dumps(data, JSON_COMPACT) : strdup("{}");
    if (!payload) return LEDGER_ERROR;
    snprintf(ids, sizeof ids, "%" PRId64, account);
    p[2] = payload;
    /* One statement: the event, a delivery per enabled endpoint, and the
     * notification the delivery thread wakes on (sent at commit, dropped
     * with a rollback). */
    r = ledger_query(pg,
                     "WITH e AS (INSERT INTO webhook_events (account_id, type, payload) "
                     "  VALUES ($1::bigint, $2, $3::jsonb) RETURNING id, account_id), "
                     " d AS (" WEBHOOK_DELIVERIES_OF("e") " RETURNING 1) "
                                                          "SELECT e.id, (SELECT count(*) FROM d), "
                                                          "  pg_notify('" WEBHOOK_CHANNEL
                                                          "', '') IS NULL FROM e",
                     3, p);
    free(payload);
    if (!r) return LEDGER_ERROR;
    PQclear(r);
    events_count(type);
    return LEDGER_OK;
}

/* One statement, one transaction (or the caller's):
 *  cand: accounts with a row whose state disagrees with the balance
 *        (armed and below, or disarmed and at or above), by the snapshot;
 *  acc:  those accounts locked (SKIP LOCKED: a credit or a settlement batch
 *        in progress is checked next time), with their current balance:
 *        a locked row is read at its latest version, so a credit that
 *        committed after the snapshot is seen and no stale balance fires;
 *  arm / fire: the state flips; an UPDATE re-checks its row's latest
 *        version, so two watchers fire one crossing once;
 *  ev, dl: the events of the rows that fired and their deliveries.
 * Only accounts in transition are locked: a quiet account costs a read. */
#define EVENTS_BALANCE_SQL                                                                         \
    "WITH cand AS (SELECT DISTINCT s.account_id FROM balance_alerts s "                            \
    "  JOIN accounts a ON a.id = s.account_id "                                                    \
    "  WHERE ($1::bigint = 0 OR s.account_id = $1::bigint) "                                       \
    "  AND s.armed = (a.credited - a.spent < s.threshold)), "                                      \
    " acc AS (SELECT a.id, a.credited, a.spent, a.credited - a.spent AS balance FROM accounts a "  \
    "  WHERE a.id IN (SELECT account_id FROM cand) FOR NO KEY UPDATE OF a SKIP LOCKED), "          \
    " arm AS (UPDATE balance_alerts s SET armed = true, armed_at = now() FROM acc "                \
    "  WHERE s.account_id = acc.id AND NOT s.armed AND acc.balance >= s.threshold "                \
    "  RETURNING s.account_id), "                                                                  \
    " fire AS (UPDATE balance_alerts s SET armed = false, fired_at = now() FROM acc "              \
    "  WHERE s.account_id = acc.id AND s.armed AND acc.balance < s.threshold "                     \
    "  RETURNING s.account_id, s.kind, s.threshold, acc.balance, acc.credited, acc.spent), "       \
    " ev AS (INSERT INTO webhook_events (account_id, type, payload) "                              \
    "  SELECT account_id, CASE kind WHEN 'low' THEN 'balance.low' ELSE 'balance.exhausted' END, "  \
    "  jsonb_build_object('threshold', threshold, 'balance', balance, 'credited', credited, "      \
    "  'spent', spent) FROM fire RETURNING id, account_id, type), "                                \
    " dl AS (" WEBHOOK_DELIVERIES_OF(                                                              \
        "ev") " RETURNING 1) "                                                                     \
              "SELECT (SELECT count(*) FROM arm), (SELECT count(*) FROM dl), "                     \
              "  (SELECT count(*) FROM ev WHERE type = 'balance.low'), "                           \
              "  (SELECT count(*) FROM ev WHERE type = 'balance.exhausted'), "                     \
              "  CASE WHEN (SELECT count(*) FROM dl) > 0 THEN pg_notify('" WEBHOOK_CHANNEL         \
              "', '') "                                                                            \
              "  IS NULL END"

int events_check_balance(PGconn *pg, int64_t account, int *fired, int *armed)
{
    char ids[24];
    const char *p[1] = {ids};
    PGresult *r;
    long low, exhausted;
    snprintf(ids, sizeof ids, "%" PRId64, account);
    r = ledger_query(pg, EVENTS_BALANCE_SQL, 1, p);
    if (!r) return LEDGER_ERROR;
    low = strtol(PQgetvalue(r, 0, 2), NULL, 10);
    exhausted = strtol(PQgetvalue(r, 0, 3), NULL, 10);
    if (armed) *armed = atoi(PQgetvalue(r, 0, 0));
    if (fired) *fired = (int)(low + exhausted);
    PQclear(r);
    for (long i = 0; i < low; i++)
        events_count("balance.low");
    for (long i = 0; i < exhausted; i++)
        events_count("balance.exhausted");
    return LEDGER_OK;
}
