/* webhooks.h: webhook endpoints, their signing secrets, the events outbox,
 * the delivery log and replays (schema/007). Owns what an event and an
 * endpoint are in Postgres, how a secret is made, stored (encrypted) and
 * used to sign, and the admin API's and CLI's webhook calls (JSON in, JSON
 * out, one set of rules for both). Does not own thresholds and crossings
 * (alerts.c) nor sending (whdeliver.c, the only part that links libcurl:
 * this file must stay linkable into every binary that links ledger.c).
 *
 * Events are written by webhook_event_add inside the caller's transaction,
 * so an event exists iff the change it reports committed. */
#ifndef POINTGATE_WEBHOOKS_H
#define POINTGATE_WEBHOOKS_H

#include "common/apikey.h"
#include "billing/events.h"
#include "billing/metrics.h"

#include <jansson.h>
#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>

#define WEBHOOK_MAX_ENDPOINTS 10 /* per account */
#define WEBHOOK_MAX_URL 2048
#define WEBHOOK_SECRET_BYTES 32
#define WEBHOOK_SECRET_PREFIX "whsec_"
/* "whsec_" + base64 of 32 bytes (44 characters) + NUL */
#define WEBHOOK_SECRET_LEN (6 + 44)
/* "v1," + base64 of a 32-byte HMAC + NUL */
#define WEBHOOK_SIGNATURE_LEN (3 + 44 + 1)
#define WEBHOOK_DELIVERIES_MAX 200 /* per page of the delivery log */
#define WEBHOOK_EVENT_ID_LEN 36    /* a uuid's text */

/* ---- secrets ------------------------------------------------------------ */

/* The encryption key of stored secrets, derived from the KEY_PEPPER key:
 * HMAC-SHA256(pepper key, "pointgate webhook secret v1"). */
typedef struct webhook_key {
    unsigned char k[32];
} webhook_key;
void webhook_key_derive(const apikey_pepper *pepper, webhook_key *out);

/* A fresh secret, "whsec_" + base64 (standard alphabet) of 32 random bytes. */
void webhook_secret_generate(char out[WEBHOOK_SECRET_LEN + 1]);
/* Encrypts SECRET (its text) bound to ACCOUNT into OUT as a bytea hex
 * literal ("\\x..."); -1 if CAP is too small. */
int webhook_secret_seal(const webhook_key *k, int64_t account, const char *secret, char *out,
                        size_t cap);
/* Decrypts HEX (a bytea's text, "\\x...") of ACCOUNT's endpoint into the
 * signing key: the secret's decoded bytes (*LEN of them). -1 when it does not
 * open (wrong KEY_PEPPER, tampered row). The caller wipes KEY. */
int webhook_secret_open(const webhook_key *k, int64_t account, const char *hex,
                        unsigned char key[64], size_t *len);

/* The Standard Webhooks signature "v1,<base64 HMAC-SHA256(KEY, ID.TS.BODY)>". */
void webhook_sign(const unsigned char *key, size_t keylen, const char *id, long long ts,
                  const char *body, size_t bodylen, char out[WEBHOOK_SIGNATURE_LEN]);

/* NULL if URL is acceptable for an endpoint (http or https, a host, at most
 * WEBHOOK_MAX_URL printable ASCII characters, no credentials, no
 * fragment); else what is wrong with it. */
const char *webhook_url_check(const char *url);

/* ---- the admin API and the CLI -------------------------------------------
 * Each returns the HTTP status of the answer and sets *OUT to its JSON body
 * (NULL for a 204); a refusal is {"error","message"} and changed nothing.
 * BODY/LEN is the request's JSON body. */
struct control_ctx;
int webhooks_api_create(struct control_ctx *c, int64_t account, const char *body, size_t len,
                        json_t **out);
int webhooks_api_list(struct control_ctx *c, int64_t account, json_t **out);
int webhooks_api_remove(struct control_ctx *c, int64_t endpoint, json_t **out);
/* LIMIT and BEFORE are the query's text values (NULL: absent). */
int webhooks_api_deliveries(struct control_ctx *c, int64_t endpoint, const char *limit,
                            const char *before, json_t **out);
int webhooks_api_replay(struct control_ctx *c, const char *event_id, size_t idlen, json_t **out);

/* {"error": CODE, "message": MESSAGE} with STATUS (shared with alerts.c). */
int webhooks_refuse(int status, const char *code, const char *message, json_t **out);
/* A ledger status (LEDGER_*) as an answer; WHAT names what was not found. */
int webhooks_failure(int rc, const char *what, json_t **out);

#endif
