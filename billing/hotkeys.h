/* hotkeys.h: the Redis layout of hot balances, shared by gateway and billing.
 * Owns key names and the embedded Lua scripts; does not own any connection
 * (billing uses hot.c, synchronous; the gateway its own async client).
 *
 * Per account A, all under the hash tag {A} so one script touches one slot:
 *   pg:{A}:acct   hash  credited, seq, spent, held
 *   pg:{A}:holds  hash  rid -> "amount|route"
 *   pg:{A}:dl     zset  rid -> hold deadline (ms since epoch)
 * Global:
 *   pg:outbox     stream of settled calls (settle.lua), consumer group "settle"
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
    char dl[HOT_KEYNAME_MAX];
} hot_keys;

/* Fills the three per-account key names. Cannot fail for a valid id. */
void hot_keys_for(hot_keys *k, int64_t account_id);

/* Script sources, NUL-terminated, generated from billing/<name>.lua at build. */
extern const char hot_lua_reserve[];
extern const char hot_lua_settle[];
extern const char hot_lua_credit[];

/* Reply status codes of reserve.lua and settle.lua. */
enum { HOT_RESERVE_UNKNOWN = -1, HOT_RESERVE_SHORT = 0, HOT_RESERVE_HELD = 1 };

#endif
