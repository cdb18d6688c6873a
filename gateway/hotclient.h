/* hotclient.h: the worker's asynchronous Redis client for the hot balances.
 * Owns one hiredis async connection on the worker's event base (every
 * in-flight command pipelined on it), the script SHAs, reconnection with
 * backoff, a bounded queue of settles to resend after a reconnect (its
 * overflow, and what is left in it at the end, go to the worker's spill
 * file), and the poll of the settlement backlog (pg:backlog).
 * Does not decide anything about calls: request.c does; this module turns
 * replies into numbers. Single-threaded: used only by its worker thread. */
#ifndef GATEWAY_HOTCLIENT_H
#define GATEWAY_HOTCLIENT_H

#include "common/hotkeys.h"
#include "common/redisurl.h"

#include <event2/event.h>
#include <stdint.h>

typedef struct hotclient hotclient;

/* Negative RCs a callback gets (request.c answers each with 503
 * billing_unavailable, its message saying which):
 *   HOT_ERR_UNAVAILABLE  Redis unreachable, an error, no usable reply, or
 *                        this worker refusing reserves while its resend
 *                        queue is past its bound (fail closed)
 *   HOT_ERR_BACKLOG      the settlement backlog (pg:backlog, polled) is at
 *                        OUTBOX_MAX_BACKLOG: reserves only, never settles
 *   HOT_ERR_NODATA       a key lookup found no key AND pg:epoch is absent:
 *                        Redis lost its data (billing rebuilds it), so "no
 *                        such key" cannot be told; never cached as unknown */
#define HOT_ERR_UNAVAILABLE (-1)
#define HOT_ERR_BACKLOG (-2)
#define HOT_ERR_NODATA (-3)

/* The answers, one struct per script or command. hotclient.c decodes each
 * reply by position into hot_reply.v, once; everything else reads the
 * named fields. Every member is int64_t and in the order of the reply, so
 * each struct is a view of v (checked at compile time in hotclient.c). */

/* The limit a reserve met: the one that refused (status RATE_LIMITED), or
 * the rate limit closest to refusing (flags & HOT_RESERVE_F_RATE): at most
 * QUOTA calls per WINDOW_MS, REMAINING left, RESET_MS until one more. */
typedef struct hot_rate_info {
    int64_t quota, window_ms, remaining, reset_ms;
} hot_rate_info;
/* The spending cap that refused (status CAPPED): CAP points per PERIOD
 * (HOT_CAP_DAILY or HOT_CAP_MONTHLY), LEFT of it now, RESET_MS until the
 * period ends. */
typedef struct hot_cap_info {
    int64_t cap, period, left, reset_ms;
} hot_cap_info;
#define HOT_CAP_DAILY 1
#define HOT_CAP_MONTHLY 2
/* The Idempotency-Key's verdict (statuses HOT_RESERVE_REPLAY..): for
 * IDEM_NOT_KEPT the first answer's STATUS and WHY it was not kept
 * (HOT_IDEM_TOO_LARGE, HOT_IDEM_LATE); for IDEM_IN_FLIGHT and IDEM_BUDGET,
 * RETRY_MS until a retry may pass. */
typedef struct hot_idem_info {
    int64_t status, why, unused, retry_ms;
} hot_idem_info;
#define HOT_IDEM_TOO_LARGE 1
#define HOT_IDEM_LATE 2

/* reserve.lua, per op: STATUS (HOT_RESERVE_*), the account's AVAILABLE and
 * HELD points after it, FLAGS (HOT_RESERVE_F_*), then what the status says. */
typedef struct hot_reserve_reply {
    int64_t status, available, held, flags;
    union {
        hot_rate_info rate;
        hot_cap_info cap;
        hot_idem_info idem;
    };
} hot_reserve_reply;
/* settle.lua, per op: STATUS 1 settled, 0 no such hold, HOT_STATUS_UNUSABLE
 * not applied (CHARGED 0); CHARGED points; the account's AVAILABLE. */
typedef struct hot_settle_reply {
    int64_t status, charged, available;
} hot_settle_reply;
/* The account's hash: CREDITED, SPENT, HELD (a lease's free points counted
 * as available, not held), LIMITED (1: under limits). */
typedef struct hot_balance_reply {
    int64_t credited, spent, held, limited;
} hot_balance_reply;
/* One scope's caps and counters in pg:{A}:lim (0 where absent): DAY is days
 * since 1970 and MONTH YYYYMM of the counters (another period's are stale,
 * i.e. 0). */
typedef struct hot_cap_counters {
    int64_t daily_cap, monthly_cap, day, day_spent, day_held, month, month_spent, month_held;
} hot_cap_counters;
typedef struct hot_caps_reply {
    hot_cap_counters account, key;
} hot_caps_reply;

