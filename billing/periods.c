/* periods.c: closed months (see periods.h). */
#include "billing/periods.h"

#include "billing/ledger.h"
#include "common/log.h"
#include "billing/reports.h"
#include "billing/webhooks.h"

#include <stdio.h>
#include <string.h>

/* Runs a statement whose result is not needed; 0, or -1 after logging. */
static int periods_exec(PGconn *pg, const char *sql, int n, const char *const *p)
{
    PGresult *r = ledger_query(pg, sql, n, p);
    if (!r) return -1;
    PQclear(r);
    return 0;
}

/* Closes the month starting on date FIRST ("YYYY-MM-01"). */
static int periods_close_date(PGconn *pg, const char *first, const char *by, int *closed)
{
    const char *p[2] = {first, by};
    PGresult *r;
    int ended, already, rc = LEDGER_ERROR;
    *closed = 0;
    if (periods_exec(pg, "BEGIN", 0, NULL) != 0) return LEDGER_ERROR;
    /* Queued behind a session that read the periods and sits idle in its
     * transaction, the close would hold every settlement statement back
     * (they queue behind its lock): it gives up instead, and is tried
     * again (the archive pass; or the operator). */
    if (periods_exec(pg, "SET LOCAL lock_timeout = '2s'", 0, NULL) != 0) goto out;
    /* ACCESS EXCLUSIVE: waits for every statement that read the periods
     * (settlement's, which decide where a charge is booked) and holds the
     * next ones back until the close commits; they then see it. */
    if (periods_exec(pg, "LOCK TABLE ledger_periods IN ACCESS EXCLUSIVE MODE", 0, NULL) != 0)
        goto out;
    r = ledger_query(pg,
                     "SELECT $1::date < date_trunc('month', now() AT TIME ZONE 'UTC')::date,"
                     " $1::date <= coalesce(max(month), '-infinity'::date) FROM ledger_periods",
                     1, p);
    if (!r) goto out;
    ended = PQgetvalue(r, 0, 0)[0] == 't';
    already = PQgetvalue(r, 0, 1)[0] == 't';
    PQclear(r);
    if (!ended) {
        rc = LEDGER_CONFLICT;
        goto out;
    }
    if (!already) {
        if (periods_exec(pg, "INSERT INTO ledger_periods (month, closed_by) VALUES ($1, $2)", 2,
                         p) != 0)
            goto out;
        *closed = 1;
    }
    if (periods_exec(pg, "COMMIT", 0, NULL) != 0) {
        *closed = 0;
        return LEDGER_ERROR;
    }
    if (*closed) log_info("periods: %.7s closed by %s", first, by);
    return LEDGER_OK;
out:
    periods_exec(pg, "ROLLBACK", 0, NULL);
    return rc;
}

int periods_close(PGconn *pg, const char *month, const char *by, int *closed)
{
    char next[8], first[16];
    *closed = 0;
    if (calendar_valid_month(month, next) != 0) return LEDGER_NOT_FOUND;
    snprintf(first, sizeof first, "%.7s-01", month);
    return periods_close_date(pg, first, by, closed);
}

int periods_auto_close(PGconn *pg, int64_t days, int *closed)
{
    char ds[24], first[16];
    const char *p[1] = {ds};
    PGresult *r;
    snprintf(ds, sizeof ds, "%lld", (long long)days);
    *closed = 0;
    /* The month before the one that was current DAYS days ago: it ended at
     * least that long ago. Nothing to do when it is closed already. */
    r = ledger_query(pg,
                     "SELECT to_char(m, 'YYYY-MM-DD'), m <= coalesce((SELECT max(month) FROM"
                     " ledger_periods), '-infinity'::date) FROM (SELECT (date_trunc('month',"
                     " (now() AT TIME ZONE 'UTC') - make_interval(days => $1::int))"
                     " - interval '1 month')::date AS m) s",
                     1, p);
    if (!r) return LEDGER_ERROR;
    snprintf(first, sizeof first, "%s", PQgetvalue(r, 0, 0));
    if (PQgetvalue(r, 0, 1)[0] == 't') {
        PQclear(r);
        return LEDGER_OK;
    }
    PQclear(r);
    return periods_close_date(pg, first, "billing", closed);
}

int periods_api_close(PGconn *pg, const char *month, size_t len, const char *by, json_t **out)
{
    char m[8];
    int closed = 0, rc;
    *out = NULL;
    if (len != 7) return webhooks_refuse(400, "bad_request", "the month is YYYY-MM", out);
    memcpy(m, month, 7);
    m[7] = '\0';
    rc = periods_close(pg, m, by, &closed);
    if (rc == LEDGER_NOT_FOUND)
        return webhooks_refuse(400, "bad_request", "the month is YYYY-MM", out);
    if (rc == LEDGER_CONFLICT)
        return webhooks_refuse(409, "month_open",
                               "this month has not ended (UTC): it cannot be closed yet", out);
    if (rc != LEDGER_OK) return webhooks_failure(rc, "", out);
    *out = json_pack("{s:s, s:b}", "month", m, "closed_now", closed);
    return *out ? 200 : webhooks_failure(LEDGER_ERROR, "", out);
}

int periods_api_list(PGconn *pg, json_t **out)
{
    PGresult *r = ledger_query(
        pg,
        "SELECT to_char(month, 'YYYY-MM'), to_char(closed_at AT TIME ZONE 'UTC',"
        " 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), closed_by FROM ledger_periods ORDER BY month",
        0, NULL);
    json_t *arr;
    *out = NULL;
    if (!r) return webhooks_failure(LEDGER_ERROR, "", out);
    arr = json_array();
    for (int i = 0; i < PQntuples(r); i++)
        json_array_append_new(arr, json_pack("{s:s, s:s, s:s}", "month", PQgetvalue(r, i, 0),
                                             "closed_at", PQgetvalue(r, i, 1), "closed_by",
                                             PQgetvalue(r, i, 2)));
    PQclear(r);
    /* Closing a month closes every one before it: the first open month is
     * the one after the last row. */
    *out = json_pack("{s:o}", "closed", arr);
    return *out ? 200 : webhooks_failure(LEDGER_ERROR, "", out);
}
