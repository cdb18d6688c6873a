/* routes.h: the route table: parsing the routes file, normalising request
 * paths and matching them. Owns nothing at run time but immutable tables:
 * a table is built whole, handed to one worker thread and only read there;
 * reload builds a new one (one per worker) and the worker swaps it in. The
 * reference count is therefore per thread and needs no atomics. */
#ifndef GATEWAY_ROUTES_H
#define GATEWAY_ROUTES_H

#include <stddef.h>
#include <stdint.h>

#define ROUTES_PATH_MAX 4096

typedef struct route {
    char *id;
    uint64_t id_hash; /* routes_id_hash(id): what a key's scopes are matched by */
    char *method;
    char **segs; /* pattern segments; "*" one segment, "**" (last) the rest */
    size_t nsegs;
    int usage;     /* usage-priced: hold up front, charge units x unit_price */
    int64_t price; /* fixed price, or the hold of a usage route */
    int64_t unit_price;
    char *units_header;
    int64_t timeout_ms;
    unsigned charge_on; /* bit N set: status class Nxx is billable */
    /* Its rate limit per API key ("rate": quota calls per window; 0 0:
     * none), checked in Redis by reserve.lua with the key's own override. */
    int64_t rate_quota, rate_window_ms;
    /* Idempotency-Key on its POST and PATCH calls (ROUTES_IDEM_*): used when
     * sent (optional), required, or ignored (off: forwarded as any header). */
    int idempotency;
    int metric_slot; /* its worker's metrics slot (gw_metrics_route_slot), set on adoption */
} route;

#define ROUTES_IDEM_OPTIONAL 0
#define ROUTES_IDEM_REQUIRED 1
#define ROUTES_IDEM_OFF 2

typedef struct route_table {
    route *routes;
    size_t n;
    int refs; /* owner thread only */
} route_table;

/* Parses PATH into a new table (refs = 1). On error returns -1 with a
 * message in ERR; nothing is allocated then. */
int routes_load(const char *path, int64_t default_timeout_ms, route_table **out, char *err,
                size_t errlen);
/* The same from the file's text BUF[0..LEN) (NAME stands for the file in
 * messages): the fuzz harnesses parse route files without a file. */
int routes_load_buffer(const char *buf, size_t len, const char *name, int64_t default_timeout_ms,
                       route_table **out, char *err, size_t errlen);
void routes_ref(route_table *t);
void routes_unref(route_table *t);

/* The first route matching METHOD and decoded PATH, or NULL. */
/* A route id's 64-bit FNV-1a hash: API keys' scopes are kept as these
 * (gateway/authcache.h), compared with the matched route's. Ids are set by
 * the operator, never by a caller, so a chosen collision is not a threat. */
uint64_t routes_id_hash(const char *id, size_t len);

const route *routes_match(const route_table *t, const char *method, const char *path);

/* Checks the raw request path (before '?') of LEN bytes and writes its
 * percent-decoded form to OUT. Returns -1 for what the gateway refuses:
 * not absolute, "..", ".", "//", encoded '/' or '\', NUL, encoded control
 * bytes (%00-%1F, %7F), double encoding (a decoded '%' followed by two
 * decoded hex digits: "%252e", "%25%32%65"), overlong UTF-8 ("%c0%ae"), a
 * segment that is empty, "." or ".." before a ';' ("..;x": a servlet
 * container's ".."), bad escapes. */
int routes_normalise(const char *raw, size_t len, char *out, size_t outlen);

/* 1 if STATUS is billable on route R. */
int routes_billable(const route *r, long status);

#endif
