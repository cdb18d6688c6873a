/* authcache.h: per-thread cache of API key hash -> what the key may do
 * (its account, id, expiry and route scopes, from pg:key:<hash>).
 * Owns only memory: a fixed-size direct-mapped table, so its footprint is
 * bounded whatever the key churn (a scoped key's scope list is its one
 * allocation), and it is used by one thread without locks. Entries live
 * AUTHCACHE_TTL_MS: a revoke (the tombstone "-1" in pg:key:<hash>) is seen
 * within that plus one Redis round trip. Negative entries (unknown keys)
 * are cached too, so a flood of bad keys costs Redis one GET per key per
 * TTL. An expiry needs no lookup: request.c checks it on every call. */
#ifndef GATEWAY_AUTHCACHE_H
#define GATEWAY_AUTHCACHE_H

#include "common/apikey.h"

#include <stddef.h>
#include <stdint.h>

#define AUTHCACHE_TTL_MS 1000
#define AUTHCACHE_NONE (-1) /* negative entry: key unknown or revoked */
#define AUTHCACHE_SCOPES_MAX 16

typedef struct authcache_key {
    int64_t account;    /* or AUTHCACHE_NONE */
    int64_t key_id;     /* 0: not known (a mirror value of the form before key ids) */
    int64_t expires_ms; /* wall clock, ms since 1970; 0: never */
    int nscopes;        /* 0: every route */
    uint64_t scopes[AUTHCACHE_SCOPES_MAX]; /* routes_id_hash of each route allowed */
} authcache_key;

typedef struct authcache_entry {
    char hash[APIKEY_HASH_HEX + 1];
    int64_t account, key_id, expires_ms;
    int nscopes;
    uint64_t *scopes; /* nscopes of them, owned; NULL when 0 */
    uint64_t cached_until_ms;
} authcache_entry;

typedef struct authcache {
    authcache_entry *e;
    size_t cap; /* power of two */
} authcache;

/* CAP is rounded up to a power of two. -1 on allocation failure. */
int authcache_init(authcache *c, size_t cap);
void authcache_free(authcache *c);

/* 1 and *OUT on a fresh hit (OUT->account maybe AUTHCACHE_NONE), 0 on a miss. */
int authcache_get(authcache *c, const char *hash, uint64_t now_ms, authcache_key *out);
/* Caches K; out of memory for its scopes, caches nothing (one more lookup). */
void authcache_put(authcache *c, const char *hash, const authcache_key *k, uint64_t now_ms);

#endif
