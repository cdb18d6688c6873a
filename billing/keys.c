/* keys.c: API key management (keys.h). */
#include "billing/keys.h"

#include "billing/hot.h"
#include "billing/ledger.h"
#include "common/log.h"
#include "billing/events.h"

#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The mirror value of api_keys row k (keys.h), computed by Postgres in the
 * statement that changes the row, so that it is the row as committed. */
#define KEYS_MIRROR_SQL                                                                            \
    "k.account_id || '|' || k.id || '|' || k.version || '|' || "                                   \
    "coalesce(floor(extract(epoch FROM k.expires_at) * 1000)::bigint, 0) || '|' || "               \
    "coalesce(array_to_string(k.scopes, ','), '')"

/* What keys_list shows of a key (columns of api_keys k). */
#define KEYS_INFO_SQL                                                                              \
    "k.id, k.account_id, k.name, k.hint, "                                                         \
    "to_char(k.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "                 \
    "to_char(k.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "                 \
    "array_to_json(k.scopes)::text, "                                                              \
    "to_char(k.revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), k.rotated_to, "   \
    "CASE WHEN k.revoked_at IS NOT NULL THEN 'revoked' WHEN k.expires_at <= now() THEN "           \
    "'expired' ELSE 'active' END"
#define KEYS_INFO_COLS 10

static int keys_scope_ok(const char *id)
{
    size_t n = strlen(id);
    if (n == 0 || n > KEYS_SCOPE_MAX || id[0] == '_' || id[0] == '~') return 0;
    for (const char *p = id; *p; p++)
        if (*p <= ' ' || *p > '~' || *p == '|' || *p == '"' || *p == ',' || *p == '\\') return 0;
    return 1;
}

const char *keys_check(const keys_spec *s)
{
    if (s->name) {
        size_t n = strlen(s->name);
        if (n == 0 || n > KEYS_NAME_MAX) return "name must be 1 to 100 characters";
        for (const char *p = s->name; *p; p++)
            if ((unsigned char)*p < ' ' || *p == 0x7f)
                return "name must not hold control characters";
    }
    if (s->expires_at) {
        struct tm tm = {0};
        char tail = 0;
        time_t t;
        if (strlen(s->expires_at) != 20 ||
            sscanf(s->expires_at, "%4d-%2d-%2dT%2d:%2d:%2d%c", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
                   &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &tail) != 7 ||
            tail != 'Z')
            return "expires_at must be a UTC time as YYYY-MM-DDTHH:MM:SSZ";
        tm.tm_year -= 1900;
        tm.tm_mon -= 1;
        {
            struct tm want = tm;
            /* timegm normalizes 02-30 into March: a date that moved is no date. */
            t = timegm(&tm);
            if (t == (time_t)-1 || tm.tm_mday != want.tm_mday || tm.tm_mon != want.tm_mon ||
                tm.tm_hour != want.tm_hour || tm.tm_min != want.tm_min || tm.tm_sec != want.tm_sec)
                return "expires_at is not a valid date and time";
        }
        if (t <= time(NULL)) return "expires_at must be in the future";
    }
    if (s->nscopes < 0 || s->nscopes > KEYS_SCOPES_MAX) return "scopes: at most 16 route ids";
    for (int i = 0; i < s->nscopes; i++) {
        if (!keys_scope_ok(s->scopes[i]))
            return "scopes must be route ids (1 to 128 printable characters, no space, "
                   "'|', '\"', ',' or '\\', not starting with '_' or '~')";
        for (int j = 0; j < i; j++)
            if (strcmp(s->scopes[i], s->scopes[j]) == 0) return "scopes must not repeat a route";
    }
    return NULL;
}

