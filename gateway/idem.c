/* idem.c: Idempotency-Key's syntax, hashes and stored answers (see idem.h). */
#include "gateway/idem.h"

#include "gateway/forward.h"

#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int idem_key_hash(const char *v, unsigned char out[IDEM_HASH])
{
    char key[IDEM_KEY_MAX];
    size_t n = 0;
    if (!v || !*v) return -1;
    if (*v == '"') {
        /* sf-string (RFC 8941 3.3.3): printable ASCII, \" and \\ escaped. */
        const char *p = v + 1;
        for (; *p && *p != '"'; p++) {
            unsigned char c = (unsigned char)*p;
            if (c == '\\') {
                c = (unsigned char)*++p;
                if (c != '"' && c != '\\') return -1;
            } else if (c < 0x20 || c > 0x7e) {
                return -1;
            }
            if (n == sizeof key) return -1;
            key[n++] = (char)c;
        }
        if (*p != '"' || p[1] != '\0') return -1;
    } else {
        /* A bare value: visible ASCII, no space (the parser trimmed OWS). */
        for (const char *p = v; *p; p++) {
            unsigned char c = (unsigned char)*p;
            if (c <= 0x20 || c > 0x7e || n == sizeof key) return -1;
            key[n++] = (char)c;
        }
    }
    if (n == 0) return -1;
    crypto_hash_sha256(out, (const unsigned char *)key, n);
    return 0;
}

void idem_fingerprint(const char *method, const char *target, const char *body, size_t len,
                      unsigned char out[IDEM_HASH])
{
    crypto_hash_sha256_state st;
    unsigned char bh[IDEM_HASH];
    crypto_hash_sha256(bh, (const unsigned char *)body, len);
    crypto_hash_sha256_init(&st);
    /* NUL-separated: neither a method nor a target holds one. */
    crypto_hash_sha256_update(&st, (const unsigned char *)method, strlen(method) + 1);
    crypto_hash_sha256_update(&st, (const unsigned char *)target, strlen(target) + 1);
    crypto_hash_sha256_update(&st, bh, sizeof bh);
    crypto_hash_sha256_final(&st, out);
}

void idem_hex(const unsigned char in[IDEM_HASH], char out[IDEM_HEX])
{
    sodium_bin2hex(out, IDEM_HEX, in, IDEM_HASH);
}

size_t idem_marker_bare(char *out, size_t cap, const unsigned char fp[IDEM_HASH], const char *rid,
                        long status, char why)
{
    char hex[IDEM_HEX];
    int n;
    idem_hex(fp, hex);
    n = snprintf(out, cap, "n|%s|%s|%ld|%c", hex, rid, status, why);
    return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}

/* 1 for a header the stored answer keeps: what the client got from the
 * upstream, but a replay marks itself (Idempotent-Replayed is the
 * gateway's on a replay, never the upstream's). */
static int idem_keep_header(const char *name)
{
    return forward_response_header(name) && strcasecmp(name, "Idempotent-Replayed") != 0;
}

char *idem_marker_answer(const unsigned char fp[IDEM_HASH], const char *rid, const proxy_call *c,
                         size_t max_body, size_t *len, int *kept)
{
    const char *name, *value;
    char hex[IDEM_HEX], pre[160];
    size_t off = 0, head = 0, at;
    char *m;
    int n;

    while ((off = proxy_header_next(c, off, &name, &value)) != 0)
        if (idem_keep_header(name)) head += strlen(name) + strlen(value) + 2;
    if (c->body.len > max_body || head > IDEM_HEAD_MAX) {
        *kept = 0;
        m = malloc(160);
        if (m && (*len = idem_marker_bare(m, 160, fp, rid, c->status, IDEM_WHY_TOO_LARGE)) == 0) {
            free(m);
            m = NULL;
        }
        return m;
    }
    *kept = 1;
    idem_hex(fp, hex);
    n = snprintf(pre, sizeof pre, "d|%s|%s|%03ld|%zu|", hex, rid, c->status, head);
    if (n <= 0 || (size_t)n >= sizeof pre) return NULL;
    m = malloc((size_t)n + head + c->body.len);
    if (!m) return NULL;
    memcpy(m, pre, (size_t)n);
    at = (size_t)n;
    off = 0;
    while ((off = proxy_header_next(c, off, &name, &value)) != 0) {
        size_t nl = strlen(name) + 1, vl = strlen(value) + 1;
        if (!idem_keep_header(name)) continue;
        memcpy(m + at, name, nl);
        memcpy(m + at + nl, value, vl);
        at += nl + vl;
    }
    if (c->body.len) memcpy(m + at, c->body.p, c->body.len);
    *len = at + c->body.len;
    return m;
}

/* Characters a header name may have (RFC 9110 tchar). */
static int idem_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

int idem_answer_parse(const char *s, size_t len, idem_answer *out)
{
    size_t i = 0, head = 0;
    unsigned status = 0;
    int digits = 0;
    /* What Redis keeps is written by this gateway, but it goes to a client
     * verbatim: checked as the upstream's answer was (no header splitting
     * from a damaged or foreign value). */
    for (; i < len && s[i] >= '0' && s[i] <= '9' && digits < 3; i++, digits++)
        status = status * 10 + (unsigned)(s[i] - '0');
    if (digits != 3 || status < 100 || status > 599 || i >= len || s[i++] != '|') return -1;
    for (digits = 0; i < len && s[i] >= '0' && s[i] <= '9' && digits < 6; i++, digits++)
        head = head * 10 + (size_t)(s[i] - '0');
    if (!digits || head > IDEM_HEAD_MAX || i >= len || s[i++] != '|' || len - i < head) return -1;
    out->status = status;
    out->head = s + i;
    out->head_len = head;
    out->body = s + i + head;
    out->body_len = len - i - head;
    /* Pairs: a token, NUL, a value without controls but HTAB, NUL. */
    for (size_t p = 0; p < head;) {
        size_t q = p;
        while (q < head && idem_tchar((unsigned char)out->head[q]))
            q++;
        if (q == p || q == head || out->head[q] != '\0') return -1;
        for (p = ++q; q < head && out->head[q] != '\0'; q++) {
            unsigned char c = (unsigned char)out->head[q];
            if ((c < 0x20 && c != '\t') || c == 0x7f) return -1;
        }
        if (q == head) return -1;
        p = q + 1;
    }
    return 0;
}

size_t idem_answer_header_next(const idem_answer *a, size_t off, const char **name,
                               const char **value)
{
    if (off >= a->head_len) return 0;
    *name = a->head + off;
    *value = *name + strlen(*name) + 1;
    return (size_t)(*value - a->head) + strlen(*value) + 1;
}
