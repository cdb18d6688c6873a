/* env.c: environment configuration parsing (see env.h). */
#include "common/env.h"

#include "common/log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *env_str(const char *name, const char *def)
{
    const char *v = getenv(name);
    return (v && *v) ? v : def;
}

int env_parse_int64(const char *s, int64_t *out)
{
    char *end = NULL;
    long long v;
    if (!s || !*s) return -1;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0') return -1;
    *out = (int64_t)v;
    return 0;
}

int env_int64(const char *name, int64_t def, int64_t min, int64_t max, int64_t *out)
{
    const char *v = getenv(name);
    int64_t n;
    if (!v || !*v) {
        *out = def;
        return 0;
    }
    if (env_parse_int64(v, &n) != 0 || n < min || n > max) {
        log_error("%s=%s: expected an integer in [%lld, %lld]", name, v, (long long)min,
                  (long long)max);
        return -1;
    }
    *out = n;
    return 0;
}

int env_parse_hostport(const char *s, char *host, unsigned hostlen, int *port)
{
    const char *colon = strrchr(s, ':');
    int64_t p;
    size_t n;
    if (!colon) return -1;
    n = (size_t)(colon - s);
    if (n == 0 || n >= hostlen) return -1;
    if (env_parse_int64(colon + 1, &p) != 0 || p <= 0 || p > 65535) return -1;
    memcpy(host, s, n);
    host[n] = '\0';
    *port = (int)p;
    return 0;
}
