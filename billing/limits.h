/* limits.h: rate limits and spending caps as settings (issue 12): their
 * rows in Postgres (schema/009_limits.sql), the JSON of the admin API, and
 * their push into Redis (limits.lua), where the gateway's reserve.lua
 * enforces them. Owns no connection and no enforcement: reserve.lua and
 * settle.lua keep the buckets and counters, the gateway answers the 429s. */
#ifndef POINTGATE_LIMITS_H
#define POINTGATE_LIMITS_H

#include "billing/control.h"

#include <jansson.h>
#include <stdint.h>

/* One scope's settings; 0 is "not set". */
typedef struct limits_spec {
    int64_t rate_quota, rate_window_s; /* calls per window; both or neither */
    int64_t daily_cap, monthly_cap;    /* points charged per UTC day, month */
} limits_spec;

enum limits_scope { LIMITS_ACCOUNT, LIMITS_KEY };

/* Parses a PUT body {"rate": {"quota", "window_s"} | null, "daily_cap": N |
 * null, "monthly_cap": N | null} (an absent field: not set; the body
 * replaces the scope's settings whole). NULL, or what is wrong with it. */
const char *limits_parse(json_t *body, limits_spec *out);
/* The settings as the API shows them (new reference, NULL out of memory). */
json_t *limits_json(const limits_spec *s);

/* Stores SPEC for the account or key ID, raises the account's limits_seq,
 * and pushes the account's snapshot to Redis. *ACCOUNT gets the account;
 * *PUSHED 0 when Redis did not take it (the repair pass pushes it within
 * CREDIT_SYNC_INTERVAL_MS). LEDGER_NOT_FOUND: no such account, or no such
 * live key. */
int limits_set(control_ctx *c, enum limits_scope scope, int64_t id, const limits_spec *spec,
               int64_t *account, int *pushed);
/* The stored settings of ID (all 0 when none). */
int limits_get(PGconn *pg, enum limits_scope scope, int64_t id, limits_spec *out, int64_t *account);

/* Pushes ACCOUNT's snapshot (its settings and its live keys', as of its
 * limits_seq) to Redis: 0, or -1 (Postgres or Redis failed). */
int limits_push(PGconn *pg, hot_conn *hot, int64_t account);
/* limits_push for every account that ever had limits (the repair pass). */
int limits_push_all(PGconn *pg, hot_conn *hot, long *pushed);

#endif
