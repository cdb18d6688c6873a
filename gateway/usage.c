/* usage.c: /_billing/usage (see usage.h). */
#include "gateway/usage.h"

#include "common/calendar.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

/* Grouped by route and day and ordered like the finance report
 * (billing/reports.c's usage grouped by route and day for the account). One
 * row past the limit tells "too many" from "exactly the limit", which is
 * the finance report's (REPORTS_MAX_ROWS). */
#define USAGE_MAX_ROWS 100000
#define USAGE_STR2(x) #x
#define USAGE_STR(x) USAGE_STR2(x)
const char *const usage_sql =
    "SELECT route, to_char(day, 'YYYY-MM-DD'), sum(calls)::bigint, sum(points)::bigint, "
    "sum(failed_calls)::bigint FROM usage_daily "
    "WHERE account_id = $1::bigint AND day >= $2::date AND day < $3::date "
    "GROUP BY 1, 2 ORDER BY 1, 2 LIMIT " USAGE_STR(USAGE_MAX_ROWS) " + 1";

/* Days since 1970-01-01 of a date checked by calendar_valid_date. */
static int64_t usage_day_number(const char *s)
{
    int64_t y = atoi(s), m = atoi(s + 5), d = atoi(s + 8);
    int64_t era, yoe, doy, doe;
    y -= m <= 2;
    era = y / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

int usage_check_range(const char *from, const char *to, const char **msg)
{
    if (calendar_valid_date(from) != 0 || calendar_valid_date(to) != 0) {
        *msg = "from and to must be dates YYYY-MM-DD (to exclusive)";
        return -1;
    }
    if (strcmp(from, to) >= 0) {
        *msg = "from must be before to";
        return -1;
    }
    if (usage_day_number(to) - usage_day_number(from) > USAGE_MAX_DAYS) {
        *msg = "at most 366 days per request";
        return -1;
    }
    return 0;
}

static json_t *usage_counts(json_t *o, int64_t calls, int64_t points, int64_t failed)
{
    if (!o) return NULL;
    if (json_object_set_new(o, "calls", json_integer(calls)) != 0 ||
        json_object_set_new(o, "points", json_integer(points)) != 0 ||
        json_object_set_new(o, "failed_calls", json_integer(failed)) != 0) {
        json_decref(o);
        return NULL;
    }
    return o;
}

char *usage_render(int64_t account, const char *from, const char *to, const PGresult *res,
                   unsigned *status)
{
    json_t *root, *rows;
    int64_t calls = 0, points = 0, failed = 0;
    char *out;
    int n;

    *status = 503;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQnfields(res) != 5) return NULL;
    n = PQntuples(res);
    if (n > USAGE_MAX_ROWS) {
        *status = 422;
        return NULL;
    }
    rows = json_array();
    if (!rows) return NULL;
    for (int i = 0; i < n; i++) {
        int64_t c = strtoll(PQgetvalue(res, i, 2), NULL, 10);
        int64_t p = strtoll(PQgetvalue(res, i, 3), NULL, 10);
        int64_t f = strtoll(PQgetvalue(res, i, 4), NULL, 10);
        json_t *row = json_object();
        if (row && (json_object_set_new(row, "route", json_string(PQgetvalue(res, i, 0))) != 0 ||
                    json_object_set_new(row, "day", json_string(PQgetvalue(res, i, 1))) != 0)) {
            json_decref(row);
            row = NULL;
        }
        if (json_array_append_new(rows, usage_counts(row, c, p, f)) != 0) {
            json_decref(rows);
            return NULL;
        }
        calls += c;
        points += p;
        failed += f;
    }
    /* "o" steals the references, also when json_pack fails. */
    root = json_pack("{s:I, s:s, s:s, s:o, s:o}", "account_id", (json_int_t)account, "from", from,
                     "to", to, "rows", rows, "totals",
                     usage_counts(json_object(), calls, points, failed));
    if (!root) return NULL;
    out = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (out) *status = 200;
    return out;
}