const char *keys_parse(json_t *body, keys_spec *s)
{
    const char *k;
    json_t *v;
    memset(s, 0, sizeof *s);
    if (!body) return NULL;
    if (!json_is_object(body)) return "the body must be a JSON object";
    json_object_foreach(body, k, v)
    {
        if (strcmp(k, "name") != 0 && strcmp(k, "expires_at") != 0 && strcmp(k, "scopes") != 0)
            return "unknown field: a key takes name, expires_at and scopes";
    }
    v = json_object_get(body, "name");
    if (v && !json_is_null(v) && !(s->name = json_string_value(v))) return "name must be a string";
    v = json_object_get(body, "expires_at");
    if (v && !json_is_null(v) && !(s->expires_at = json_string_value(v)))
        return "expires_at must be a string (YYYY-MM-DDTHH:MM:SSZ) or null";
    v = json_object_get(body, "scopes");
    if (v && !json_is_null(v)) {
        size_t i;
        json_t *e;
        if (!json_is_array(v) || json_array_size(v) == 0 || json_array_size(v) > KEYS_SCOPES_MAX)
            return "scopes must be a list of 1 to 16 route ids, or null (every route)";
        json_array_foreach(v, i, e)
        {
            if (!(s->scopes[i] = json_string_value(e))) return "scopes must be strings";
        }
        s->nscopes = (int)json_array_size(v);
    }
    return keys_check(s);
}

static json_t *keys_str_or_null(const PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? json_null() : json_string(PQgetvalue(r, row, col));
}

/* A row of KEYS_INFO_SQL starting at column C0 as JSON. */
static json_t *keys_info_json(const PGresult *r, int row, int c0)
{
    json_t *j = json_object(), *scopes = NULL;
    if (!j) return NULL;
    if (!PQgetisnull(r, row, c0 + 6)) scopes = json_loads(PQgetvalue(r, row, c0 + 6), 0, NULL);
    json_object_set_new(j, "key_id", json_integer(strtoll(PQgetvalue(r, row, c0), NULL, 10)));
    json_object_set_new(j, "account_id",
                        json_integer(strtoll(PQgetvalue(r, row, c0 + 1), NULL, 10)));
    json_object_set_new(j, "name", keys_str_or_null(r, row, c0 + 2));
    json_object_set_new(j, "hint", keys_str_or_null(r, row, c0 + 3));
    json_object_set_new(j, "created_at", keys_str_or_null(r, row, c0 + 4));
    json_object_set_new(j, "expires_at", keys_str_or_null(r, row, c0 + 5));
    json_object_set_new(j, "scopes", scopes ? scopes : json_null());
    json_object_set_new(j, "revoked_at", keys_str_or_null(r, row, c0 + 7));
    json_object_set_new(j, "rotated_to",
                        PQgetisnull(r, row, c0 + 8)
                            ? json_null()
                            : json_integer(strtoll(PQgetvalue(r, row, c0 + 8), NULL, 10)));
    json_object_set_new(j, "state", json_string(PQgetvalue(r, row, c0 + 9)));
    return j;
}

/* "{a,b}" for a text[] parameter, NULL for no scopes. Route ids hold no
 * character the array syntax needs quoted except none (keys_scope_ok
 * refuses '"', ',', '\\' and spaces), so no quoting is needed. */
static char *keys_scopes_param(const keys_spec *s)
{
    size_t n = 3;
    char *out, *p;
    if (s->nscopes == 0) return NULL;
    for (int i = 0; i < s->nscopes; i++)
        n += strlen(s->scopes[i]) + 1;
    if (!(out = malloc(n))) return NULL;
    p = out;
    *p++ = '{';
    for (int i = 0; i < s->nscopes; i++) {
        size_t l = strlen(s->scopes[i]);
        if (i) *p++ = ',';
        memcpy(p, s->scopes[i], l);
        p += l;
    }
    *p++ = '}';
    *p = '\0';
    return out;
}

/* Pushes a key's mirror VALUE; a failure is the repair pass's to fix. */
static void keys_push(control_ctx *c, int64_t key_id, const char *hash, const char *value)
{
    if (hot_key_set(c->hot, hash, value) != 0)
        log_warn("key %" PRId64 ": push to redis failed; the repair pass will retry", key_id);
}

