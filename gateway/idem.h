/* idem.h: Idempotency-Key (draft-ietf-httpapi-idempotency-key-header) on
 * the gateway's side: the header's syntax, the key's hash, the request's
 * fingerprint, and the format of the markers settle.lua stores for a call
 * (common/prelude.lua) with the answer a replay sends back.
 * Pure functions on buffers. Does not decide whether a call is a replay, a
 * conflict or a first call (reserve.lua does, in the reserve's script
 * call), nor talk to Redis (hotclient.c), nor answer (request.c). */
#ifndef GATEWAY_IDEM_H
#define GATEWAY_IDEM_H

#include "gateway/proxy.h"

#include <stddef.h>
#include <stdint.h>

/* A key is 1..IDEM_KEY_MAX characters (after unquoting). */
#define IDEM_KEY_MAX 255
/* SHA-256: the key's hash (its Redis name) and the fingerprint. */
#define IDEM_HASH 32
#define IDEM_HEX (2 * IDEM_HASH + 1)
/* The answer's headers a marker keeps, as name\0value\0 pairs: past it the
 * answer is not kept (like a body past IDEMPOTENCY_MAX_BODY). */
#define IDEM_HEAD_MAX (16 * 1024)
/* Why a billable answer is not kept (the "n" marker): too large, or its
 * settle was resent after a Redis outage or replayed from a spill file
 * (its answer is no longer in memory). */
#define IDEM_WHY_TOO_LARGE 't'
#define IDEM_WHY_LATE 'l'

/* The value of an Idempotency-Key header V: an sf-string ("..." with \"
 * and \\ escapes, printable ASCII) or, as most clients send it, a bare
 * token of visible ASCII; 1..IDEM_KEY_MAX characters either way. 0 with
 * the SHA-256 of the key's characters (unquoted) in OUT, or -1. */
int idem_key_hash(const char *v, unsigned char out[IDEM_HASH]);

/* The request's fingerprint: SHA-256 over METHOD, the raw TARGET (path and
 * query as sent) and the SHA-256 of BODY[0..LEN). */
void idem_fingerprint(const char *method, const char *target, const char *body, size_t len,
                      unsigned char out[IDEM_HASH]);

/* IN as 64 lower-case hex digits and a NUL. */
void idem_hex(const unsigned char in[IDEM_HASH], char out[IDEM_HEX]);

/* The marker that keeps call RID's answer C (status, the headers
 * forward_response_header lets through but Idempotent-Replayed, the body):
 * "d|<fp>|<rid>|<answer>", malloc'd, its length in *LEN. When the body is
 * over MAX_BODY or the headers over IDEM_HEAD_MAX, the marker of an answer
 * not kept ("n|<fp>|<rid>|<status>|t") instead, and *KEPT = 0. NULL when
 * out of memory. */
char *idem_marker_answer(const unsigned char fp[IDEM_HASH], const char *rid, const proxy_call *c,
                         size_t max_body, size_t *len, int *kept);
/* "n|<fp>|<rid>|<status>|<why>" into OUT (CAP bytes): its length, or 0
 * when it does not fit. */
size_t idem_marker_bare(char *out, size_t cap, const unsigned char fp[IDEM_HASH], const char *rid,
                        long status, char why);

/* A stored answer as reserve.lua hands it back: "<status>|<head length>|"
 * then the head (name\0value\0 pairs), then the body. */
typedef struct idem_answer {
    unsigned status;
    const char *head;
    size_t head_len;
    const char *body;
    size_t body_len;
} idem_answer;
/* 0, or -1 when S[0..LEN) is not a well-formed answer. */
int idem_answer_parse(const char *s, size_t len, idem_answer *out);
/* Iterates the answer's headers: the offset of the next pair, 0 at the end. */
size_t idem_answer_header_next(const idem_answer *a, size_t off, const char **name,
                               const char **value);

#endif
