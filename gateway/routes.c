/* routes.c: routes file parsing (jansson), path normalisation and matching
 * (see routes.h). Matching is a linear scan: route files are small (tens of
 * routes) and the scan touches no shared state. */
#include "gateway/routes.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void routes_free_route(route *r)
{
    free(r->id);
    free(r->method);
    for (size_t i = 0; i < r->nsegs; i++)
        free(r->segs[i]);
    free(r->segs);
    free(r->units_header);
}

static void routes_free(route_table *t)
{
    if (!t) return;
    for (size_t i = 0; i < t->n; i++)
        routes_free_route(&t->routes[i]);
    free(t->routes);
    free(t);
}

void routes_ref(route_table *t)
{
    t->refs++;
}

void routes_unref(route_table *t)
{
    if (t && --t->refs == 0) routes_free(t);
}

/* Parses ["2xx","3xx",...] into a class bit set. */
static int routes_parse_charge_on(json_t *arr, unsigned *out, char *err, size_t errlen)
{
    size_t i;
    json_t *v;
    unsigned bits = 0;
    if (!json_is_array(arr)) {
        snprintf(err, errlen, "charge_on must be an array like [\"2xx\",\"3xx\"]");
        return -1;
    }
    json_array_foreach(arr, i, v)
    {
        const char *s = json_string_value(v);
        if (!s || strlen(s) != 3 || s[0] < '1' || s[0] > '5' || strcmp(s + 1, "xx") != 0) {
            snprintf(err, errlen, "charge_on entries must be \"1xx\"..\"5xx\"");
            return -1;
        }
        bits |= 1u << (s[0] - '0');
    }
    *out = bits;
    return 0;
}

static int routes_get_int(json_t *o, const char *name, int64_t min, int64_t max, int64_t *out,
                          int required, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, name);
    if (!v) {
        if (required) snprintf(err, errlen, "missing \"%s\"", name);
        return required ? -1 : 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max) {
        snprintf(err, errlen, "\"%s\" must be an integer in [%lld, %lld]", name, (long long)min,
                 (long long)max);
        return -1;
    }
    *out = (int64_t)json_integer_value(v);
    return 0;
}

static int routes_split_pattern(route *r, const char *path, char *err, size_t errlen)
{
    const char *p = path;
    if (path[0] != '/') {
        snprintf(err, errlen, "path \"%s\" must start with '/'", path);
        return -1;
    }
    while (*p == '/') {
        const char *start = ++p;
        size_t n;
        char **segs;
        while (*p && *p != '/')
            p++;
        n = (size_t)(p - start);
        if (n == 0 && *p) {
            snprintf(err, errlen, "path \"%s\" has an empty segment", path);
            return -1;
        }
        segs = realloc(r->segs, (r->nsegs + 1) * sizeof *segs);
        if (!segs) goto oom;
        r->segs = segs;
        r->segs[r->nsegs] = strndup(start, n);
        if (!r->segs[r->nsegs]) goto oom;
        r->nsegs++;
        if (strcmp(r->segs[r->nsegs - 1], "**") == 0 && *p) {
            snprintf(err, errlen, "path \"%s\": \"**\" must be the last segment", path);
            return -1;
        }
    }
    return 0;
oom:
    snprintf(err, errlen, "out of memory");
    return -1;
}

/* "rate": {"quota": N, "window_s": S} (N calls per S seconds, N at once),
 * or null for none. */
static int routes_parse_rate(json_t *v, int64_t *quota, int64_t *window_ms, char *err,
                             size_t errlen)
{
    int64_t q = 0, s = 0;
    *quota = *window_ms = 0;
    if (json_is_null(v)) return 0;
    if (!json_is_object(v) || json_object_size(v) != 2 ||
        routes_get_int(v, "quota", 1, 1000000, &q, 1, err, errlen) != 0 ||
        routes_get_int(v, "window_s", 1, 86400, &s, 1, err, errlen) != 0) {
        snprintf(err, errlen,
                 "\"rate\" must be {\"quota\": 1..1000000, \"window_s\": 1..86400} or null");
        return -1;
    }
    *quota = q;
    *window_ms = s * 1000;
    return 0;
}

