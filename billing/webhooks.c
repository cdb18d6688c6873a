/* webhooks.c: webhook endpoints, secrets, the events outbox, the delivery
 * log and replays (see webhooks.h; sending is whdeliver.c's).
 *
 * Secrets. Billing generates a secret in the Standard Webhooks format
 * ("whsec_" + base64 of 32 random bytes) and shows it once, in the create
 * answer. It is needed in clear to sign every delivery, so unlike API keys
 * it cannot be stored as a hash: it is sealed with libsodium's
 * XChaCha20-Poly1305 (the AEAD the project's crypto library recommends:
 * random 192-bit nonces are safe, no nonce bookkeeping; OpenSSL is not
 * linked) under a key derived from KEY_PEPPER, with the account id as
 * associated data (a row copied to another account does not open). A
 * database dump alone does not give the secrets; the dump plus KEY_PEPPER
 * does. Changing KEY_PEPPER makes every stored secret unusable (deliveries
 * then fail with "secret does not open": create the endpoints again).
 * Neither the secret nor the signing key is ever logged. */
#include "billing/webhooks.h"

#include "billing/alerts.h"
#include "billing/api.h"
#include "billing/control.h"
#include "common/env.h"
#include "billing/ledger.h"
#include "common/log.h"

#include <inttypes.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define WH_KEY_LABEL "pointgate webhook secret v1"
#define WH_ISO(x) "to_char((" x ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

/* ---- secrets -------------------------------------------------------------- */

void webhook_key_derive(const apikey_pepper *pepper, webhook_key *out)
{
    crypto_auth_hmacsha256(out->k, (const unsigned char *)WH_KEY_LABEL, strlen(WH_KEY_LABEL),
                           pepper->key);
}

void webhook_secret_generate(char out[WEBHOOK_SECRET_LEN + 1])
{
    unsigned char raw[WEBHOOK_SECRET_BYTES];
    randombytes_buf(raw, sizeof raw);
    memcpy(out, WEBHOOK_SECRET_PREFIX, 6);
    sodium_bin2base64(out + 6, WEBHOOK_SECRET_LEN + 1 - 6, raw, sizeof raw,
                      sodium_base64_VARIANT_ORIGINAL);
    sodium_memzero(raw, sizeof raw);
}

int webhook_secret_seal(const webhook_key *k, int64_t account, const char *secret, char *out,
                        size_t cap)
{
    unsigned char buf[crypto_aead_xchacha20poly1305_ietf_NPUBBYTES + WEBHOOK_SECRET_LEN +
                      crypto_aead_xchacha20poly1305_ietf_ABYTES];
    unsigned long long clen = 0;
    size_t mlen = strlen(secret);
    char ad[24];
    if (mlen > WEBHOOK_SECRET_LEN || cap < 3 + 2 * sizeof buf) return -1;
    snprintf(ad, sizeof ad, "%" PRId64, account);
    randombytes_buf(buf, crypto_aead_xchacha20poly1305_ietf_NPUBBYTES);
    crypto_aead_xchacha20poly1305_ietf_encrypt(
        buf + crypto_aead_xchacha20poly1305_ietf_NPUBBYTES, &clen, (const unsigned char *)secret,
        mlen, (const unsigned char *)ad, strlen(ad), NULL, buf, k->k);
    out[0] = '\\';
    out[1] = 'x';
    sodium_bin2hex(out + 2, cap - 2, buf, crypto_aead_xchacha20poly1305_ietf_NPUBBYTES + clen);
    return 0;
}

int webhook_secret_open(const webhook_key *k, int64_t account, const char *hex,
                        unsigned char key[64], size_t *len)
{
    unsigned char buf[256];
    char text[WEBHOOK_SECRET_LEN + 1];
    unsigned long long mlen = 0;
    size_t blen = 0;
    char ad[24];
    int rc = -1;
    const size_t nb = crypto_aead_xchacha20poly1305_ietf_NPUBBYTES;
    if (!hex || strncmp(hex, "\\x", 2) != 0 ||
        sodium_hex2bin(buf, sizeof buf, hex + 2, strlen(hex + 2), NULL, &blen, NULL) != 0 ||
        blen <= nb + crypto_aead_xchacha20poly1305_ietf_ABYTES ||
        blen - nb - crypto_aead_xchacha20poly1305_ietf_ABYTES > WEBHOOK_SECRET_LEN)
        return -1;
    snprintf(ad, sizeof ad, "%" PRId64, account);
    if (crypto_aead_xchacha20poly1305_ietf_decrypt((unsigned char *)text, &mlen, NULL, buf + nb,
                                                   blen - nb, (const unsigned char *)ad, strlen(ad),
                                                   buf, k->k) != 0)
        goto out;
    text[mlen] = '\0';
    if (mlen <= 6 || strncmp(text, WEBHOOK_SECRET_PREFIX, 6) != 0) goto out;
    if (sodium_base642bin(key, 64, text + 6, mlen - 6, NULL, len, NULL,
                          sodium_base64_VARIANT_ORIGINAL) != 0)
        goto out;
    rc = 0;
out:
    sodium_memzero(text, sizeof text);
    sodium_memzero(buf, sizeof buf);
    return rc;
}

