/* alerts.c: balance thresholds and crossings (see alerts.h). */
#include "billing/alerts.h"

#include "billing/api.h"
#include "billing/control.h"
#include "billing/ledger.h"
#include "common/log.h"
#include "billing/webhooks.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int alerts_ensure_exhausted(PGconn *pg, int64_t account)
{
    char ids[24];
    const char *p[1] = {ids};
    PGresult *r;
    snprintf(ids, sizeof ids, "%" PRId64, account);
    r = ledger_query(pg,
                     "INSERT INTO balance_alerts (account_id, kind, threshold, armed, armed_at) "
                     "SELECT id, 'exhausted', 1, credited - spent >= 1, now() FROM accounts "
                     "WHERE id = $1 ON CONFLICT DO NOTHING",
                     1, p);
    if (!r) return LEDGER_ERROR;
    PQclear(r);
    return LEDGER_OK;
}

/* Reads a points value 1..10^12 from V; -1 if it is not one. */
static int alerts_points(json_t *v, int64_t *out)
{
    json_int_t n;
    if (!json_is_integer(v)) return -1;
    n = json_integer_value(v);
    if (n < 1 || n > ALERTS_MAX_POINTS) return -1;
    *out = (int64_t)n;
    return 0;
}

/* The settings of a PUT body: NULL, or the message of the 400. */
static const char *alerts_parse(json_t *body, int64_t *t, int *nt, int64_t *exhausted_below)
{
    json_t *arr = json_object_get(body, "thresholds"),
           *eb = json_object_get(body, "exhausted_below");
    size_t i;
    json_t *v;
    const char *key;
    json_object_foreach(body, key, v)
    {
        if (strcmp(key, "thresholds") != 0 && strcmp(key, "exhausted_below") != 0)
            return "unknown field: the body has thresholds and exhausted_below only";
    }
    if (!json_is_array(arr))
        return "thresholds is required: an array of points, e.g. {\"thresholds\":[1000,100]}";
    if (json_array_size(arr) > ALERTS_MAX_THRESHOLDS) return "at most 10 thresholds per account";
    *nt = 0;
    json_array_foreach(arr, i, v)
    {
        if (alerts_points(v, &t[*nt]) != 0)
            return "each threshold is an integer from 1 to 1000000000000 (points)";
        for (int k = 0; k < *nt; k++)
            if (t[k] == t[*nt]) return "thresholds must be distinct";
        (*nt)++;
    }
    *exhausted_below = 1;
    if (eb && alerts_points(eb, exhausted_below) != 0)
        return "exhausted_below is an integer from 1 to 1000000000000 (points)";
    return NULL;
}

/* The body of alerts_api_put inside its transaction. */
static int alerts_put_tx(PGconn *pg, int64_t account, const int64_t *t, int nt,
                         int64_t exhausted_below)
{
    char ids[24], arr[ALERTS_MAX_THRESHOLDS * 24 + 4], ebs[24];
    const char *p[3] = {ids, arr, ebs};
    size_t off = 0;
    PGresult *r;
    int found;
    snprintf(ids, sizeof ids, "%" PRId64, account);
    snprintf(ebs, sizeof ebs, "%" PRId64, exhausted_below);
    arr[off++] = '{';
    for (int i = 0; i < nt; i++)
        off += (size_t)snprintf(arr + off, sizeof arr - off, "%s%" PRId64, i ? "," : "", t[i]);
    snprintf(arr + off, sizeof arr - off, "}");
    /* The account's row lock: the same lock a credit's check holds, so the
     * balance that decides a new threshold's state cannot move meanwhile. */
    r = ledger_query(pg, "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", 1, p);
    if (!r) return LEDGER_ERROR;
    found = PQntuples(r);
    PQclear(r);
    if (!found) return LEDGER_NOT_FOUND;
    /* Kept thresholds keep their state; new ones start armed only if the
     * balance is at or above them. */
    r = ledger_query(pg,
                     "DELETE FROM balance_alerts WHERE account_id = $1 AND "
                     "((kind = 'low' AND threshold <> ALL ($2::bigint[])) OR "
                     "(kind = 'exhausted' AND threshold <> $3::bigint))",
                     3, p);
    if (!r) return LEDGER_ERROR;
    PQclear(r);
    r = ledger_query(
        pg,
        "INSERT INTO balance_alerts (account_id, kind, threshold, armed, armed_at) "
        "SELECT a.id, k.kind, k.t, a.credited - a.spent >= k.t, now() FROM accounts a, "
        "  (SELECT 'low' AS kind, t FROM unnest($2::bigint[]) t "
        "   UNION ALL SELECT 'exhausted', $3::bigint) k "
        "WHERE a.id = $1 ON CONFLICT DO NOTHING",
        3, p);
    if (!r) return LEDGER_ERROR;
    PQclear(r);
    return LEDGER_OK;
}