/* "idempotency": "optional" | "required" | "off" into *OUT (ROUTES_IDEM_*). */
static int routes_parse_idem(json_t *v, int *out, char *err, size_t errlen)
{
    const char *s = json_string_value(v);
    static const char *const names[] = {"optional", "required", "off"};
    for (int i = 0; s && i < 3; i++)
        if (strcmp(s, names[i]) == 0) {
            *out = i;
            return 0;
        }
    snprintf(err, errlen, "\"idempotency\" must be \"optional\", \"required\" or \"off\"");
    return -1;
}

/* 1 when ID may name a route (see its use). */
static int routes_id_ok(const char *id)
{
    size_t n = strlen(id);
    if (n == 0 || n > 128 || id[0] == '_' || id[0] == '~') return 0;
    for (const char *p = id; *p; p++)
        if (*p <= ' ' || *p > '~' || *p == '|' || *p == '"' || *p == ',' || *p == '\\') return 0;
    return 1;
}

static int routes_parse_route(route *r, json_t *o, unsigned def_charge, int64_t def_timeout,
                              const int64_t def_rate[2], int def_idem, char *err, size_t errlen)
{
    const char *id = json_string_value(json_object_get(o, "id"));
    const char *method = json_string_value(json_object_get(o, "method"));
    const char *path = json_string_value(json_object_get(o, "path"));
    json_t *co = json_object_get(o, "charge_on");
    const int64_t pmax = (int64_t)1 << 40;

    if (!json_is_object(o) || !id || !*id || !method || !*method || !path) {
        snprintf(err, errlen, "each route needs string \"id\", \"method\" and \"path\"");
        return -1;
    }
    if (!routes_id_ok(id)) {
        /* The id travels into holds, outbox records, Postgres, logs and
         * CSV reports: printable ASCII without '|' (which separates the
         * parts of holds and outbox records), '"', ',' or '\\', and not
         * starting with '_' (billing's own holds: a negative adjustment's
         * guard) or '~' (a gateway's point lease, lease.lua). The message
         * does not echo it: it may hold control bytes. */
        snprintf(err, errlen,
                 "route id: 1 to 128 printable ASCII characters, none of '|', '\"', ',', "
                 "'\\' or a space, not starting with '_' or '~'");
        return -1;
    }
    r->id = strdup(id);
    r->id_hash = routes_id_hash(id, strlen(id));
    r->method = strdup(method);
    if (!r->id || !r->method) goto oom;
    if (routes_split_pattern(r, path, err, errlen) != 0) return -1;
    r->charge_on = def_charge;
    if (co && routes_parse_charge_on(co, &r->charge_on, err, errlen) != 0) return -1;
    r->timeout_ms = def_timeout;
    if (routes_get_int(o, "timeout_ms", 1, 3600000, &r->timeout_ms, 0, err, errlen) != 0) return -1;
    r->rate_quota = def_rate[0];
    r->rate_window_ms = def_rate[1];
    if (json_object_get(o, "rate") && routes_parse_rate(json_object_get(o, "rate"), &r->rate_quota,
                                                        &r->rate_window_ms, err, errlen) != 0)
        return -1;
    r->idempotency = def_idem;
    if (json_object_get(o, "idempotency") &&
        routes_parse_idem(json_object_get(o, "idempotency"), &r->idempotency, err, errlen) != 0)
        return -1;
    if (json_object_get(o, "price")) {
        if (json_object_get(o, "hold") || json_object_get(o, "unit_price")) {
            snprintf(err, errlen, "route %s: either \"price\" or \"hold\"+\"unit_price\"", id);
            return -1;
        }
        return routes_get_int(o, "price", 1, pmax, &r->price, 1, err, errlen);
    }
    r->usage = 1;
    if (routes_get_int(o, "hold", 1, pmax, &r->price, 1, err, errlen) != 0 ||
        routes_get_int(o, "unit_price", 1, pmax, &r->unit_price, 1, err, errlen) != 0)
        return -1;
    {
        const char *uh = json_string_value(json_object_get(o, "units_header"));
        if (!uh || !*uh) {
            snprintf(err, errlen, "route %s: usage routes need \"units_header\"", id);
            return -1;
        }
        r->units_header = strdup(uh);
        if (!r->units_header) goto oom;
    }
    return 0;
oom:
    snprintf(err, errlen, "out of memory");
    return -1;
}

