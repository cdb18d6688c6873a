/* reports.h: finance reports from the ledger: usage (from the daily
 * rollups, never from the charge rows, so its cost does not grow with
 * traffic) and monthly statements. Owns the queries, input validation of
 * dates/months/grouping and the JSON and CSV renderings; the HTTP API and
 * the CLI only pass arguments in and text out. */
#ifndef POINTGATE_REPORTS_H
#define POINTGATE_REPORTS_H

#include "billing/ledger.h"
#include "common/calendar.h"

#include <jansson.h>

#define REPORTS_MAX_ROWS 100000

enum { REPORT_BY_ACCOUNT = 1, REPORT_BY_ROUTE = 2, REPORT_BY_DAY = 4 };

typedef struct report_row {
    int64_t account_id;
    char route[129];
    char day[11];
    int64_t calls, points, failed_calls;
} report_row;

typedef struct report_usage {
    int group_by; /* REPORT_BY_* mask */
    report_row *rows;
    int nrows;
    report_row totals;
} report_usage;

typedef struct report_route {
    char route[129];
    int64_t calls, points, failed_calls;
} report_route;

typedef struct report_statement {
    int64_t account_id;
    char month[8];
    int64_t opening, credits, charges, closing;
    char closed_at[40];    /* "" while the month is open (periods.h) */
    ledger_entry *entries; /* credit entries of the month, oldest first */
    int nentries;
    report_route *routes; /* charges of the month by route */
    int nroutes;
} report_statement;

/* "account,route,day" (any subset, any order) into a mask; -1 if unknown. */
int reports_parse_group_by(const char *s, int *mask);

/* Usage between FROM (inclusive) and TO (exclusive); ACCOUNT 0 = all.
 * LEDGER_LIMIT when the result would exceed REPORTS_MAX_ROWS. */
int reports_usage(PGconn *pg, const char *from, const char *to, int group_by, int64_t account,
                  report_usage *out);
void reports_usage_free(report_usage *u);
json_t *reports_usage_json(const report_usage *u);
/* RFC 4180 CSV (CRLF, quoted where needed), header row first; malloc'd. */
char *reports_usage_csv(const report_usage *u);

/* The statement of ACCOUNT for MONTH (YYYY-MM, UTC), read in one snapshot:
 * opening + credits - charges = closing exactly. */
int reports_statement(PGconn *pg, int64_t account, const char *month, report_statement *out);
void reports_statement_free(report_statement *s);
json_t *reports_statement_json(const report_statement *s);

#endif