/* Makes a fresh secret and its hash and hint. */
static int keys_secret(control_ctx *c, char key[APIKEY_LEN + 1], char hash[APIKEY_HASH_HEX + 1],
                       char hint[5])
{
    if (apikey_generate(key) != 0) return LEDGER_ERROR;
    if (apikey_hash(c->pepper, key, APIKEY_LEN, hash) != 0) return LEDGER_ERROR;
    memcpy(hint, key + APIKEY_LEN - 4, 4);
    hint[4] = '\0';
    return LEDGER_OK;
}

int keys_create(control_ctx *c, int64_t account, const keys_spec *s, char key[APIKEY_LEN + 1],
                json_t **info)
{
    char ids[24], hash[APIKEY_HASH_HEX + 1], hint[5];
    char *scopes = keys_scopes_param(s);
    const char *p[6] = {ids, hash, s->name, s->expires_at, scopes, hint};
    PGresult *r = NULL;
    int rc;
    *info = NULL;
    if (s->nscopes && !scopes) return LEDGER_ERROR;
    rc = keys_secret(c, key, hash, hint);
    if (rc != LEDGER_OK) goto out;
    snprintf(ids, sizeof ids, "%" PRId64, account);
    r = ledger_query(c->pg,
                     "WITH k AS (INSERT INTO api_keys (account_id, key_hash, name, expires_at, "
                     "scopes, hint) SELECT a.id, $2, $3, $4::timestamptz, $5::text[], $6 FROM "
                     "accounts a WHERE a.id = $1 RETURNING *) SELECT " KEYS_INFO_SQL
                     ", " KEYS_MIRROR_SQL ", k.key_hash FROM k",
                     6, p);
    if (!r) {
        rc = LEDGER_ERROR;
        goto out;
    }
    if (PQntuples(r) != 1) {
        rc = LEDGER_NOT_FOUND;
        goto out;
    }
    *info = keys_info_json(r, 0, 0);
    keys_push(c, strtoll(PQgetvalue(r, 0, 0), NULL, 10), hash, PQgetvalue(r, 0, KEYS_INFO_COLS));
    rc = *info ? LEDGER_OK : LEDGER_ERROR;
out:
    if (rc != LEDGER_OK) sodium_memzero(key, APIKEY_LEN + 1);
    PQclear(r);
    free(scopes);
    return rc;
}

int keys_list(PGconn *pg, int64_t account, int64_t after, int limit, json_t **out)
{
    char ids[24], af[24], lim[16];
    const char *p[3] = {ids, af, lim};
    PGresult *r;
    json_t *arr;
    *out = NULL;
    snprintf(ids, sizeof ids, "%" PRId64, account);
    snprintf(af, sizeof af, "%" PRId64, after);
    snprintf(lim, sizeof lim, "%d", limit);
    /* The account's existence and its keys in one snapshot. */
    r = ledger_query(pg,
                     "SELECT a.id, " KEYS_INFO_SQL " FROM accounts a LEFT JOIN LATERAL (SELECT * "
                     "FROM api_keys WHERE account_id = a.id AND id > $2 ORDER BY id LIMIT $3) k "
                     "ON true WHERE a.id = $1 ORDER BY k.id",
                     3, p);
    if (!r) return LEDGER_ERROR;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return LEDGER_NOT_FOUND;
    }
    arr = json_array();
    for (int i = 0; arr && i < PQntuples(r); i++) {
        json_t *k;
        if (PQgetisnull(r, i, 1)) continue; /* an account without keys */
        k = keys_info_json(r, i, 1);
        if (!k || json_array_append_new(arr, k) != 0) {
            json_decref(arr);
            arr = NULL;
        }
    }
    PQclear(r);
    if (!arr) return LEDGER_ERROR;
    *out = arr;
    return LEDGER_OK;
}

