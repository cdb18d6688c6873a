/* alerts.h: balance thresholds and their crossings (schema/007,
 * balance_alerts). Owns what "low" and "exhausted" mean, when a threshold
 * fires and when it is armed again, and the admin API's and CLI's alerts
 * calls. Events go out through webhooks.c's outbox.
 *
 * The balance watched is Postgres's credited - spent: settled charges only.
 * Redis's available would react a settlement lag sooner, but it also drops
 * by every hold in flight and by every point lease a gateway takes (up to
 * a quarter of what is available at once), so it would fire on points that
 * come back a moment later; and only Postgres can change the crossing
 * state and write the event in one transaction. Cost: an alert fires one
 * settlement lag plus at most WEBHOOK_WATCH_INTERVAL_MS after the charge
 * that crossed it.
 *
 * A threshold T (kind "low", at most ALERTS_MAX_THRESHOLDS per account)
 * fires balance.low once when the balance falls below T while it is armed,
 * and is armed again when the balance is back at or above T (only a credit
 * raises a balance). balance.exhausted is the same with T = exhausted_below
 * (default 1: no point left; set it to the price of the cheapest route to
 * mean "no call can be paid any more"); every account with an endpoint or
 * alert settings is watched for it. A threshold the balance is already
 * below when it is set starts disarmed: nothing was crossed. */
#ifndef POINTGATE_ALERTS_H
#define POINTGATE_ALERTS_H

#include "billing/events.h"

#include <jansson.h>
#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>

#define ALERTS_MAX_THRESHOLDS 10
#define ALERTS_MAX_POINTS 1000000000000LL

/* Makes sure ACCOUNT is watched for balance.exhausted (inside the caller's
 * transaction; idempotent). */
int alerts_ensure_exhausted(PGconn *pg, int64_t account);

struct control_ctx;
/* PUT /v1/accounts/{id}/alerts {"thresholds":[...], "exhausted_below":N}
 * and GET; the HTTP status, *OUT the JSON body (webhooks.h conventions). */
int alerts_api_put(struct control_ctx *c, int64_t account, const char *body, size_t len,
                   json_t **out);
int alerts_api_get(struct control_ctx *c, int64_t account, json_t **out);

#endif