/* Builds a table from the parsed file ROOT (NULL: JERR says why); NAME
 * names the file in messages. */
static int routes_from_json(json_t *root, const json_error_t *jerr, const char *path,
                            int64_t default_timeout_ms, route_table **out, char *err, size_t errlen)
{
    json_t *arr, *v;
    route_table *t = NULL;
    unsigned def_charge = (1u << 2) | (1u << 3);
    int64_t def_rate[2] = {0, 0};
    int def_idem = ROUTES_IDEM_OPTIONAL;
    size_t i;
    int rc = -1;

    if (!root) {
        snprintf(err, errlen, "%s:%d: %s", path, jerr->line, jerr->text);
        goto out;
    }
    if (json_object_get(root, "charge_on") &&
        routes_parse_charge_on(json_object_get(root, "charge_on"), &def_charge, err, errlen) != 0)
        goto out;
    if (json_object_get(root, "rate") &&
        routes_parse_rate(json_object_get(root, "rate"), &def_rate[0], &def_rate[1], err, errlen) !=
            0)
        goto out;
    if (json_object_get(root, "idempotency") &&
        routes_parse_idem(json_object_get(root, "idempotency"), &def_idem, err, errlen) != 0)
        goto out;
    arr = json_object_get(root, "routes");
    if (!json_is_array(arr)) {
        snprintf(err, errlen, "%s: \"routes\" must be an array", path);
        goto out;
    }
    t = calloc(1, sizeof *t);
    if (!t) goto oom;
    t->refs = 1;
    t->routes = calloc(json_array_size(arr) + 1, sizeof *t->routes);
    if (!t->routes) goto oom;
    json_array_foreach(arr, i, v)
    {
        char msg[200];
        t->n++;
        if (routes_parse_route(&t->routes[i], v, def_charge, default_timeout_ms, def_rate, def_idem,
                               msg, sizeof msg) != 0) {
            snprintf(err, errlen, "%s: route #%zu: %s", path, i, msg);
            goto out;
        }
    }
    *out = t;
    t = NULL;
    rc = 0;
    goto out;
oom:
    snprintf(err, errlen, "out of memory");
out:
    routes_free(t);
    json_decref(root);
    return rc;
}

int routes_load(const char *path, int64_t default_timeout_ms, route_table **out, char *err,
                size_t errlen)
{
    json_error_t jerr;
    return routes_from_json(json_load_file(path, 0, &jerr), &jerr, path, default_timeout_ms, out,
                            err, errlen);
}

int routes_load_buffer(const char *buf, size_t len, const char *name, int64_t default_timeout_ms,
                       route_table **out, char *err, size_t errlen)
{
    json_error_t jerr;
    return routes_from_json(json_loadb(buf, len, 0, &jerr), &jerr, name, default_timeout_ms, out,
                            err, errlen);
}

static int routes_match_one(const route *r, const char *path)
{
    const char *p = path;
    for (size_t i = 0; i < r->nsegs; i++) {
        const char *seg = r->segs[i];
        const char *start;
        size_t n;
        if (*p != '/') return 0;
        if (strcmp(seg, "**") == 0) return 1;
        start = ++p;
        while (*p && *p != '/')
            p++;
        n = (size_t)(p - start);
        if (strcmp(seg, "*") == 0) {
            if (n == 0) return 0;
        } else if (strlen(seg) != n || memcmp(seg, start, n) != 0) {
            return 0;
        }
    }
    return *p == '\0';
}

