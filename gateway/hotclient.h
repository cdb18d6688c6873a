/* hotclient.h: the worker's asynchronous Redis client for the hot balances.
 * Owns one hiredis async connection on the worker's event base (every
 * in-flight command pipelined on it), the script SHAs, reconnection with
 * backoff, and a bounded queue of settles to resend after a reconnect.
 * Does not decide anything about calls: request.c does; this module turns
 * replies into numbers. Single-threaded: used only by its worker thread. */
#ifndef GATEWAY_HOTCLIENT_H
#define GATEWAY_HOTCLIENT_H

#include "billing/redisurl.h"

#include <event2/event.h>
#include <stdint.h>

typedef struct hotclient hotclient;

/* RC: 0 success with V filled, 1 "not found" (key unknown, account unknown),
 * -1 Redis unavailable or error. For reserve, V = {status, available, held};
 * settle {status, charged, available} (status 1 settled, 0 no such hold,
 * HOT_STATUS_UNUSABLE: not applied, charged 0); key {account}; balance {credited,
 * spent, held}. Called exactly once per accepted command, from the loop. */
typedef void (*hot_cb)(void *arg, int rc, const int64_t v[3]);

typedef struct hot_settle_args {
    int64_t account;
    char rid[33];
    int64_t charge;
    int commit;
    long status;
} hot_settle_args;

/* Connects to URL's host (resolved here, blocking: call before the loop
 * runs) and keeps reconnecting; every connection authenticates (AUTH as the
 * URL's user) and SELECTs its db before anything else is sent on it. */
int hotclient_new(struct event_base *base, const redisurl *url, hotclient **out);
/* Closes the connection; callbacks of commands still in flight run with -1. */
void hotclient_free(hotclient *hc);

/* 1 while connected or connecting (commands are queued by hiredis then). */
int hotclient_up(const hotclient *hc);
/* The current connection's number (each successful connect makes a new
 * one), 0 while not connected: a reply on an older connection says nothing
 * of what Redis holds now (it may have restarted without its data). */
unsigned hotclient_epoch(const hotclient *hc);
/* Commands and queued settles not yet answered. */
int hotclient_busy(const hotclient *hc);

/* Each returns 0 when the command was sent (CB will run), -1 when Redis is
 * down (CB will not run). */
int hotclient_key(hotclient *hc, const char *hash_hex, hot_cb cb, void *arg);
int hotclient_balance(hotclient *hc, int64_t account, hot_cb cb, void *arg);
int hotclient_reserve(hotclient *hc, int64_t account, const char *rid, int64_t amount,
                      int64_t ttl_ms, const char *route_id, hot_cb cb, void *arg);
/* Settle is never lost to a Redis outage or refusal: if it cannot be
 * delivered or Redis answers an error, it is queued (bounded) and resent
 * (on reconnect, or with backoff while connected); CB then gets -1. A
 * reserve without a usable answer gets a release queued the same way. Ops
 * of one loop pass go to Redis as one script call per kind. */
int hotclient_settle(hotclient *hc, const hot_settle_args *a, hot_cb cb, void *arg);

/* One op of a point lease (billing/lease.lua; lease.c decides them). */
typedef struct hot_lease_args {
    int64_t account;
    const char *lid;
    int64_t seq, ttl_ms, charge, resize, busy;
    int close; /* the worker closes it: an op that leaves it empty drops it */
    int nrec;  /* the outbox entry's fields: 2 per record, <= 2 * HOT_LEASE_RECORDS_MAX */
    const char *const *recs;
    const size_t *lens;
} hot_lease_args;
#define HOT_LEASE_RECORDS_MAX 256
/* V = {status, amount, available, contended} as lease.lua answers them. */
typedef void (*hot_lease_cb)(void *arg, int rc, const int64_t v[4]);
/* Sends one lease op at once (lease.c sends at most one per lease at a
 * time, at the end of a loop pass). 0 when sent: CB runs once, with -1 if
 * no usable reply came (the op may or may not have been applied: lease.lua
 * makes a resend with the same seq harmless). -1 when it could not be sent
 * (Redis down): CB will not run. Not queued here: lease.c keeps the op. */
int hotclient_lease(hotclient *hc, const hot_lease_args *a, hot_lease_cb cb, void *arg);

#endif
