/* pgclient.h: the worker's asynchronous Postgres connection, for the few
 * read-only queries the gateway answers itself (/_billing/usage). Owns one
 * lazily opened PGconn (libpq's non-blocking connect and query API driven
 * by the worker's libevent loop), one query at a time on it, and a bounded
 * FIFO of queries waiting their turn. Nothing on the billing path depends on
 * it: with Postgres down or DATABASE_URL unset, queries fail at once or
 * within the deadline and the rest of the gateway does not notice.
 * Single-threaded: used only by its worker thread. */
#ifndef GATEWAY_PGCLIENT_H
#define GATEWAY_PGCLIENT_H

#include <event2/event.h>
#include <libpq-fe.h>
#include <stdint.h>

#define PGCLIENT_QUEUE_MAX 256
#define PGCLIENT_PARAMS_MAX 4
#define PGCLIENT_PARAM_LEN 64

typedef struct pgclient pgclient;

/* RES is the query's result (PGRES_TUPLES_OK or an error result), or NULL
 * when Postgres could not be reached, the deadline passed, or the client is
 * shutting down. Valid during the call only. Runs from the loop, never from
 * inside pgclient_query. */
typedef void (*pg_cb)(void *arg, const PGresult *res);

/* CONNINFO: a libpq connection string or URI; NULL or "" disables the client
 * (every query answers -1). TIMEOUT_MS bounds a connect and each query. */
int pgclient_new(struct event_base *base, const char *conninfo, int64_t timeout_ms, pgclient **out);
/* Closes the connection; callbacks of queued queries run with NULL. */
void pgclient_free(pgclient *c);
/* Drops the connection; callbacks of queued queries run with NULL. */
void pgclient_fail_all(pgclient *c);
/* Queries queued or running. */
int pgclient_busy(const pgclient *c);

enum { PGCLIENT_DISABLED = -1, PGCLIENT_FULL = -2, PGCLIENT_UNAVAILABLE = -3 };

/* Queues SQL (a string constant: kept by pointer) with text PARAMS (copied).
 * 0: CB will run once. Negative (PGCLIENT_*): CB will not run. */
int pgclient_query(pgclient *c, const char *sql, int nparams, const char *const *params, pg_cb cb,
                   void *arg);

#endif