uint64_t routes_id_hash(const char *id, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)id[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

const route *routes_match(const route_table *t, const char *method, const char *path)
{
    for (size_t i = 0; i < t->n; i++) {
        const route *r = &t->routes[i];
        if (strcmp(r->method, method) == 0 && routes_match_one(r, path)) return r;
    }
    return NULL;
}

static int routes_hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* 1 if the decoded path OUT[0..N) holds something an upstream could decode
 * once more, or decode leniently, into another path than the one matched
 * and billed here. Checked on the decoded bytes, not on the raw escapes:
 * "%25%32%65" is "%2e" once decoded just as "%252e" is. */
static int routes_reinterpretable(const unsigned char *out, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        unsigned b = out[k], nx = k + 1 < n ? out[k + 1] : 0;
        int cont = nx >= 0x80 && nx <= 0xbf;
        /* Double encoding: a decoded '%' that starts an escape. A '%' that
         * is data ("100%25") is followed by anything but two hex digits. */
        if (b == '%' && k + 2 < n && routes_hexval((char)out[k + 1]) >= 0 &&
            routes_hexval((char)out[k + 2]) >= 0)
            return 1;
        /* Overlong UTF-8 ("%c0%ae" is '.' to a lenient decoder, so
         * "%c0%ae%c0%ae" is ".."), and the 5- and 6-byte forms of old
         * decoders. Other bytes pass: the path is not required to be UTF-8. */
        if (((b == 0xc0 || b == 0xc1 || b >= 0xf8) && cont) ||
            (b == 0xe0 && nx >= 0x80 && nx <= 0x9f) || (b == 0xf0 && nx >= 0x80 && nx <= 0x8f))
            return 1;
    }
    return 0;
}

int routes_normalise(const char *raw, size_t len, char *out, size_t outlen)
{
    size_t o = 0;
    if (len == 0 || raw[0] != '/' || len >= outlen) return -1;
    for (size_t i = 0; i < len; i++) {
        char c = raw[i];
        if (c == '%') {
            int hi, lo;
            if (i + 2 >= len) return -1;
            hi = routes_hexval(raw[i + 1]);
            lo = routes_hexval(raw[i + 2]);
            if (hi < 0 || lo < 0) return -1;
            c = (char)(hi * 16 + lo);
            /* Encoded separators would let a path match one route and mean
             * another upstream; refuse rather than guess. Encoded control
             * bytes (%00-%1F, %7F) have no place in a path and become a
             * header injection upstream wherever a decoded path is echoed
             * into a header or a log line. */
            if (c == '/' || c == '\\' || (unsigned char)c < 0x20 || c == 0x7f) return -1;
            i += 2;
        } else if (c == '\\' || c == '\0') {
            return -1;
        }
        out[o++] = c;
    }
    out[o] = '\0';
    if (routes_reinterpretable((const unsigned char *)out, o)) return -1;
    /* Segment checks on the decoded form, so "%2e%2e" is caught as "..". */
    for (const char *p = out; *p;) {
        const char *s = ++p, *semi;
        size_t n, m;
        while (*p && *p != '/')
            p++;
        n = (size_t)(p - s);
        if (n == 0 && *p == '/') return -1; /* "//" */
        if ((n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.')) return -1;
        /* Servlet containers (Tomcat, Jetty) drop a segment's ";params"
         * before resolving dot segments: to them "..;x" is "..", and ";x"
         * an empty segment. A wildcard here would match what they read as
         * another path. */
        semi = memchr(s, ';', n);
        m = semi ? (size_t)(semi - s) : n;
        if (semi && (m == 0 || (m == 1 && s[0] == '.') || (m == 2 && s[0] == '.' && s[1] == '.')))
            return -1;
    }
    return 0;
}

int routes_billable(const route *r, long status)
{
    long cls = status / 100;
    return cls >= 1 && cls <= 5 && (r->charge_on & (1u << cls)) != 0;
}