void webhook_sign(const unsigned char *key, size_t keylen, const char *id, long long ts,
                  const char *body, size_t bodylen, char out[WEBHOOK_SIGNATURE_LEN])
{
    crypto_auth_hmacsha256_state st;
    unsigned char mac[crypto_auth_hmacsha256_BYTES];
    char tss[24];
    int n = snprintf(tss, sizeof tss, "%lld", ts);
    crypto_auth_hmacsha256_init(&st, key, keylen);
    crypto_auth_hmacsha256_update(&st, (const unsigned char *)id, strlen(id));
    crypto_auth_hmacsha256_update(&st, (const unsigned char *)".", 1);
    crypto_auth_hmacsha256_update(&st, (const unsigned char *)tss, (size_t)n);
    crypto_auth_hmacsha256_update(&st, (const unsigned char *)".", 1);
    crypto_auth_hmacsha256_update(&st, (const unsigned char *)body, bodylen);
    crypto_auth_hmacsha256_final(&st, mac);
    memcpy(out, "v1,", 3);
    sodium_bin2base64(out + 3, WEBHOOK_SIGNATURE_LEN - 3, mac, sizeof mac,
                      sodium_base64_VARIANT_ORIGINAL);
    sodium_memzero(&st, sizeof st);
}

const char *webhook_url_check(const char *url)
{
    const char *auth, *end, *host_end;
    size_t n = url ? strlen(url) : 0;
    if (n == 0 || n > WEBHOOK_MAX_URL) return "url must be 1 to 2048 characters";
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)url[i] <= 0x20 || (unsigned char)url[i] >= 0x7f)
            return "url must be printable ASCII without spaces (percent-encode the rest)";
    if (strncasecmp(url, "http://", 7) == 0)
        auth = url + 7;
    else if (strncasecmp(url, "https://", 8) == 0)
        auth = url + 8;
    else
        return "url must start with http:// or https://";
    if (strchr(url, '#')) return "url must not have a fragment (#...)";
    end = auth + strcspn(auth, "/?");
    if (memchr(auth, '@', (size_t)(end - auth)))
        return "url must not carry credentials (user@): deliveries are signed instead";
    if (auth[0] == '[') {
        host_end = memchr(auth, ']', (size_t)(end - auth));
        if (!host_end || host_end == auth + 1) return "url has a malformed IPv6 host";
        host_end++;
    } else {
        host_end = memchr(auth, ':', (size_t)(end - auth));
        if (!host_end) host_end = end;
        if (host_end == auth) return "url must name a host";
        for (const char *h = auth; h < host_end; h++)
            if (!((*h >= 'a' && *h <= 'z') || (*h >= 'A' && *h <= 'Z') ||
                  (*h >= '0' && *h <= '9') || *h == '-' || *h == '.' || *h == '_'))
                return "url has a malformed host";
    }
    if (host_end < end) {
        long port = 0;
        const char *q = host_end + 1;
        if (*host_end != ':' || q == end || end - q > 5) return "url has a malformed port";
        for (; q < end; q++) {
            if (*q < '0' || *q > '9') return "url has a malformed port";
            port = port * 10 + (*q - '0');
        }
        if (port < 1 || port > 65535) return "url has a port out of range";
    }
    return NULL;
}

/* ---- answers ---------------------------------------------------------------- */

int webhooks_refuse(int status, const char *code, const char *message, json_t **out)
{
    *out = json_pack("{s:s, s:s}", "error", code, "message", message);
    return status;
}

int webhooks_failure(int rc, const char *what, json_t **out)
{
    if (rc == LEDGER_NOT_FOUND) return webhooks_refuse(404, "not_found", what, out);
    return webhooks_refuse(503, "database_unavailable", "the ledger is unreachable; retry", out);
}

