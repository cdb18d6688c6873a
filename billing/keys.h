/* keys.h: API key management (issue 12): a key's name, expiry and route
 * scopes, listing without secrets, rotation with a grace period, revocation
 * of a key with the predecessors still in their grace, and the key's mirror
 * value in Redis (pg:key:<hash>, keypush.lua), which carries what the
 * gateway needs to answer 401 key_expired and 403 route_not_allowed on its
 * own. Owns the api_keys rows (schema/001, schema/008) and their pushes;
 * not the key format or hashing (apikey.h) nor the gateway's checks
 * (gateway/request.c).
 *
 * Mirror value: "account|key id|version|expires ms (0 none)|scope,scope".
 * version rises with every change of the row, and keypush.lua never puts
 * an older version over a newer one nor anything over the tombstone "-1". */
#ifndef POINTGATE_KEYS_H
#define POINTGATE_KEYS_H

#include "billing/control.h"

#include <jansson.h>
#include <stdint.h>

#define KEYS_NAME_MAX 100
#define KEYS_SCOPES_MAX 16
#define KEYS_SCOPE_MAX 128 /* a route id's longest */
#define KEYS_MIRROR_MAX (5 * 24 + KEYS_SCOPES_MAX * (KEYS_SCOPE_MAX + 1))
#define KEYS_GRACE_DEFAULT_S 3600
#define KEYS_GRACE_MAX_S (30 * 86400)
#define KEYS_LIST_MAX 1000

/* What a new key is made with. Strings point into the caller's memory. */
typedef struct keys_spec {
    const char *name;       /* NULL: none */
    const char *expires_at; /* "YYYY-MM-DDTHH:MM:SSZ", NULL: never */
    const char *scopes[KEYS_SCOPES_MAX];
    int nscopes; /* 0: every route */
} keys_spec;

/* Checks a spec's fields (a name of 1..100 printable characters, an expiry
 * in the future before year 10000, 1..16 distinct route ids): NULL, or what
 * is wrong, for a 400 or the CLI's message. */
const char *keys_check(const keys_spec *s);
/* Fills S from a POST body {"name", "expires_at", "scopes"} (BODY NULL: no
 * body, no settings): NULL, or what is wrong. S points into BODY. */
const char *keys_parse(json_t *body, keys_spec *s);

/* Creates a key for ACCOUNT: KEY gets the secret (shown once, never
 * stored), *INFO the key as keys_list shows it (new reference). */
int keys_create(control_ctx *c, int64_t account, const keys_spec *s, char key[APIKEY_LEN + 1],
                json_t **info);
/* The account's keys from id AFTER on, at most LIMIT (1..KEYS_LIST_MAX),
 * in id order; never a secret or a hash. LEDGER_NOT_FOUND: no account. */
int keys_list(PGconn *pg, int64_t account, int64_t after, int limit, json_t **out);
/* A new key with the old one's account, name, scopes and expiry; the old
 * one keeps working for GRACE_S seconds (0..KEYS_GRACE_MAX_S; never past
 * its own expiry). LEDGER_NOT_FOUND: no live key ID; LEDGER_CONFLICT: it
 * was rotated already (rotate its successor). */
int keys_rotate(control_ctx *c, int64_t key_id, int64_t grace_s, char key[APIKEY_LEN + 1],
                json_t **info);
/* Revokes ID and every key rotated into it that is still live (a revoke of
 * a rotated key ends the old secret's grace too), in Postgres first, then
 * their tombstones. CONTROL_UNAVAILABLE: revoked in the ledger, a
 * tombstone not in Redis yet (the repair pass writes it). */
int keys_revoke(control_ctx *c, int64_t key_id);

/* Every key's mirror value for the repair pass: FN(ARG, hash, value), value
 * NULL for a revoked key (its tombstone). */
typedef int (*keys_mirror_fn)(void *arg, const char *key_hash, const char *value);
int keys_each_mirror(PGconn *pg, keys_mirror_fn fn, void *arg);

#endif
