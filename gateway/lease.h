/* lease.h: a worker's point leases (billing/lease.lua holds them in Redis).
 * Owns, per account that calls often through this worker, one hold of a
 * block of its points, from which calls are promised their price without a
 * Redis command each; the records of the calls it served, sent with one
 * lease op per lease per loop pass (which charges them and appends them to
 * the outbox); and the lease's life: growth while the account has plenty,
 * renewal, and return when idle, contended, or at shutdown.
 * Does not price calls nor decide billability (request.c), and does not
 * talk to Redis itself (hotclient.c). Single-threaded: its worker's loop.
 *
 * Why: per-call holds cost Redis a reserve and a settle script per call,
 * the largest part of the gateway's cost. With a lease the reserve is a
 * subtraction here, and the settle a share of one op per pass.
 *
 * The rules stay those of per-call holds: an answer goes out only once its
 * charge is in the outbox (or queued for it when Redis is away, as a settle
 * is); a lease's points are counted as held, so no call elsewhere can spend
 * them; and when a reserve is short while points are held, the lease stops
 * serving and gives its free points back (see lease.lua), so that the short
 * caller, waiting, gets them. A worker promises only on a recent answer
 * from Redis (a fence well inside lease.lua's soft deadline, after which
 * the sweeper gives a silent lease's free points back). */
#ifndef GATEWAY_LEASE_H
#define GATEWAY_LEASE_H

#include "gateway/hotclient.h"

#include <event2/event.h>
#include <stdint.h>

typedef struct lease lease;
typedef struct lease_table lease_table;

typedef struct lease_config {
    int64_t calls;   /* a lease's size, in calls of the price that started it; 0: no leases */
    int64_t idle_ms; /* returned after this long without a call */
    int64_t ttl_ms;  /* its deadline in Redis, renewed by every op */
} lease_config;

int lease_table_new(struct event_base *base, hotclient *hc, const lease_config *cfg,
                    lease_table **out);
struct spill_file;
/* Sends nothing more; writes every record not known to be in Redis to SP
 * (spill.h: replayed at the next start; without SP, or if that fails, the
 * sweeper expires the lease at cost 0 for them), then runs every waiting
 * record's callback with -1. Then hotclient_free, then lease_table_free. */
void lease_table_shutdown(lease_table *t, struct spill_file *sp);
/* Writes the same as lease_table_shutdown would, changing nothing: a
 * snapshot while a graceful stop drains (spill.h). */
void lease_table_spill(const lease_table *t, struct spill_file *sp);
/* Records of calls answered and not known to be in Redis yet. */
int lease_table_unsent(const lease_table *t);
void lease_table_free(lease_table *t);
/* Gives every lease back (worker stopping): no more takes. */
void lease_table_close(lease_table *t);
/* Leases still held or with records to send: the drain waits for 0. */
int lease_table_busy(const lease_table *t);
/* The leases T holds in Redis now (*N) and their points not yet charged
 * (*POINTS): the metrics' gauges. O(leases): for a timer, not a call. */
void lease_table_stats(const lease_table *t, int64_t *n, int64_t *points);

/* Promises PRICE from ACCOUNT's lease. Returns the lease (the call must end
 * it with lease_end), or NULL: no lease, or not enough free points in it
 * (then it asks for more), or Redis is away: use a per-call hold. */
lease *lease_take(lease_table *t, int64_t account, int64_t price);

/* A per-call hold of PRICE was just taken for ACCOUNT, leaving AVAILABLE:
 * starts a lease when the account has room for one. */
void lease_consider(lease_table *t, int64_t account, int64_t price, int64_t available);

/* Ends a call promised PRICE by L: its outbox record (rid, route, CHARGE
 * <= PRICE, commit or release, upstream STATUS) goes with the lease's next
 * op. CB (may be NULL) runs once, as hotclient_settle's: rc 0 and v =
 * {1, charged, available} once applied, {0, 0, available} when the lease
 * was gone (nothing charged), or rc -1 when Redis is away (the record is
 * kept and resent). It may run before this returns. */
void lease_end(lease *l, const char *rid, const char *route_id, int64_t price, int64_t charge,
               int commit, long status, hot_cb cb, void *arg);

#endif