/* The statements of keys_rotate, inside its transaction: *R the new key's
 * row (info, mirror), *OLD the old key's (id, hash, mirror). */
static int keys_rotate_tx(control_ctx *c, const char *ids, const char *grace, const char *hash,
                          const char *hint, PGresult **r, PGresult **old)
{
    const char *p[4] = {ids, hash, hint, grace};
    PGresult *q = ledger_query(c->pg,
                               "SELECT rotated_to IS NOT NULL FROM api_keys WHERE id = $1 AND "
                               "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()) "
                               "FOR UPDATE",
                               1, p);
    int rotated;
    if (!q) return LEDGER_ERROR;
    if (PQntuples(q) != 1) {
        PQclear(q);
        return LEDGER_NOT_FOUND;
    }
    rotated = PQgetvalue(q, 0, 0)[0] == 't';
    PQclear(q);
    if (rotated) return LEDGER_CONFLICT;
    *r = ledger_query(c->pg,
                      "WITH k AS (INSERT INTO api_keys (account_id, key_hash, name, expires_at, "
                      "scopes, hint) SELECT account_id, $2, name, expires_at, scopes, $3 FROM "
                      "api_keys WHERE id = $1 RETURNING *) SELECT " KEYS_INFO_SQL
                      ", " KEYS_MIRROR_SQL " FROM k",
                      3, p);
    if (!*r) return LEDGER_ERROR;
    p[1] = PQgetvalue(*r, 0, 0);
    *old = ledger_query(c->pg,
                        "UPDATE api_keys k SET rotated_to = $2, version = version + 1, "
                        "expires_at = least(coalesce(expires_at, 'infinity'), "
                        "date_trunc('second', now()) + make_interval(secs => $3::int)) WHERE id = "
                        "$1 RETURNING k.key_hash, "
                        "" KEYS_MIRROR_SQL,
                        3, (const char *const[]){ids, p[1], grace});
    return *old ? LEDGER_OK : LEDGER_ERROR;
}

int keys_rotate(control_ctx *c, int64_t key_id, int64_t grace_s, char key[APIKEY_LEN + 1],
                json_t **info)
{
    char ids[24], grace[24], hash[APIKEY_HASH_HEX + 1], hint[5];
    PGresult *r = NULL, *old = NULL, *t;
    int rc;
    *info = NULL;
    if (grace_s < 0 || grace_s > KEYS_GRACE_MAX_S) return LEDGER_LIMIT;
    if ((rc = keys_secret(c, key, hash, hint)) != LEDGER_OK) goto out;
    snprintf(ids, sizeof ids, "%" PRId64, key_id);
    snprintf(grace, sizeof grace, "%" PRId64, grace_s);
    if (!(t = ledger_query(c->pg, "BEGIN", 0, NULL))) {
        rc = LEDGER_ERROR;
        goto out;
    }
    PQclear(t);
    rc = keys_rotate_tx(c, ids, grace, hash, hint, &r, &old);
    t = ledger_query(c->pg, rc == LEDGER_OK ? "COMMIT" : "ROLLBACK", 0, NULL);
    if (!t) rc = LEDGER_ERROR;
    PQclear(t);
    if (rc != LEDGER_OK) goto out;
    /* After the commit, the old key's shortened life, then the new key. */
    keys_push(c, key_id, PQgetvalue(old, 0, 0), PQgetvalue(old, 0, 1));
    keys_push(c, strtoll(PQgetvalue(r, 0, 0), NULL, 10), hash, PQgetvalue(r, 0, KEYS_INFO_COLS));
    *info = keys_info_json(r, 0, 0);
    if (*info) json_object_set_new(*info, "rotated_from", json_integer((json_int_t)key_id));
    rc = *info ? LEDGER_OK : LEDGER_ERROR;
out:
    if (rc != LEDGER_OK) sodium_memzero(key, APIKEY_LEN + 1);
    PQclear(r);
    PQclear(old);
    return rc;
}

