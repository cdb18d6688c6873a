/* periods.h: closed months (schema/011, ledger_periods). A month is closed
 * once its statement is issued: by `billing period close` or POST
 * /v1/periods/{YYYY-MM}/close, or by billing's archive pass
 * STATEMENT_CLOSE_DAYS after the month's end. Closing a month closes every
 * month before it. From then on its statements never change: a charge
 * settled later for a call of a closed month is booked on the day it is
 * settled (ledger.c's period rule), with its original time kept.
 *
 * Owns the close and the list; does not own the statements (reports.c)
 * nor where a charge is booked (ledger.c). */
#ifndef POINTGATE_PERIODS_H
#define POINTGATE_PERIODS_H

#include <jansson.h>
#include <libpq-fe.h>
#include <stdint.h>

/* Closes MONTH ("YYYY-MM", validated here) as BY: LEDGER_OK (*CLOSED 1, or
 * 0 when it was closed already), LEDGER_CONFLICT when the month has not
 * ended (UTC), LEDGER_ERROR. The close waits for the settlement statements
 * in flight, which read the periods (ledger.c): none of them can book into
 * the month after the close commits. */
int periods_close(PGconn *pg, const char *month, const char *by, int *closed);

/* Closes the last month that ended at least DAYS days ago (and so every
 * one before it), as "billing". */
int periods_auto_close(PGconn *pg, int64_t days, int *closed);

/* POST /v1/periods/{YYYY-MM}/close and GET /v1/periods; the HTTP status,
 * *OUT the JSON body (webhooks.h conventions). */
int periods_api_close(PGconn *pg, const char *month, size_t len, const char *by, json_t **out);
int periods_api_list(PGconn *pg, json_t **out);

#endif
