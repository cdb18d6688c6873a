/* reports.c: usage reports and monthly statements (see reports.h).
 *
 * Both read usage_daily, the rollup the settlement worker maintains in the
 * same transaction as the charge rows, so they agree with the charges to the
 * point and cost O(accounts x routes x days), not O(calls). Days are UTC. */
#include "billing/reports.h"

#include "common/buf.h"

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int reports_parse_group_by(const char *s, int *mask)
{
    *mask = 0;
    if (!s || !*s) return 0;
    while (*s) {
        const char *comma = strchr(s, ',');
        size_t n = comma ? (size_t)(comma - s) : strlen(s);
        if (n == 7 && memcmp(s, "account", 7) == 0)
            *mask |= REPORT_BY_ACCOUNT;
        else if (n == 5 && memcmp(s, "route", 5) == 0)
            *mask |= REPORT_BY_ROUTE;
        else if (n == 3 && memcmp(s, "day", 3) == 0)
            *mask |= REPORT_BY_DAY;
        else
            return -1;
        s += n;
        if (*s == ',') {
            s++;
            if (!*s) return -1;
        }
    }
    return 0;
}

int reports_usage(PGconn *pg, const char *from, const char *to, int group_by, int64_t account,
                  report_usage *out)
{
    /* Only these constant fragments are spliced into the SQL; every value
     * travels as a parameter. */
    char cols[128] = "", sql[1024], accts[24], maxs[16];
    const char *p[4] = {from, to, accts, maxs};
    PGresult *r;
    int c = 0;

    memset(out, 0, sizeof *out);
    out->group_by = group_by;
    if (group_by & REPORT_BY_ACCOUNT)
        strcat(cols, "account_id, ");
    else
        strcat(cols, "0::bigint, ");
    if (group_by & REPORT_BY_ROUTE)
        strcat(cols, "route, ");
    else
        strcat(cols, "''::text, ");
    if (group_by & REPORT_BY_DAY)
        strcat(cols, "to_char(day, 'YYYY-MM-DD'), ");
    else
        strcat(cols, "''::text, ");
    snprintf(sql, sizeof sql,
             "SELECT %s sum(calls)::bigint, sum(points)::bigint, sum(failed_calls)::bigint "
             "FROM usage_daily WHERE day >= $1::date AND day < $2::date "
             "AND ($3::bigint = 0 OR account_id = $3::bigint) "
             "GROUP BY 1, 2, 3 HAVING count(*) > 0 ORDER BY 1, 2, 3 LIMIT $4::int",
             cols);
    snprintf(accts, sizeof accts, "%" PRId64, account);
    snprintf(maxs, sizeof maxs, "%d", REPORTS_MAX_ROWS + 1);
    r = ledger_query(pg, sql, 4, p);
    if (!r) return LEDGER_ERROR;
    if (PQntuples(r) > REPORTS_MAX_ROWS) {
        PQclear(r);
        return LEDGER_LIMIT;
    }
    out->nrows = PQntuples(r);
    out->rows = calloc((size_t)out->nrows + 1, sizeof *out->rows);
    if (!out->rows) {
        PQclear(r);
        return LEDGER_ERROR;
    }
    for (int i = 0; i < out->nrows; i++) {
        report_row *row = &out->rows[c++];
        row->account_id = strtoll(PQgetvalue(r, i, 0), NULL, 10);
        snprintf(row->route, sizeof row->route, "%s", PQgetvalue(r, i, 1));
        snprintf(row->day, sizeof row->day, "%s", PQgetvalue(r, i, 2));
        row->calls = strtoll(PQgetvalue(r, i, 3), NULL, 10);
        row->points = strtoll(PQgetvalue(r, i, 4), NULL, 10);
        row->failed_calls = strtoll(PQgetvalue(r, i, 5), NULL, 10);
        out->totals.calls += row->calls;
        out->totals.points += row->points;
        out->totals.failed_calls += row->failed_calls;
    }
    PQclear(r);
    return LEDGER_OK;
}

void reports_usage_free(report_usage *u)
{
    free(u->rows);
    u->rows = NULL;
}

static json_t *reports_row_json(const report_row *row, int group_by)
{
    json_t *j = json_pack("{s:I, s:I, s:I}", "calls", (json_int_t)row->calls, "points",
                          (json_int_t)row->points, "failed_calls", (json_int_t)row->failed_calls);
    if (group_by & REPORT_BY_ACCOUNT)
        json_object_set_new(j, "account_id", json_integer(row->account_id));
    if (group_by & REPORT_BY_ROUTE) json_object_set_new(j, "route", json_string(row->route));
    if (group_by & REPORT_BY_DAY) json_object_set_new(j, "day", json_string(row->day));
    return j;
}

