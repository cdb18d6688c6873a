/* hot.h: hot balances in Redis, synchronous client for the control plane.
 * Owns one hiredis connection, the loading of the Lua scripts (by SHA, with a
 * reload on NOSCRIPT) and typed wrappers around them. Does not own the key
 * layout or the scripts (hotkeys.h, *.lua) nor the gateway's async client.
 * A hot_conn belongs to one thread. It reconnects lazily: after an I/O error
 * the call fails and the next call tries a fresh connection. */
#ifndef POINTGATE_HOT_H
#define POINTGATE_HOT_H

#include <stddef.h>
#include <stdint.h>

typedef struct hot_conn hot_conn;

/* NULL (logged) if the URL is malformed; a connection failure is not fatal
 * here: the first call reports it. */
hot_conn *hot_open(const char *redis_url);
/* Connect and command timeouts of H's connections from now on (default 2 s
 * to connect, 5 s per command): a probe wants to fail fast. */
void hot_set_timeout(hot_conn *h, int ms);
void hot_close(hot_conn *h);
/* 0 when Redis answers PING. */
int hot_ping(hot_conn *h);

/* credit.lua: push (seq, credited); SPENT (Postgres') creates the account's
 * state when Redis has none, and repairs Redis spent when Redis lost settled
 * charges (logged); GUARD_RID ("" for none) drops a guard hold;
 * DROP_EXPIRED_GUARDS (the repair pass) drops guard holds past their
 * deadline, which the sweeper leaves alone. */
int hot_credit(hot_conn *h, int64_t account, int64_t seq, int64_t credited, int64_t spent,
               const char *guard_rid, int drop_expired_guards, int *applied);

/* reserve.lua. *status is HOT_RESERVE_HELD/SHORT/UNKNOWN or HOT_STATUS_UNUSABLE. */
int hot_reserve(hot_conn *h, int64_t account, const char *rid, int64_t amount, int64_t ttl_ms,
                const char *route, int *status, int64_t *available, int64_t *held);

/* settle.lua. OUTCOME is "commit", "release" or "expire". *settled is 1
 * (closed now), 0 (no such hold) or HOT_STATUS_UNUSABLE. */
int hot_settle(hot_conn *h, int64_t account, const char *rid, int64_t charge, const char *outcome,
               int upstream_status, int *settled, int64_t *charged, int64_t *available);

/* The account's live figures; *found = 0 when Redis has no state for it. */
int hot_account(hot_conn *h, int64_t account, int *found, int64_t *credited, int64_t *spent,
                int64_t *held);

/* The API key mirror the gateway authenticates against (keypush.lua):
 * VALUE is the key's mirror value (keys.h). A live key's push never
 * overwrites a revoked key's tombstone nor a newer version; a revoke writes
 * the tombstone, which only ever stays. */
int hot_key_set(hot_conn *h, const char *key_hash, const char *value);
int hot_key_revoke(hot_conn *h, const char *key_hash);

/* Repair passes (creditsync.c). A pass sets its marker MARKER (a Redis key
 * name, HOT_PASS_MARKER bytes with its NUL) before its first push; a loss
 * of Redis's data takes it away. hot_pass_key pushes one key for the pass
 * (VALUE NULL: revoked); *lost = 1, nothing written, when the marker is
 * gone. hot_pass_end deletes the marker and writes pg:epoch if missing:
 * *result 2 epoch written, 1 it was there, 0 the marker was gone (Redis
 * lost data during the pass: run it again). */
#define HOT_PASS_MARKER 48
/* limits.lua: ACCOUNT's whole limits snapshot as of its limits_seq SEQ:
 * PAIRS[0..N) setting name, value (N even; none: no limits). *result 1
 * written, 0 a newer snapshot is there, 3 unchanged. */
int hot_limits_push(hot_conn *h, int64_t account, int64_t seq, const char *const *pairs, int n,
                    int *result);
int hot_pass_begin(hot_conn *h, char marker[HOT_PASS_MARKER]);
/* *changed = 1 when the push changed the mirror (it was missing or stale). */
int hot_pass_key(hot_conn *h, const char *marker, const char *key_hash, const char *value,
                 int *lost, int *changed);
/* hot_credit for the pass (no guard; drops expired guards): *lost = 1,
 * nothing written, when the marker is gone (credit.lua); *repaired = 1 when
 * it raised Redis spent to Postgres'. */
int hot_pass_credit(hot_conn *h, const char *marker, int64_t account, int64_t seq, int64_t credited,
                    int64_t spent, int *applied, int *lost, int *repaired);
int hot_pass_end(hot_conn *h, const char *marker, int *result);
/* *exists = 1 when pg:epoch is in Redis. -1 when Redis did not answer. */
int hot_epoch_exists(hot_conn *h, int *exists);
/* Connections made so far (a command that met a dead connection is retried
 * on a new one without a word: this says it happened). */
unsigned hot_connects(const hot_conn *h);
/* The last connection or I/O error, for reports (never holds a secret). */
const char *hot_error(const hot_conn *h);

/* Raw command access for the workers (settlement, sweeper), which speak
 * stream and scan commands directly. Returns a redisReply* (caller frees with
 * freeReplyObject) or NULL on I/O error. */
void *hot_command_argv(hot_conn *h, int argc, const char **argv, const size_t *lens);

#endif
