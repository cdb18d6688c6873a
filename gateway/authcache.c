/* authcache.c: direct-mapped key-hash cache (see authcache.h). A collision
 * simply evicts: the cost is one extra GET, and the table never grows. */
#include "gateway/authcache.h"

#include <stdlib.h>
#include <string.h>

int authcache_init(authcache *c, size_t cap)
{
    size_t n = 1;
    while (n < cap)
        n <<= 1;
    c->e = calloc(n, sizeof *c->e);
    c->cap = c->e ? n : 0;
    return c->e ? 0 : -1;
}

void authcache_free(authcache *c)
{
    free(c->e);
    c->e = NULL;
    c->cap = 0;
}

/* The hash is already uniformly random hex; its first 8 digits index. */
static size_t authcache_slot(const authcache *c, const char *hash)
{
    size_t v = 0;
    for (int i = 0; i < 8 && hash[i]; i++)
        v = (v << 4) | (size_t)(hash[i] <= '9' ? hash[i] - '0' : (hash[i] | 0x20) - 'a' + 10);
    return v & (c->cap - 1);
}

int authcache_get(authcache *c, const char *hash, uint64_t now_ms, int64_t *account)
{
    const authcache_entry *e = &c->e[authcache_slot(c, hash)];
    if (e->expires_ms <= now_ms || strcmp(e->hash, hash) != 0) return 0;
    *account = e->account;
    return 1;
}

void authcache_put(authcache *c, const char *hash, int64_t account, uint64_t now_ms)
{
    authcache_entry *e = &c->e[authcache_slot(c, hash)];
    memcpy(e->hash, hash, APIKEY_HASH_HEX);
    e->hash[APIKEY_HASH_HEX] = '\0';
    e->account = account;
    e->expires_ms = now_ms + AUTHCACHE_TTL_MS;
}