json_t *reports_usage_json(const report_usage *u)
{
    json_t *rows = json_array();
    for (int i = 0; i < u->nrows; i++)
        json_array_append_new(rows, reports_row_json(&u->rows[i], u->group_by));
    return json_pack("{s:o, s:o}", "rows", rows, "totals", reports_row_json(&u->totals, 0));
}

/* Appends S as one CSV field, quoted when RFC 4180 requires it. */
static int reports_csv_field(struct buf *b, const char *s, int last)
{
    int quote = strpbrk(s, ",\"\r\n") != NULL;
    char *o;
    /* The most the field can take: every byte doubled, two quotes, the
     * separator (two for CRLF) and the NUL. */
    if (buf_reserve(b, strlen(s) * 2 + 5) != BUF_OK) return -1;
    o = b->p + b->len;
    if (quote) *o++ = '"';
    for (; *s; s++) {
        if (*s == '"') *o++ = '"';
        *o++ = *s;
    }
    if (quote) *o++ = '"';
    if (last) {
        *o++ = '\r';
        *o++ = '\n';
    } else {
        *o++ = ',';
    }
    *o = '\0';
    b->len = (size_t)(o - b->p);
    return 0;
}

char *reports_usage_csv(const report_usage *u)
{
    struct buf b;
    char num[24];
    int g = u->group_by, err = 0;
    buf_init(&b, SIZE_MAX); /* bounded by the report's rows */
    if (g & REPORT_BY_ACCOUNT) err |= reports_csv_field(&b, "account_id", 0);
    if (g & REPORT_BY_ROUTE) err |= reports_csv_field(&b, "route", 0);
    if (g & REPORT_BY_DAY) err |= reports_csv_field(&b, "day", 0);
    err |= reports_csv_field(&b, "calls", 0);
    err |= reports_csv_field(&b, "points", 0);
    err |= reports_csv_field(&b, "failed_calls", 1);
    for (int i = 0; i < u->nrows && !err; i++) {
        const report_row *row = &u->rows[i];
        if (g & REPORT_BY_ACCOUNT) {
            snprintf(num, sizeof num, "%" PRId64, row->account_id);
            err |= reports_csv_field(&b, num, 0);
        }
        if (g & REPORT_BY_ROUTE) err |= reports_csv_field(&b, row->route, 0);
        if (g & REPORT_BY_DAY) err |= reports_csv_field(&b, row->day, 0);
        snprintf(num, sizeof num, "%" PRId64, row->calls);
        err |= reports_csv_field(&b, num, 0);
        snprintf(num, sizeof num, "%" PRId64, row->points);
        err |= reports_csv_field(&b, num, 0);
        snprintf(num, sizeof num, "%" PRId64, row->failed_calls);
        err |= reports_csv_field(&b, num, 1);
    }
    if (err) {
        buf_free(&b);
        return NULL;
    }
    return buf_detach(&b, NULL);
}

/* The statement's queries, inside its read-only snapshot. */
static int reports_statement_tx(PGconn *pg, const char *ids, const char *start, const char *end,
                                report_statement *s)
{
    const char *p[3] = {ids, start, end};
    PGresult *r;
    /* Month bounds: dates for the rollup, UTC instants for credit entries. */
    r = ledger_query(
        pg,
        "SELECT"
        " (SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries WHERE account_id = $1"
        "   AND created_at < ($2::date::timestamp AT TIME ZONE 'UTC')),"
        " (SELECT coalesce(sum(points), 0)::bigint FROM usage_daily WHERE account_id = $1"
        "   AND day < $2::date),"
        " (SELECT coalesce(sum(amount), 0)::bigint FROM ledger_entries WHERE account_id = $1"
        "   AND created_at >= ($2::date::timestamp AT TIME ZONE 'UTC')"
        "   AND created_at < ($3::date::timestamp AT TIME ZONE 'UTC')),"
        " (SELECT coalesce(sum(points), 0)::bigint FROM usage_daily WHERE account_id = $1"
        "   AND day >= $2::date AND day < $3::date),"
        " EXISTS (SELECT 1 FROM accounts WHERE id = $1),"
        " (SELECT to_char(closed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
        "   FROM ledger_periods WHERE month >= $2::date ORDER BY month LIMIT 1)",
        3, p);
    if (!r) return LEDGER_ERROR;
    if (PQgetvalue(r, 0, 4)[0] != 't') {
        PQclear(r);
        return LEDGER_NOT_FOUND;
    }
    s->opening = strtoll(PQgetvalue(r, 0, 0), NULL, 10) - strtoll(PQgetvalue(r, 0, 1), NULL, 10);
    s->credits = strtoll(PQgetvalue(r, 0, 2), NULL, 10);
    s->charges = strtoll(PQgetvalue(r, 0, 3), NULL, 10);
    s->closing = s->opening + s->credits - s->charges;
    snprintf(s->closed_at, sizeof s->closed_at, "%s", PQgetvalue(r, 0, 5));
    PQclear(r);

    r = ledger_query(pg,
                     "SELECT " LEDGER_ENTRY_COLS " FROM ledger_entries WHERE account_id = $1"
                     " AND created_at >= ($2::date::timestamp AT TIME ZONE 'UTC')"
                     " AND created_at < ($3::date::timestamp AT TIME ZONE 'UTC') ORDER BY id",
                     3, p);
    if (!r) return LEDGER_ERROR;
    s->nentries = PQntuples(r);
    s->entries = calloc((size_t)s->nentries + 1, sizeof *s->entries);
    if (!s->entries) {
        PQclear(r);
        return LEDGER_ERROR;
    }
    for (int i = 0; i < s->nentries; i++)
        ledger_fill_entry(&s->entries[i], r, i);
    PQclear(r);

    r = ledger_query(pg,
                     "SELECT route, sum(calls)::bigint, sum(points)::bigint,"
                     " sum(failed_calls)::bigint FROM usage_daily WHERE account_id = $1"
                     " AND day >= $2::date AND day < $3::date GROUP BY route ORDER BY route",
                     3, p);
    if (!r) return LEDGER_ERROR;
    s->nroutes = PQntuples(r);
    s->routes = calloc((size_t)s->nroutes + 1, sizeof *s->routes);
    if (!s->routes) {
        PQclear(r);
        return LEDGER_ERROR;
    }
    for (int i = 0; i < s->nroutes; i++) {
        snprintf(s->routes[i].route, sizeof s->routes[i].route, "%s", PQgetvalue(r, i, 0));
        s->routes[i].calls = strtoll(PQgetvalue(r, i, 1), NULL, 10);
        s->routes[i].points = strtoll(PQgetvalue(r, i, 2), NULL, 10);
        s->routes[i].failed_calls = strtoll(PQgetvalue(r, i, 3), NULL, 10);
    }
    PQclear(r);
    return LEDGER_OK;
}

