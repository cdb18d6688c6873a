/* authcache.h: per-thread cache of API key hash -> account id.
 * Owns only memory: a fixed-size direct-mapped table, so its footprint is
 * bounded whatever the key churn, and it is used by one thread without
 * locks. Entries live AUTHCACHE_TTL_MS: a revoke (the tombstone "-1" in
 * pg:key:<hash>) is seen within that plus one Redis round trip. Negative entries (unknown keys) are
 * cached too, so a flood of bad keys costs Redis one GET per key per TTL. */
#ifndef GATEWAY_AUTHCACHE_H
#define GATEWAY_AUTHCACHE_H

#include "billing/apikey.h"

#include <stddef.h>
#include <stdint.h>

#define AUTHCACHE_TTL_MS 1000
#define AUTHCACHE_NONE (-1) /* negative entry: key unknown or revoked */

typedef struct authcache_entry {
    char hash[APIKEY_HASH_HEX + 1];
    int64_t account; /* or AUTHCACHE_NONE */
    uint64_t expires_ms;
} authcache_entry;

typedef struct authcache {
    authcache_entry *e;
    size_t cap; /* power of two */
} authcache;

/* CAP is rounded up to a power of two. -1 on allocation failure. */
int authcache_init(authcache *c, size_t cap);
void authcache_free(authcache *c);

/* 1 and *ACCOUNT (maybe AUTHCACHE_NONE) on a fresh hit, 0 on a miss. */
int authcache_get(authcache *c, const char *hash, uint64_t now_ms, int64_t *account);
void authcache_put(authcache *c, const char *hash, int64_t account, uint64_t now_ms);

#endif