#define HOT_CAP_FIELDS 16
#define HOT_V_MAX (HOT_RESERVE_REPLY > HOT_CAP_FIELDS ? HOT_RESERVE_REPLY : HOT_CAP_FIELDS)
typedef union hot_reply {
    int64_t v[HOT_V_MAX]; /* by position: hotclient.c's decoding only */
    hot_reserve_reply reserve;
    hot_settle_reply settle;
    hot_balance_reply balance;
    hot_caps_reply caps;
} hot_reply;

/* RC: 0 success with R filled (the member of the command's kind: reserve,
 * settle, balance or caps; the rest 0), 1 "not found" (key unknown, account
 * unknown), < 0 one of the HOT_ERR codes above (R all zeros). R is never
 * NULL. Called exactly once per accepted command, from the loop. */
typedef void (*hot_cb)(void *arg, int rc, const hot_reply *r);

/* hot_settle_args.commit: what settle.lua is asked to do with the hold. */
#define HOT_SETTLE_RELEASE 0
#define HOT_SETTLE_COMMIT 1
/* A replayed commit (spill.h): a commit if the hold is still there, else a
 * charge from available if the sweeper expired it (settle.lua). */
#define HOT_SETTLE_LATE 2

/* A call's Idempotency-Key (gateway/idem.h): the SHA-256 of the key and
 * the request's fingerprint. */
typedef struct hot_idem_args {
    unsigned char key[32];
    unsigned char fp[32];
} hot_idem_args;

typedef struct hot_settle_args {
    int64_t account;
    char rid[33];
    int64_t charge;
    int commit; /* HOT_SETTLE_* */
    long status;
    int replay; /* the caller resends it on failure: not queued here */
    /* The call carried an Idempotency-Key: a release clears its in-flight
     * marker, a commit (or late) stores IDEM_VAL (settle.lua's marker,
     * borrowed: valid until CB runs) or, without one, the marker of a
     * billable answer not kept (IDEM_WHY_LATE: a settle queued, resent or
     * spilled keeps no answer). */
    int has_idem;
    hot_idem_args idem;
    const char *idem_val;
    size_t idem_len;
} hot_settle_args;

struct spill_file;
/* Bounds and where overflow goes (hotclient_configure). */
typedef struct hot_limits {
    int64_t max_backlog;      /* OUTBOX_MAX_BACKLOG: refuse reserves at pg:backlog >= this */
    size_t queue_max;         /* settles kept for resending; past it they are spilled */
    struct spill_file *spill; /* the worker's spill file (spill.h), or NULL */
    int64_t idem_ttl_ms;      /* IDEMPOTENCY_TTL: how long a stored answer is kept */
    int64_t idem_budget;      /* IDEMPOTENCY_ACCOUNT_BYTES: stored answers per account */
} hot_limits;

/* Connects to URL's host (resolved here, blocking: call before the loop
 * runs) and keeps reconnecting; every connection authenticates (AUTH as the
 * URL's user) and SELECTs its db before anything else is sent on it. */
int hotclient_new(struct event_base *base, const redisurl *url, hotclient **out);
/* Sets the bounds (default: no backlog bound, HOT_SETTLE_QUEUE_MAX, no
 * spill) and starts polling pg:backlog. L->spill must outlive HC. */
void hotclient_configure(hotclient *hc, const hot_limits *l);
/* Closes the connection; callbacks of commands still in flight run with -1.
 * Settles still undelivered then are written to the spill file (if any). */
void hotclient_free(hotclient *hc);
/* 1 while this worker refuses new reserves (backlog at its bound, resend
 * queue past its soft bound, or settles spilled while running): lease.c
 * takes no more from and grows no lease then. */
int hotclient_refusing(const hotclient *hc);
/* Settles waiting in the resend queue (not those in flight). */
size_t hotclient_queued(const hotclient *hc);
/* 1 once settles went to the spill file while running (hotclient_refusing
 * then stays 1); hotclient_spill_replayed says they are in Redis now. */
int hotclient_spilled(const hotclient *hc);
void hotclient_spill_replayed(hotclient *hc);

/* Writes every settle not yet delivered (queued or about to be sent) to SP
 * and keeps them: a snapshot while a graceful stop drains (spill.h).
 * Returns the number not written (logged). */
long hotclient_spill_queue(const hotclient *hc, struct spill_file *sp);
/* Where overflow, and what is left at hotclient_free, is written from now on. */
void hotclient_spill_to(hotclient *hc, struct spill_file *sp);

/* 1 while connected or connecting (commands are queued by hiredis then). */
int hotclient_up(const hotclient *hc);
/* The current connection's number (each successful connect makes a new
 * one), 0 while not connected: a reply on an older connection says nothing
 * of what Redis holds now (it may have restarted without its data). */
unsigned hotclient_epoch(const hotclient *hc);
/* Commands and queued settles not yet answered. */
int hotclient_busy(const hotclient *hc);