/* Runs SQL without parameters; LEDGER_OK or LEDGER_ERROR (logged). */
static int wh_exec(PGconn *pg, const char *sql)
{
    PGresult *r = ledger_query(pg, sql, 0, NULL);
    if (!r) return LEDGER_ERROR;
    PQclear(r);
    return LEDGER_OK;
}

/* The JSON text in column 0 of row ROW, parsed (NULL on failure). */
static json_t *wh_row_json(const PGresult *r, int row)
{
    return json_loads(PQgetvalue(r, row, 0), 0, NULL);
}

#define WH_ENDPOINT_JSON                                                                           \
    "jsonb_build_object('id', w.id, 'account_id', w.account_id, 'url', w.url, 'enabled', "         \
    "w.enabled, 'created_at', " WH_ISO("w.created_at") ")::text"

/* The body of webhooks_api_create inside its transaction. */
static int wh_create_tx(control_ctx *c, int64_t account, const char *url, int enabled,
                        const char *sealed, json_t **row)
{
    char ids[24];
    const char *p[4] = {ids, url, sealed, enabled ? "t" : "f"};
    PGresult *r;
    int n;
    snprintf(ids, sizeof ids, "%" PRId64, account);
    /* The account's row lock serialises creates: the bound holds under
     * concurrent calls. */
    r = ledger_query(c->pg,
                     "SELECT (SELECT count(*) FROM webhook_endpoints WHERE account_id = a.id) "
                     "FROM accounts a WHERE a.id = $1 FOR UPDATE",
                     1, p);
    if (!r) return LEDGER_ERROR;
    if (PQntuples(r) != 1) {
        PQclear(r);
        return LEDGER_NOT_FOUND;
    }
    n = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    if (n >= WEBHOOK_MAX_ENDPOINTS) return LEDGER_LIMIT;
    r = ledger_query(c->pg,
                     "INSERT INTO webhook_endpoints AS w (account_id, url, secret_enc, enabled) "
                     "VALUES ($1, $2, $3::bytea, $4::boolean) RETURNING " WH_ENDPOINT_JSON,
                     4, p);
    if (!r) return LEDGER_ERROR;
    *row = wh_row_json(r, 0);
    PQclear(r);
    if (!*row) return LEDGER_ERROR;
    /* An account with an endpoint is watched for balance.exhausted. */
    return alerts_ensure_exhausted(c->pg, account);
}

int webhooks_api_create(control_ctx *c, int64_t account, const char *body, size_t len, json_t **out)
{
    char msg[256], secret[WEBHOOK_SECRET_LEN + 1], sealed[512];
    json_t *j = api_body_parse(body, len, msg, sizeof msg), *en, *row = NULL;
    const char *url, *bad;
    webhook_key key;
    int rc, status;
    if (!j) return webhooks_refuse(400, "bad_request", msg, out);
    url = json_string_value(json_object_get(j, "url"));
    bad = !url ? "url is required: a string" : webhook_url_check(url);
    en = json_object_get(j, "enabled");
    if (!bad && en && !json_is_boolean(en)) bad = "enabled must be true or false";
    if (!bad && url && strlen(url) != json_string_length(json_object_get(j, "url")))
        bad = "url must not contain NUL";
    if (bad) {
        status = webhooks_refuse(400, "bad_request", bad, out);
        goto out;
    }
    webhook_secret_generate(secret);
    webhook_key_derive(c->pepper, &key);
    rc = webhook_secret_seal(&key, account, secret, sealed, sizeof sealed);
    sodium_memzero(&key, sizeof key);
    if (rc != 0 || wh_exec(c->pg, "BEGIN") != LEDGER_OK) {
        status = webhooks_failure(LEDGER_ERROR, "", out);
        goto out;
    }
    rc = wh_create_tx(c, account, url, en ? json_is_true(en) : 1, sealed, &row);
    if (rc == LEDGER_OK) rc = wh_exec(c->pg, "COMMIT");
    if (rc != LEDGER_OK) {
        wh_exec(c->pg, "ROLLBACK");
        json_decref(row);
        row = NULL;
        if (rc == LEDGER_LIMIT)
            status = webhooks_refuse(409, "too_many_webhooks",
                                     "an account has at most 10 webhook endpoints; remove one "
                                     "first",
                                     out);
        else
            status = webhooks_failure(rc, "no such account", out);
        goto out;
    }
    /* Shown once: only this answer ever carries it. */
    json_object_set_new(row, "secret", json_string(secret));
    *out = row;
    status = 201;
    log_info("webhook endpoint %" PRId64 " added to account %" PRId64,
             (int64_t)json_integer_value(json_object_get(row, "id")), account);
out:
    sodium_memzero(secret, sizeof secret);
    json_decref(j);
    return status;
}