int keys_revoke(control_ctx *c, int64_t key_id)
{
    char ids[24];
    const char *p[1] = {ids};
    PGresult *r;
    int rc = LEDGER_OK;
    snprintf(ids, sizeof ids, "%" PRId64, key_id);
    /* The key, and the keys rotated into it (and into those), once. */
    /* The key, and the keys rotated into it (and into those), once; a
     * key.revoked event for each key this call revoked (the CTEs share one
     * snapshot: "was" is the state before the update), written in the same
     * statement, so the event exists iff the revoke committed. */
    r = ledger_query(
        c->pg,
        "WITH RECURSIVE chain(id) AS (SELECT id FROM api_keys WHERE id = $1 UNION "
        "SELECT k.id FROM api_keys k JOIN chain ON k.rotated_to = chain.id), "
        " was AS (SELECT k.id FROM api_keys k JOIN chain USING (id) WHERE k.revoked_at IS NULL), "
        " up AS (UPDATE api_keys k SET revoked_at = coalesce(revoked_at, now()), "
        "  version = version + (revoked_at IS NULL)::int FROM chain WHERE k.id = chain.id "
        "  RETURNING k.id, k.key_hash, k.account_id, k.name, k.hint, k.revoked_at), "
        " ev AS (INSERT INTO webhook_events (account_id, type, payload) "
        "  SELECT up.account_id, 'key.revoked', jsonb_build_object('key_id', up.id, "
        "  'account_id', up.account_id, 'name', up.name, 'hint', up.hint, 'revoked_at', "
        "  to_char(up.revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')) "
        "  FROM up JOIN was USING (id) RETURNING id, account_id), "
        " dl AS (" WEBHOOK_DELIVERIES_OF(
            "ev") " RETURNING 1) "
                  "SELECT up.id, up.key_hash, up.account_id, (SELECT count(*) FROM ev), "
                  "  CASE WHEN (SELECT count(*) FROM dl) > 0 THEN pg_notify('" WEBHOOK_CHANNEL
                  "', '') "
                  "  IS NULL END "
                  "FROM up",
        1, p);
    if (!r) return LEDGER_ERROR;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return LEDGER_NOT_FOUND;
    }
    if (PQntuples(r) > 0)
        for (long i = 0, n = strtol(PQgetvalue(r, 0, 3), NULL, 10); i < n; i++)
            events_count("key.revoked");
    /* The tombstones, after the commit: no push of a live snapshot taken
     * before the commit can overwrite them (keypush.lua). */
    for (int i = 0; i < PQntuples(r); i++) {
        if (hot_key_revoke(c->hot, PQgetvalue(r, i, 1)) != 0) {
            log_error("key %s: revoked in ledger; its tombstone is not in redis yet",
                      PQgetvalue(r, i, 0));
            rc = CONTROL_UNAVAILABLE;
        } else {
            log_info("key %s of account %s revoked", PQgetvalue(r, i, 0), PQgetvalue(r, i, 2));
        }
    }
    PQclear(r);
    return rc;
}

int keys_each_mirror(PGconn *pg, keys_mirror_fn fn, void *arg)
{
    PGresult *r = ledger_query(
        pg, "SELECT k.key_hash, k.revoked_at IS NOT NULL, " KEYS_MIRROR_SQL " FROM api_keys k", 0,
        NULL);
    int rc = LEDGER_OK;
    if (!r) return LEDGER_ERROR;
    for (int i = 0; i < PQntuples(r) && rc == LEDGER_OK; i++) {
        const char *value = PQgetvalue(r, i, 1)[0] == 't' ? NULL : PQgetvalue(r, i, 2);
        if (fn(arg, PQgetvalue(r, i, 0), value) != 0) rc = LEDGER_ERROR;
    }
    PQclear(r);
    return rc;
}
