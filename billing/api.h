/* api.h: the admin and finance HTTP API on BILLING_LISTEN (libmicrohttpd +
 * jansson). Owns routing, authentication of operators, input validation and
 * JSON rendering; the operations themselves are control.c's and ledger.c's.
 * Runs on MHD's own thread pool: each thread has its own Postgres and Redis
 * connection (blocking calls are fine there; this is not the data plane). */
#ifndef POINTGATE_API_H
#define POINTGATE_API_H

#include "billing/config.h"
#include "billing/metrics.h"

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

typedef struct api_server api_server;

/* Starts listening; NULL (logged) on failure. METRICS (or NULL) counts
 * requests by endpoint template and status, and credits. */
api_server *api_start(const billing_config *cfg, billing_metrics *metrics);
void api_stop(api_server *s);

/* ---- request bodies, parsed and checked without I/O (tests/fuzz too) ---- */

/* A top-up's or an adjustment's body; the strings point into the JSON. */
typedef struct api_credit_body {
    int64_t amount;
    const char *reference; /* NULL when absent (adjustments only) */
    const char *reason;    /* adjustments only */
} api_credit_body;

/* BUF[0..LEN) as a JSON object (duplicate names refused), or NULL with the
 * message in MSG. */
json_t *api_body_parse(const char *buf, size_t len, char *msg, size_t msglen);
/* POST /v1/accounts: NULL with *NAME set, or the message of the 400. */
const char *api_body_account(json_t *body, const char **name);
/* POST .../topups (IS_TOPUP) or .../adjustments: NULL with *OUT set, or the
 * message of the 400. */
const char *api_body_credit(json_t *body, int is_topup, api_credit_body *out);

#endif