int reports_statement(PGconn *pg, int64_t account, const char *month, report_statement *out)
{
    char next[8], ids[24], start[11], end[11];
    PGresult *r;
    int rc;
    memset(out, 0, sizeof *out);
    if (calendar_valid_month(month, next) != 0) return LEDGER_CONFLICT;
    out->account_id = account;
    snprintf(out->month, sizeof out->month, "%s", month);
    snprintf(ids, sizeof ids, "%" PRId64, account);
    snprintf(start, sizeof start, "%s-01", month);
    snprintf(end, sizeof end, "%s-01", next);
    /* One snapshot for every figure, so they add up even while settling. */
    r = ledger_query(pg, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 0, NULL);
    if (!r) return LEDGER_ERROR;
    PQclear(r);
    rc = reports_statement_tx(pg, ids, start, end, out);
    r = ledger_query(pg, rc == LEDGER_OK ? "COMMIT" : "ROLLBACK", 0, NULL);
    if (r)
        PQclear(r);
    else
        rc = LEDGER_ERROR;
    if (rc != LEDGER_OK) reports_statement_free(out);
    return rc;
}

void reports_statement_free(report_statement *s)
{
    free(s->entries);
    free(s->routes);
    s->entries = NULL;
    s->routes = NULL;
}

json_t *reports_statement_json(const report_statement *s)
{
    json_t *entries = json_array(), *routes = json_array();
    for (int i = 0; i < s->nentries; i++) {
        const ledger_entry *e = &s->entries[i];
        json_t *j = json_pack("{s:I, s:s, s:I, s:s}", "id", (json_int_t)e->id, "kind", e->kind,
                              "amount", (json_int_t)e->amount, "created_at", e->created_at);
        json_object_set_new(j, "reference",
                            e->reference[0] ? json_string(e->reference) : json_null());
        json_object_set_new(j, "reason", e->reason[0] ? json_string(e->reason) : json_null());
        json_object_set_new(j, "operator", json_string(e->operator_name));
        json_array_append_new(entries, j);
    }
    for (int i = 0; i < s->nroutes; i++)
        json_array_append_new(routes, json_pack("{s:s, s:I, s:I, s:I}", "route", s->routes[i].route,
                                                "calls", (json_int_t)s->routes[i].calls, "points",
                                                (json_int_t)s->routes[i].points, "failed_calls",
                                                (json_int_t)s->routes[i].failed_calls));
    return json_pack("{s:I, s:s, s:I, s:{s:I, s:o}, s:{s:I, s:o}, s:I, s:o}", "account_id",
                     (json_int_t)s->account_id, "month", s->month, "opening",
                     (json_int_t)s->opening, "credits", "total", (json_int_t)s->credits, "entries",
                     entries, "charges", "total", (json_int_t)s->charges, "by_route", routes,
                     "closing", (json_int_t)s->closing, "closed",
                     s->closed_at[0] ? json_string(s->closed_at) : json_null());
}