int webhooks_api_list(control_ctx *c, int64_t account, json_t **out)
{
    char ids[24];
    const char *p[1] = {ids};
    PGresult *r;
    json_t *arr;
    ledger_account a;
    int rc = ledger_account_get(c->pg, account, &a);
    if (rc != LEDGER_OK) return webhooks_failure(rc, "no such account", out);
    snprintf(ids, sizeof ids, "%" PRId64, account);
    r = ledger_query(
        c->pg,
        "SELECT (" WH_ENDPOINT_JSON "::jsonb || jsonb_build_object('pending', (SELECT count(*) "
        "FROM webhook_deliveries d WHERE d.endpoint_id = w.id AND d.state = 'pending')))::text "
        "FROM webhook_endpoints w WHERE w.account_id = $1 ORDER BY w.id",
        1, p);
    if (!r) return webhooks_failure(LEDGER_ERROR, "", out);
    arr = json_array();
    for (int i = 0; i < PQntuples(r); i++)
        json_array_append_new(arr, wh_row_json(r, i));
    PQclear(r);
    *out = json_pack("{s:I, s:o}", "account_id", (json_int_t)account, "webhooks", arr);
    return 200;
}

int webhooks_api_remove(control_ctx *c, int64_t endpoint, json_t **out)
{
    char ids[24];
    const char *p[1] = {ids};
    PGresult *r;
    int n;
    snprintf(ids, sizeof ids, "%" PRId64, endpoint);
    /* Its deliveries and their attempts go with it (ON DELETE CASCADE); an
     * attempt in flight then records nothing. */
    r = ledger_query(c->pg, "DELETE FROM webhook_endpoints WHERE id = $1 RETURNING account_id", 1,
                     p);
    if (!r) return webhooks_failure(LEDGER_ERROR, "", out);
    n = PQntuples(r);
    if (n == 1)
        log_info("webhook endpoint %" PRId64 " of account %s removed", endpoint,
                 PQgetvalue(r, 0, 0));
    PQclear(r);
    if (n != 1) return webhooks_failure(LEDGER_NOT_FOUND, "no such webhook endpoint", out);
    *out = NULL;
    return 204;
}

/* A delivery with its last 10 attempts, as JSON text (one column). */
#define WH_ATTEMPT_JSON                                                                            \
    "jsonb_build_object('attempt', a.attempt, 'started_at', " WH_ISO(                              \
        "a.started_at") ", 'duration_ms', a.duration_ms, 'status', a.status_code, 'error', "       \
                        "a.error, "                                                                \
                        "'response', a.response)"
#define WH_DELIVERY_JSON                                                                                                                                                                                                                           \
    "jsonb_build_object('id', d.id, 'event_id', d.event_id, 'type', e.type, 'endpoint_id', "                                                                                                                                                       \
    "d.endpoint_id, 'state', d.state, 'attempts', d.attempts, 'scheduled_at', " WH_ISO(                                                                                                                                                            \
        "d.scheduled_at") ", 'next_attempt_at', CASE WHEN d.state = 'pending' THEN " WH_ISO("d."                                                                                                                                                   \
                                                                                            "next"                                                                                                                                                 \
                                                                                            "_att"                                                                                                                                                 \
                                                                                            "empt"                                                                                                                                                 \
                                                                                            "_at") " END, 'last_status', d.last_status, 'last_error', "                                                                                            \
                                                                                                   "d.last_error, 'delivered_at', " WH_ISO("d.delivered_at") ", 'failed_at', " WH_ISO(                                                             \
                                                                                                       "d.failed_at") ", 'created_at', " WH_ISO("e.created_at") ", 'attempt_log', "                                                                \
                                                                                                                                                                "(SELECT coalesce(jsonb_agg(" WH_ATTEMPT_JSON                                      \
                                                                                                                                                                " ORDER BY a.id), '[]') FROM "                                                     \
                                                                                                                                                                "(SELECT * FROM webhook_attempts x WHERE x.delivery_id = d.id ORDER BY x.id DESC " \
                                                                                                                                                                "LIMIT 10) a))::text"

