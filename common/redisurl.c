/* redisurl.c: REDIS_URL parsing and redaction (see redisurl.h).
 *
 * Strict on purpose: a URL that could mean two things (user info without
 * ':', a raw '/' or '@' in a password) is refused with the fix in the error,
 * rather than guessed; a wrong guess would show up only as WRONGPASS at the
 * first connect. The user info ends at the LAST '@' so that such a mistake
 * is reported as a character to percent-encode, not as a strange host. */
#include "common/redisurl.h"

#include <stdio.h>
#include <string.h>

#define REDISURL_USAGE                                                                             \
    "expected redis://[[user]:password@]host[:port][/db] or "                                      \
    "redis+cluster://[[user]:password@]host[:port][,host[:port]...]"

static void redisurl_err(char *err, size_t errlen, const char *msg)
{
    if (errlen > 0) snprintf(err, errlen, "%s", msg);
}

static int redisurl_hex(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* RFC 3986 userinfo characters other than ':' and '%': unreserved and
 * sub-delims. */
static int redisurl_cred_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           strchr("-._~!$&'()*+,;=", c) != NULL;
}

/* Percent-decodes S[0..N) into OUT (cap REDISURL_CRED_MAX). COLON_OK: a raw
 * ':' is part of the value (a password); in a user it would be the
 * separator, which the caller already split on. */
static int redisurl_decode(const char *s, size_t n, char *out, int colon_ok, const char *what,
                           char *err, size_t errlen)
{
    size_t o = 0;
    char msg[160];
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '%') {
            int hi = -1;
            if (i + 2 < n) {
                int lo = redisurl_hex(s[i + 2]);
                hi = redisurl_hex(s[i + 1]);
                hi = hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
            }
            if (hi < 0) {
                snprintf(msg, sizeof msg, "bad percent-encoding in the %s (%%XX, two hex digits)",
                         what);
                redisurl_err(err, errlen, msg);
                return -1;
            }
            if (hi == 0) {
                snprintf(msg, sizeof msg, "the %s holds a NUL byte (%%00)", what);
                redisurl_err(err, errlen, msg);
                return -1;
            }
            c = (char)hi;
            i += 2;
        } else if (!redisurl_cred_char(c) && !(colon_ok && c == ':')) {
            snprintf(msg, sizeof msg,
                     "a character in the %s must be percent-encoded (%%40 for '@', %%2F for '/')",
                     what);
            redisurl_err(err, errlen, msg);
            return -1;
        }
        if (o + 1 >= REDISURL_CRED_MAX) {
            snprintf(msg, sizeof msg, "the %s is longer than %d bytes", what,
                     REDISURL_CRED_MAX - 1);
            redisurl_err(err, errlen, msg);
            return -1;
        }
        out[o++] = c;
    }
    out[o] = '\0';
    return 0;
}

static int redisurl_host_char(char c, int literal)
{
    if (literal)
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') ||
               c == ':' || c == '.';
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '.' ||
           c == '-' || c == '_';
}

/* Decimal digits S[0..N) as a number in [MIN, MAX]; -1 otherwise. */
static long redisurl_number(const char *s, size_t n, long min, long max)
{
    long v = 0;
    if (n == 0 || n > 6) return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v < min || v > max ? -1 : v;
}

/* One host[:port] of S[0..N) into NODE (port 6379 when absent). */
static int redisurl_hostport(const char *s, size_t n, redisurl_node *node, char *err, size_t errlen)
{
    const char *end = s + n, *host, *host_end, *port = NULL;
    int literal = 0;
    long v;

    if (*s == '[') {
        literal = 1;
        host = s + 1;
        host_end = memchr(s, ']', n);
        if (!host_end || (host_end + 1 < end && host_end[1] != ':')) {
            redisurl_err(err, errlen, "malformed [IPv6] host");
            return -1;
        }
        if (host_end + 1 < end) port = host_end + 2;
    } else {
        host = s;
        host_end = memchr(s, ':', n);
        if (host_end)
            port = host_end + 1;
        else
            host_end = end;
    }
    if (host_end == host || (size_t)(host_end - host) >= sizeof node->host) {
        redisurl_err(err, errlen, "empty or overlong host; " REDISURL_USAGE);
        return -1;
    }
    for (const char *h = host; h < host_end; h++) {
        if (!redisurl_host_char(*h, literal)) {
            redisurl_err(err, errlen, "invalid character in the host");
            return -1;
        }
    }
    memcpy(node->host, host, (size_t)(host_end - host));
    node->host[host_end - host] = '\0';
    node->port = 6379;
    if (port) {
        v = redisurl_number(port, (size_t)(end - port), 1, 65535);
        if (v < 0) {
            redisurl_err(err, errlen, "port must be 1..65535");
            return -1;
        }
        node->port = (int)v;
    }
    return 0;
}

