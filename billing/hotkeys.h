/* hotkeys.h: the Redis layout of hot balances, shared by gateway and billing.
 * Owns key names and the embedded Lua scripts; does not own any connection
 * (billing uses hot.c, synchronous; the gateway its own async client).
 *
 * Per account A, all under the hash tag {A} so one script touches one slot:
 *   pg:{A}:acct   hash  credited, seq, spent, held, leasefree (points of
 *                       leases not promised to a call), contend (ms of the
 *                       last reserve short of held points)
 *   pg:{A}:holds  hash  rid -> "amount|route|deadline" (deadline: ms since
 *                       epoch, Redis clock; the sweeper scans these hashes),
 *                       and a gateway worker's lease L<id> ->
 *                       "amount|~lease|seq|free|deadline|soft" (lease.lua)
 * Global:
 *   pg:outbox     stream of settled calls (settle.lua), consumer group "settle";
 *                 one entry per settle batch: ts, then c = "rid|acct|route|
 *                 amount|hold|outcome|status" per call
 *   pg:key:<hex>  string: account id of a live API key, by key hash
 */
#ifndef POINTGATE_HOTKEYS_H
#define POINTGATE_HOTKEYS_H

#include <stddef.h>
#include <stdint.h>

#define HOT_OUTBOX "pg:outbox"
#define HOT_OUTBOX_GROUP "settle"
#define HOT_KEY_PREFIX "pg:key:"
#define HOT_KEYNAME_MAX 64

typedef struct hot_keys {
    char acct[HOT_KEYNAME_MAX];
    char holds[HOT_KEYNAME_MAX];
} hot_keys;

/* Most calls one reserve.lua / settle.lua run takes: bounds the gateway's
 * batches and so the outbox entries the settlement worker reads. */
#define HOT_BATCH_MAX 128

/* Fills the per-account key names. Cannot fail for a valid id. */
void hot_keys_for(hot_keys *k, int64_t account_id);

/* Script sources, NUL-terminated, generated at build from billing/lua/prelude.lua
 * (helpers they share) followed by billing/<name>.lua. */
extern const char hot_lua_reserve[];
extern const char hot_lua_settle[];
extern const char hot_lua_credit[];
extern const char hot_lua_lease[];

/* Reply status codes of reserve.lua and settle.lua. */
enum { HOT_RESERVE_UNKNOWN = -1, HOT_RESERVE_SHORT = 0, HOT_RESERVE_HELD = 1 };
/* Either script: the account's (or hold's) data in Redis is unusable;
 * nothing was changed for that op. */
#define HOT_STATUS_UNUSABLE (-2)

#endif
