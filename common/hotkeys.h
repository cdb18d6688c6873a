/* hotkeys.h: the Redis layout of hot balances, shared by gateway and billing.
 * Owns key names and the embedded Lua scripts; does not own any connection
 * (billing uses hot.c, synchronous; the gateway its own async client).
 *
 * Per account A, all under the hash tag {A} so one script touches one slot:
 *   pg:{A}:acct   hash  credited, seq, spent, held, leasefree (points of
 *                       leases not promised to a call), contend (ms of the
 *                       last reserve short of held points), limited ("1"
 *                       while the account or a key of it has a limit)
 *   pg:{A}:holds  hash  rid -> "amount|route|deadline" (deadline: ms since
 *                       epoch, Redis clock; the sweeper scans these hashes;
 *                       a capped hold "amount|route|c<day>.<month>.<key>|
 *                       deadline", reserve.lua),
 *   pg:{A}:idem:<sha256 hex of an Idempotency-Key>  string: the key's marker
 *                       (common/prelude.lua): "f|fp|rid|deadline" in
 *                       flight (PX the hold's ttl), "d|fp|rid|answer" or
 *                       "n|fp|rid|status|why" once billable (PX
 *                       IDEMPOTENCY_TTL); reserve.lua and settle.lua
 *   pg:{A}:idemb  hash  bytes of the answers stored per time bucket (24 per
 *                       TTL, prelude.lua): the account's budget
 *   pg:{A}:lim    hash  the limits of the account (a.*) and of its keys
 *                       (k<id>.*): settings rq rw (rate quota, window ms),
 *                       cd cm (daily, monthly cap), written by limits.lua;
 *                       state: tat.a, tat.k<id>.<route> (rate buckets, us),
 *                       <scope>.d .ds .dh, .m .ms .mh (cap counters: period,
 *                       spent, held), written by reserve.lua and settle.lua
 *                       and a gateway worker's lease L<id> ->
 *                       "amount|~lease|seq|free|deadline|soft" (lease.lua)
 * Global:
 *   pg:outbox     stream of settled calls (settle.lua), consumer group "settle";
 *                 one entry per settle batch: ts, then c = "rid|acct|route|
 *                 amount|hold|outcome|status" per call
 *   pg:key:<hex>  string: account id of a live API key, by key hash; "-1"
 *                 (HOT_KEY_REVOKED) once revoked: a tombstone that only
 *                 keypush.lua writes around, never over
 *   pg:epoch      string: written only by a repair pass that pushed every
 *                 account and key into this Redis (passend.lua); absent =
 *                 Redis lost its data (or was never filled)
 *   pg:rebuild:<token>  string: a repair pass in progress (its start);
 *                 gone = a loss since, so the pass may not write the epoch
 *   pg:{A}:rebuilt string, PX 5 min: A's hash was created from Postgres
 *                 after a loss; pushes raise spent to Postgres' (credit.lua)
 *   pg:backlog    string integer: outbox records (calls, not entries) not yet
 *                 applied to Postgres; settle.lua and lease.lua add the records
 *                 they append, settlement's outbox_ack.lua subtracts those of
 *                 the entries it deletes, in the same atomic steps; never < 0
 * Per account, for a gateway's spilled settles replayed late (settle.lua,
 * lease.lua, outcome/close "late"):
 *   pg:{A}:swept:<rid>     "hold|route" of a per-call hold the sweeper
 *                          expired (7 days)
 *   pg:{A}:swept:L<id>     last applied seq of a lease the sweeper released
 *                          whole past its deadline (7 days)
 *   pg:{A}:leaseshort:L<id> "seq|charged" of a lease op whose records did not
 *                          all fit (a day): a resend answers the same count
 */
#ifndef POINTGATE_HOTKEYS_H
#define POINTGATE_HOTKEYS_H

#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define HOT_OUTBOX "pg:outbox"
#define HOT_OUTBOX_GROUP "settle"
#define HOT_KEY_PREFIX "pg:key:"
#define HOT_KEYNAME_MAX 64
#define HOT_BACKLOG "pg:backlog"

/* Loss detection and revocation (creditsync.c, keypush.lua, passend.lua). */
#define HOT_EPOCH "pg:epoch"
#define HOT_KEY_REVOKED "-1"
#define HOT_REBUILD_PREFIX "pg:rebuild:"

typedef struct hot_keys {
    char acct[HOT_KEYNAME_MAX];
    char holds[HOT_KEYNAME_MAX];
    char lim[HOT_KEYNAME_MAX];
} hot_keys;

/* Most calls one reserve.lua / settle.lua run takes: bounds the gateway's
 * batches and so the outbox entries the settlement worker reads. */
#define HOT_BATCH_MAX 128

/* Fills the per-account key names. Cannot fail for a valid id. */
void hot_keys_for(hot_keys *k, int64_t account_id);

/* The swept mark of hold RID ("L<id>" for a lease) of ACCOUNT into OUT (CAP
 * bytes): 0, or -1 when it does not fit. */
static inline int hot_swept_key(char *out, size_t cap, int64_t account, const char *rid)
{
    int n = snprintf(out, cap, "pg:{%" PRId64 "}:swept:%s", account, rid);
    return n > 0 && (size_t)n < cap ? 0 : -1;
}

/* Script sources, NUL-terminated, generated at build from common/prelude.lua
 * (helpers they share) followed by billing/<name>.lua. */
extern const char hot_lua_reserve[];
extern const char hot_lua_settle[];
extern const char hot_lua_credit[];
extern const char hot_lua_lease[];
extern const char hot_lua_outbox_ack[];
extern const char hot_lua_keypush[];
extern const char hot_lua_passend[];
extern const char hot_lua_limits[];

/* Reply status codes of reserve.lua and settle.lua. */
enum {
    HOT_RESERVE_UNKNOWN = -1,
    HOT_RESERVE_SHORT = 0,
    HOT_RESERVE_HELD = 1,
    HOT_RESERVE_RATE_LIMITED = 2, /* a rate limit refused: nothing taken */
    HOT_RESERVE_CAPPED = 3,       /* a spending cap refused: nothing taken */
    /* Idempotency-Key (reserve.lua), nothing taken: */
    HOT_RESERVE_REPLAY = 4,         /* the first call's answer (hotclient_reserve_answer) */
    HOT_RESERVE_IDEM_IN_FLIGHT = 5, /* the first call runs: t ms until its marker expires */
    HOT_RESERVE_IDEM_REUSED = 6,    /* the key came with another request */
    HOT_RESERVE_IDEM_NOT_KEPT = 7,  /* billable, answer not kept: q its status, w 1 large 2 late */
    HOT_RESERVE_IDEM_BUDGET = 8     /* the account's stored answers are at their budget: t ms */
};
/* reserve.lua's flags (its 4th integer per op, in the gateway's form). */
#define HOT_RESERVE_F_LIMITED 1 /* under limits: never served from a lease */
#define HOT_RESERVE_F_RATE 2    /* q w r t: the rate limit closest to refusing */
/* Integers reserve.lua answers per op in the gateway's form: status,
 * available, held, flags, q, w, r, t (reserve.lua). */
#define HOT_RESERVE_REPLY 8
/* Either script: the account's (or hold's) data in Redis is unusable;
 * nothing was changed for that op. */
#define HOT_STATUS_UNUSABLE (-2)

#endif
