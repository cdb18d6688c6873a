/* api.h: the admin and finance HTTP API on BILLING_LISTEN (libmicrohttpd +
 * jansson). Owns routing, authentication of operators, input validation and
 * JSON rendering; the operations themselves are control.c's and ledger.c's.
 * Runs on MHD's own thread pool: each thread has its own Postgres and Redis
 * connection (blocking calls are fine there; this is not the data plane). */
#ifndef POINTGATE_API_H
#define POINTGATE_API_H

#include "billing/config.h"

typedef struct api_server api_server;

/* Starts listening; NULL (logged) on failure. */
api_server *api_start(const billing_config *cfg);
void api_stop(api_server *s);

#endif
