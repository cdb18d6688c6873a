/* redisurl.h: REDIS_URL, shared by billing (sync hiredis) and the gateway
 * (async hiredis). Owns the URL's grammar, percent-decoding of the
 * credentials, and the redacted form every log line uses; does not own the
 * connection (billing/hot.c, gateway/hotclient.c send AUTH and SELECT).
 *
 *   redis://[[user]:password@]host[:port][/db]
 *   redis+cluster://[[user]:password@]host[:port][,host[:port]...]
 *
 * The second form names a Redis Cluster by its seed nodes (at most
 * REDISURL_SEEDS_MAX): any one that answers gives the slot map (cluster.h),
 * so one seed is enough and more only survive a seed being down. A cluster
 * has no databases: a /db other than 0 is refused rather than ignored.
 *
 * user and password may be percent-encoded (%40 for '@', %3A for ':', %2F for
 * '/'); an empty user (redis://:password@host) is Redis' default user, whose
 * AUTH takes the password alone. host is a name, an IPv4 address or an
 * [IPv6] literal; port defaults to 6379, db to 0 (0..15). The password never
 * leaves this struct except in AUTH: errors and redisurl_redact() show it as
 * "***". */
#ifndef POINTGATE_REDISURL_H
#define POINTGATE_REDISURL_H

#include <stddef.h>

#define REDISURL_HOST_MAX 256
#define REDISURL_CRED_MAX 256
#define REDISURL_SEEDS_MAX 16
/* Both programs' refusal of a cluster URL until the hot path routes by slot
 * (one seed used as a single Redis would answer MOVED to most calls). */
#define REDISURL_CLUSTER_NOT_SERVED                                                                \
    "REDIS_URL: redis+cluster:// is not served by this version yet (docs/SCALING.md); use "        \
    "redis://"

typedef struct redisurl_node {
    char host[REDISURL_HOST_MAX];
    int port;
} redisurl_node;

typedef struct redisurl {
    char host[REDISURL_HOST_MAX]; /* without the brackets of an IPv6 literal; */
    int port;                     /* for a cluster, its first seed */
    int db;
    int cluster; /* redis+cluster:// */
    int nseeds;  /* a cluster's seeds, in the URL's order (1 for redis://) */
    redisurl_node seeds[REDISURL_SEEDS_MAX];
    char user[REDISURL_CRED_MAX];     /* decoded; "" = the default user */
    char password[REDISURL_CRED_MAX]; /* decoded; "" = no AUTH at all */
} redisurl;

/* Parses URL into U. 0, or -1 with the reason in ERR (which never holds the
 * password). */
int redisurl_parse(const char *url, redisurl *u, char *err, size_t errlen);

/* URL with its password replaced by "***" (also for a URL that does not
 * parse: everything between "://" and the last '@' after the first ':' is
 * hidden). Always NUL-terminates OUT; truncates when OUTLEN is short. */
void redisurl_redact(const char *url, char *out, size_t outlen);

/* Overwrites the password in U (before U is freed or goes out of scope). */
void redisurl_wipe(redisurl *u);

#endif