int redisurl_parse(const char *url, redisurl *u, char *err, size_t errlen)
{
    const char *rest, *at, *hp, *end;
    long v;

    memset(u, 0, sizeof *u);
    if (!url || strncmp(url, "rediss://", 9) == 0) {
        redisurl_err(err, errlen,
                     url ? "TLS (rediss://) is not supported: reach Redis on a private network "
                           "or through a local TLS sidecar"
                         : REDISURL_USAGE);
        return -1;
    }
    if (strncmp(url, "redis://", 8) == 0) {
        rest = url + 8;
    } else if (strncmp(url, "redis+cluster://", 16) == 0) {
        rest = url + 16;
        u->cluster = 1;
    } else {
        redisurl_err(err, errlen, REDISURL_USAGE);
        return -1;
    }
    hp = rest;
    at = strrchr(rest, '@');
    if (at) {
        const char *colon = memchr(rest, ':', (size_t)(at - rest));
        if (!colon) {
            redisurl_err(err, errlen,
                         "user info without ':': write redis://:PASSWORD@host for the default "
                         "user, redis://USER:PASSWORD@host for an ACL user");
            goto fail;
        }
        if (redisurl_decode(rest, (size_t)(colon - rest), u->user, 0, "user", err, errlen) != 0 ||
            redisurl_decode(colon + 1, (size_t)(at - colon - 1), u->password, 1, "password", err,
                            errlen) != 0)
            goto fail;
        if (!u->password[0]) {
            redisurl_err(err, errlen, "empty password (leave out the user info for no AUTH)");
            goto fail;
        }
        hp = at + 1;
    }
    end = hp + strcspn(hp, "/");
    if (strpbrk(hp, "?#")) {
        redisurl_err(err, errlen, "a query or fragment is not supported; " REDISURL_USAGE);
        goto fail;
    }
    /* Seeds, comma-separated (a plain redis:// URL takes one). */
    for (const char *p = hp; p < end;) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *stop = comma ? comma : end;
        if (comma && !u->cluster) {
            redisurl_err(err, errlen,
                         "several hosts name a cluster: write redis+cluster://host:port,...");
            goto fail;
        }
        if (u->nseeds == REDISURL_SEEDS_MAX) {
            redisurl_err(err, errlen, "more than 16 seed nodes");
            goto fail;
        }
        if (redisurl_hostport(p, (size_t)(stop - p), &u->seeds[u->nseeds], err, errlen) != 0)
            goto fail;
        u->nseeds++;
        if (comma && comma + 1 == end) {
            redisurl_err(err, errlen, "empty host after ','; " REDISURL_USAGE);
            goto fail;
        }
        p = comma ? comma + 1 : end;
    }
    if (u->nseeds == 0) {
        redisurl_err(err, errlen, "empty or overlong host; " REDISURL_USAGE);
        goto fail;
    }
    memcpy(u->host, u->seeds[0].host, sizeof u->host);
    u->port = u->seeds[0].port;
    /* "/" alone or nothing: db 0. */
    if (*end == '/' && end[1]) {
        v = redisurl_number(end + 1, strlen(end + 1), 0, 15);
        if (v < 0) {
            redisurl_err(err, errlen, "db must be a number 0..15 (redis://host:port/db)");
            goto fail;
        }
        u->db = (int)v;
        if (u->cluster && u->db != 0) {
            redisurl_err(err, errlen, "a Redis Cluster has no databases: leave out /db");
            goto fail;
        }
    }
    return 0;
fail:
    redisurl_wipe(u);
    return -1;
}

void redisurl_redact(const char *url, char *out, size_t outlen)
{
    const char *start, *at, *colon, *hide_from;
    size_t n;
    if (outlen == 0) return;
    if (!url) {
        snprintf(out, outlen, "(unset)");
        return;
    }
    start = strstr(url, "://");
    start = start ? start + 3 : url;
    at = strrchr(start, '@');
    if (!at) {
        snprintf(out, outlen, "%s", url);
        return;
    }
    colon = memchr(start, ':', (size_t)(at - start));
    /* Without ':' the whole user info may be a password (redis-cli reads
     * it so): hide it all. */
    hide_from = colon ? colon + 1 : start;
    n = (size_t)(hide_from - url);
    snprintf(out, outlen, "%.*s***%s", (int)n, url, at);
}

void redisurl_wipe(redisurl *u)
{
    /* volatile: a memset before the end of a lifetime may be optimised out. */
    volatile char *p = u->password;
    for (size_t i = 0; i < sizeof u->password; i++)
        p[i] = 0;
}