int webhooks_api_deliveries(control_ctx *c, int64_t endpoint, const char *limit, const char *before,
                            json_t **out)
{
    char ids[24], bs[24], ls[16];
    const char *p[3] = {ids, bs, ls};
    int64_t lim = 50, bef = 0;
    PGresult *r;
    json_t *arr;
    int n;
    if (limit && (env_parse_int64(limit, &lim) != 0 || lim < 1 || lim > WEBHOOK_DELIVERIES_MAX))
        return webhooks_refuse(400, "bad_request", "limit must be an integer from 1 to 200", out);
    if (before && (env_parse_int64(before, &bef) != 0 || bef < 1))
        return webhooks_refuse(400, "bad_request", "before must be a positive delivery id", out);
    snprintf(ids, sizeof ids, "%" PRId64, endpoint);
    snprintf(bs, sizeof bs, "%" PRId64, bef > 0 ? bef : INT64_MAX);
    snprintf(ls, sizeof ls, "%" PRId64, lim);
    r = ledger_query(c->pg, "SELECT 1 FROM webhook_endpoints WHERE id = $1", 1, p);
    if (!r) return webhooks_failure(LEDGER_ERROR, "", out);
    n = PQntuples(r);
    PQclear(r);
    if (n != 1) return webhooks_failure(LEDGER_NOT_FOUND, "no such webhook endpoint", out);
    r = ledger_query(c->pg,
                     "SELECT " WH_DELIVERY_JSON ", d.id FROM webhook_deliveries d "
                     "JOIN webhook_events e ON e.id = d.event_id "
                     "WHERE d.endpoint_id = $1 AND d.id < $2 ORDER BY d.id DESC LIMIT $3",
                     3, p);
    if (!r) return webhooks_failure(LEDGER_ERROR, "", out);
    arr = json_array();
    n = PQntuples(r);
    for (int i = 0; i < n; i++)
        json_array_append_new(arr, wh_row_json(r, i));
    *out = json_pack("{s:I, s:o}", "endpoint_id", (json_int_t)endpoint, "deliveries", arr);
    /* The cursor of the next (older) page, when this one was full. */
    json_object_set_new(*out, "next_before",
                        n == lim ? json_integer(strtoll(PQgetvalue(r, n - 1, 1), NULL, 10))
                                 : json_null());
    PQclear(r);
    return 200;
}

/* 1 if ID[0..LEN) is a uuid's text (8-4-4-4-12 hex digits). */
static int wh_uuid(const char *id, size_t len)
{
    if (len != WEBHOOK_EVENT_ID_LEN) return 0;
    for (size_t i = 0; i < len; i++) {
        int dash = i == 8 || i == 13 || i == 18 || i == 23;
        char ch = id[i];
        if (dash ? ch != '-'
                 : !((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') ||
                     (ch >= 'A' && ch <= 'F')))
            return 0;
    }
    return 1;
}

int webhooks_api_replay(control_ctx *c, const char *event_id, size_t idlen, json_t **out)
{
    char id[WEBHOOK_EVENT_ID_LEN + 1];
    const char *p[1] = {id};
    PGresult *r;
    int found;
    long long n;
    if (!wh_uuid(event_id, idlen)) return webhooks_failure(LEDGER_NOT_FOUND, "no such event", out);
    memcpy(id, event_id, idlen);
    id[idlen] = '\0';
    /* Every enabled endpoint of the account gets the event again now,
     * including one added after it; a delivered or failed delivery becomes
     * pending again with a new 24 h horizon (attempt numbers go on). */
    r = ledger_query(
        c->pg,
        "WITH ev AS (SELECT id, account_id FROM webhook_events WHERE id = $1::uuid), "
        " up AS (INSERT INTO webhook_deliveries (event_id, endpoint_id) "
        "  SELECT ev.id, w.id FROM ev JOIN webhook_endpoints w "
        "  ON w.account_id = ev.account_id AND w.enabled "
        "  ON CONFLICT (event_id, endpoint_id) DO UPDATE SET state = 'pending', "
        "  scheduled_at = now(), next_attempt_at = now(), delivered_at = NULL, failed_at = NULL, "
        "  claimed_by = NULL WHERE NOT (webhook_deliveries.claimed_by IS NOT NULL AND "
        "  webhook_deliveries.next_attempt_at > now()) RETURNING id) "
        "SELECT (SELECT count(*) FROM ev), (SELECT count(*) FROM up), "
        "  pg_notify('" WEBHOOK_CHANNEL "', '') IS NULL",
        1, p);
    if (!r) return webhooks_failure(LEDGER_ERROR, "", out);
    found = atoi(PQgetvalue(r, 0, 0));
    n = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
    PQclear(r);
    if (!found) return webhooks_failure(LEDGER_NOT_FOUND, "no such event", out);
    log_info("event %s replayed to %lld endpoint(s)", id, n);
    *out = json_pack("{s:s, s:I}", "event_id", id, "deliveries", (json_int_t)n);
    return 202;
}