/* What the client has seen since its start, for the metrics. */
typedef struct hot_stats {
    uint64_t replies;  /* round trips: a batch of ops is one */
    uint64_t errors;   /* error replies, and replies lost with their connection */
    uint64_t connects; /* connections made (and accepted by the handshake) */
    int64_t backlog;   /* pg:backlog as last polled */
    int refusing;      /* hotclient_refusing */
} hot_stats;
void hotclient_get_stats(const hotclient *hc, hot_stats *out);

/* Each returns 0 when the command was sent (CB will run), -1 when Redis is
 * down (CB will not run). */
/* A key's mirror value (billing/keys.h): account (-1: revoked), key id (0:
 * a value of the older "account" form), expiry in wall-clock ms (0: none),
 * and its scopes, "route,route" (SCOPES_LEN 0: every route), pointing into
 * the reply: valid during the callback only. */
typedef struct hot_key_info {
    int64_t account, key_id, expires_ms;
    const char *scopes;
    size_t scopes_len;
} hot_key_info;
/* RC as for hot_cb; K filled when RC is 0. */
typedef void (*hot_key_cb)(void *arg, int rc, const hot_key_info *k);
int hotclient_key(hotclient *hc, const char *hash_hex, hot_key_cb cb, void *arg);
int hotclient_balance(hotclient *hc, int64_t account, hot_cb cb, void *arg);
/* The spending caps of ACCOUNT and of its key KEY_ID (0: the account's
 * only) as reserve.lua keeps them in pg:{A}:lim: R->caps. */
int hotclient_caps(hotclient *hc, int64_t account, int64_t key_id, hot_cb cb, void *arg);
/* What reserve.lua checks a call's limits with (NULL: key 0, no route rate):
 * the API key's id and the route's rate limit per key (0 0: none). */
typedef struct hot_limit_args {
    int64_t key_id;
    int64_t rate_quota, rate_window_ms;
} hot_limit_args;
/* IDEM (NULL: none): the call's Idempotency-Key, checked first (reserve.lua
 * statuses 4..8, HOT_RESERVE_REPLAY..); a call held with one leaves its
 * in-flight marker, which its settle (has_idem) stores or clears. */
int hotclient_reserve(hotclient *hc, int64_t account, const char *rid, int64_t amount,
                      int64_t ttl_ms, const char *route_id, const hot_limit_args *lim,
                      const hot_idem_args *idem, hot_cb cb, void *arg);
/* Inside a reserve's callback with status HOT_RESERVE_REPLAY: the stored
 * answer (idem.h's idem_answer_parse), valid until the callback returns;
 * NULL otherwise. */
const char *hotclient_reserve_answer(const hotclient *hc, size_t *len);
/* Settle is never lost to a Redis outage or refusal: if it cannot be
 * delivered or Redis answers an error, it is queued and resent (on
 * reconnect, or with backoff while connected); CB then gets -1. The queue
 * is bounded (hot_limits.queue_max): at half of it new reserves are
 * refused (HOT_ERR_UNAVAILABLE), past it settles go to the spill file, and
 * what is still queued when the client is freed too. A reserve without a
 * usable answer gets a release queued the same way. A settle with
 * a->replay set is never queued: CB gets -1 and the caller resends. Ops
 * of one loop pass go to Redis as one script call per kind. */
int hotclient_settle(hotclient *hc, const hot_settle_args *a, hot_cb cb, void *arg);

/* One op of a point lease (billing/lease.lua; lease.c decides them). */
typedef struct hot_lease_args {
    int64_t account;
    const char *lid;
    int64_t seq, ttl_ms, charge, resize, busy;
    int close; /* 1: the worker closes it: an op that leaves it empty drops it;
                  HOT_LEASE_LATE: a replayed op (spill.h, lease.lua's `late`) */
    int nrec;  /* the outbox entry's fields: 2 per record, <= 2 * HOT_LEASE_RECORDS_MAX */
    const char *const *recs;
    const size_t *lens;
} hot_lease_args;
#define HOT_LEASE_RECORDS_MAX 256
#define HOT_LEASE_LATE 2
/* lease.lua's answer: STATUS (1 applied, 2 applied before, 0 no such
 * lease, < 0 account unknown or unusable), the lease's AMOUNT now, the
 * account's AVAILABLE, CONTENDED (1: give the free points back), and
 * CHARGED: the op's records [0, charged) were charged and appended, the
 * rest (an op short of points, past what the lease and the available
 * points cover) were not. */
typedef struct hot_lease_reply {
    int64_t status, amount, available, contended, charged;
} hot_lease_reply;
typedef void (*hot_lease_cb)(void *arg, int rc, const hot_lease_reply *r);
/* Sends one lease op at once (lease.c sends at most one per lease at a
 * time, at the end of a loop pass). 0 when sent: CB runs once, with -1 if
 * no usable reply came (the op may or may not have been applied: lease.lua
 * makes a resend with the same seq harmless). -1 when it could not be sent
 * (Redis down): CB will not run. Not queued here: lease.c keeps the op. */
int hotclient_lease(hotclient *hc, const hot_lease_args *a, hot_lease_cb cb, void *arg);

#endif
