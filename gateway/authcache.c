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
    for (size_t i = 0; i < c->cap; i++)
        free(c->e[i].scopes);
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

int authcache_get(authcache *c, const char *hash, uint64_t now_ms, authcache_key *out)
{
    const authcache_entry *e = &c->e[authcache_slot(c, hash)];
    if (e->cached_until_ms <= now_ms || strcmp(e->hash, hash) != 0) return 0;
    out->account = e->account;
    out->key_id = e->key_id;
    out->expires_ms = e->expires_ms;
    out->nscopes = e->nscopes;
    if (e->nscopes) memcpy(out->scopes, e->scopes, (size_t)e->nscopes * sizeof *e->scopes);
    return 1;
}

void authcache_put(authcache *c, const char *hash, const authcache_key *k, uint64_t now_ms)
{
    authcache_entry *e = &c->e[authcache_slot(c, hash)];
    int n = k->nscopes < 0                      ? 0
            : k->nscopes > AUTHCACHE_SCOPES_MAX ? AUTHCACHE_SCOPES_MAX
                                                : k->nscopes;
    free(e->scopes);
    e->scopes = NULL;
    e->cached_until_ms = 0;
    if (n && !(e->scopes = malloc((size_t)n * sizeof *e->scopes))) return;
    if (n) memcpy(e->scopes, k->scopes, (size_t)n * sizeof *e->scopes);
    memcpy(e->hash, hash, APIKEY_HASH_HEX);
    e->hash[APIKEY_HASH_HEX] = '\0';
    e->account = k->account;
    e->key_id = k->key_id;
    e->expires_ms = k->expires_ms;
    e->nscopes = n;
    e->cached_until_ms = now_ms + AUTHCACHE_TTL_MS;
}