int alerts_api_put(control_ctx *c, int64_t account, const char *body, size_t len, json_t **out)
{
    char msg[256];
    int64_t t[ALERTS_MAX_THRESHOLDS], eb;
    int nt = 0, rc;
    json_t *j = api_body_parse(body, len, msg, sizeof msg);
    const char *bad;
    PGresult *r;
    if (!j) return webhooks_refuse(400, "bad_request", msg, out);
    bad = alerts_parse(j, t, &nt, &eb);
    json_decref(j);
    if (bad) return webhooks_refuse(400, "bad_request", bad, out);
    r = ledger_query(c->pg, "BEGIN", 0, NULL);
    if (!r) return webhooks_failure(LEDGER_ERROR, "", out);
    PQclear(r);
    rc = alerts_put_tx(c->pg, account, t, nt, eb);
    r = ledger_query(c->pg, rc == LEDGER_OK ? "COMMIT" : "ROLLBACK", 0, NULL);
    if (!r && rc == LEDGER_OK) rc = LEDGER_ERROR;
    PQclear(r);
    if (rc != LEDGER_OK) return webhooks_failure(rc, "no such account", out);
    return alerts_api_get(c, account, out);
}

int alerts_api_get(control_ctx *c, int64_t account, json_t **out)
{
    char ids[24];
    const char *p[1] = {ids};
    PGresult *r;
    json_t *arr, *ex = json_null();
    int64_t eb = 1;
    ledger_account a;
    int rc = ledger_account_get(c->pg, account, &a);
    if (rc != LEDGER_OK) return webhooks_failure(rc, "no such account", out);
    snprintf(ids, sizeof ids, "%" PRId64, account);
    r = ledger_query(c->pg,
                     "SELECT kind, threshold, armed, "
                     "to_char(fired_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), "
                     "to_char(armed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') "
                     "FROM balance_alerts WHERE account_id = $1 ORDER BY threshold DESC",
                     1, p);
    if (!r) return webhooks_failure(LEDGER_ERROR, "", out);
    arr = json_array();
    for (int i = 0; i < PQntuples(r); i++) {
        json_t *row = json_pack(
            "{s:I, s:s, s:o, s:o}", "threshold", (json_int_t)strtoll(PQgetvalue(r, i, 1), NULL, 10),
            "state", PQgetvalue(r, i, 2)[0] == 't' ? "armed" : "fired", "fired_at",
            PQgetisnull(r, i, 3) ? json_null() : json_string(PQgetvalue(r, i, 3)), "armed_at",
            PQgetisnull(r, i, 4) ? json_null() : json_string(PQgetvalue(r, i, 4)));
        if (strcmp(PQgetvalue(r, i, 0), "exhausted") == 0) {
            eb = (int64_t)strtoll(PQgetvalue(r, i, 1), NULL, 10);
            json_decref(ex);
            ex = row;
        } else {
            json_array_append_new(arr, row);
        }
    }
    PQclear(r);
    *out = json_pack("{s:I, s:I, s:o, s:I, s:o}", "account_id", (json_int_t)account, "balance",
                     (json_int_t)(a.credited - a.spent), "thresholds", arr, "exhausted_below",
                     (json_int_t)eb, "exhausted", ex);
    return 200;
}
