/* usage.h: the caller's own usage report, GET /_billing/usage?from=&to=.
 * Owns the argument checks, the SQL (over the usage_daily rollups, the
 * same numbers as the finance report grouped by route and day) and the
 * JSON rendering. request.c authenticates and runs the query on the
 * worker's pgclient. */
#ifndef GATEWAY_USAGE_H
#define GATEWAY_USAGE_H

#include <libpq-fe.h>
#include <stdint.h>

#define USAGE_MAX_DAYS 366

/* The query and its three parameters: account, from, to. */
extern const char *const usage_sql;
#define USAGE_NPARAMS 3

/* 0 if FROM and TO are real dates, FROM < TO and at most USAGE_MAX_DAYS
 * apart; else -1 with a message for a 400. */
int usage_check_range(const char *from, const char *to, const char **msg);

/* The JSON answer for RES (a PGRES_TUPLES_OK result of usage_sql), malloc'd;
 * NULL when RES is not usable (STATUS gets the HTTP status to answer then:
 * 422 too many rows, 503 otherwise). */
char *usage_render(int64_t account, const char *from, const char *to, const PGresult *res,
                   unsigned *status);

#endif
