/* status.h: the on-call report of `billing status` and GET /v1/status: the
 * stores' reachability, the outbox (backlog, lag, pending claims), dead
 * letters, holds and leases, and a reconcile of Redis against Postgres.
 * Owns how those figures are read and compared, and the JSON; does not own
 * the connections (the caller's) nor the CLI's table layout (status_print). */
#ifndef POINTGATE_BILLING_STATUS_H
#define POINTGATE_BILLING_STATUS_H

#include "billing/hot.h"

#include <jansson.h>
#include <libpq-fe.h>
#include <stdio.h>

/* Exit codes of `billing status` (and the verdict of status_build). */
#define STATUS_OK 0
#define STATUS_UNREACHABLE 1
#define STATUS_MISMATCH 5

/* Bounds: a report never reads more than this. */
#define STATUS_MAX_ACCOUNTS 10000
#define STATUS_MAX_HOLDS 100000
#define STATUS_MAX_OUTBOX_RECORDS 1000000
#define STATUS_MAX_LISTED 1000

/* The report. PG may be NULL or broken (PG_ERROR then says why, or NULL
 * for PQerrorMessage); HOT is a client that may fail. *VERDICT gets a
 * STATUS_* code. NULL only when out of memory. */
json_t *status_build(PGconn *pg, const char *pg_error, hot_conn *hot, int *verdict);

/* Prints REPORT as tables to F. */
void status_print(FILE *f, const json_t *report);

/* `billing status [--json]`: ARGV after "status". */
int status_cli(int argc, char **argv);

#endif
