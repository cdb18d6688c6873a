/* fuzz_routes.c: request path normalisation and route matching
 * (gateway/routes.c: routes_normalise, routes_match) over a fixed table.
 *
 * Input: the first byte picks the method, the rest is the raw path.
 * Properties of a path that normalises: it starts with '/', is no longer
 * than the raw one, and holds no "//", no "." or ".." segment (also not
 * before a ';'), no '\', no NUL, no control byte, no escape that a second
 * decoding would read ("%252e" -> "%2e"), no overlong UTF-8; the
 * route routes_match picks is the first one an independent matcher (written
 * here from the documented pattern rules) picks, and has the method asked
 * for. */
#include "gateway/http1.h"
#include "gateway/routes.h"
#include "tests/fuzz/fuzz.h"

#include <ctype.h>
#include <string.h>

static const char table_json[] =
    "{\"routes\":["
    "{\"id\":\"status\",\"method\":\"GET\",\"path\":\"/v1/devices/*/status\",\"price\":1},"
    "{\"id\":\"command\",\"method\":\"POST\",\"path\":\"/v1/devices/*/commands\",\"price\":5},"
    "{\"id\":\"exact\",\"method\":\"GET\",\"path\":\"/v1/devices\",\"price\":2},"
    "{\"id\":\"root\",\"method\":\"GET\",\"path\":\"/\",\"price\":1},"
    "{\"id\":\"files\",\"method\":\"GET\",\"path\":\"/v1/files/**\",\"price\":3},"
    "{\"id\":\"any\",\"method\":\"PUT\",\"path\":\"/**\",\"price\":4},"
    "{\"id\":\"two\",\"method\":\"DELETE\",\"path\":\"/v1/*/*\",\"hold\":9,"
    "\"unit_price\":1,\"units_header\":\"X-Units\"},"
    "{\"id\":\"dots\",\"method\":\"GET\",\"path\":\"/v1/a.b/c%2e\",\"price\":1}"
    "]}";

static const char *const methods[] = {"GET", "POST", "PUT", "DELETE", "get", "HEAD"};

static route_table *table;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char err[256];
    if (routes_load_buffer(table_json, sizeof table_json - 1, "table", 1000, &table, err,
                           sizeof err) != 0) {
        fprintf(stderr, "fuzz_routes: %s\n", err);
        abort();
    }
    return 0;
}

/* The path's I-th segment (after the I-th '/'): 1 with *S, *N; 0 if none. */
static int segment(const char *path, size_t i, const char **s, size_t *n)
{
    const char *p = path;
    for (size_t k = 0;; k++) {
        const char *e;
        if (*p != '/') return 0;
        p++;
        e = strchr(p, '/');
        if (!e) e = p + strlen(p);
        if (k == i) {
            *s = p;
            *n = (size_t)(e - p);
            return 1;
        }
        p = e;
    }
}

/* Pattern segments: a literal, "*" (one non-empty segment), "**" (last:
 * whatever follows its '/'). */
static int ref_match(const route *r, const char *path)
{
    const char *s;
    size_t n, i;
    for (i = 0; i < r->nsegs; i++) {
        const char *pat = r->segs[i];
        if (!segment(path, i, &s, &n)) return 0;
        if (strcmp(pat, "**") == 0) return 1;
        if (strcmp(pat, "*") == 0) {
            if (n == 0) return 0;
        } else if (strlen(pat) != n || memcmp(pat, s, n) != 0) {
            return 0;
        }
    }
    return !segment(path, i, &s, &n); /* no segment left over */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char out[ROUTES_PATH_MAX];
    const char *method, *raw;
    const route *got, *want = NULL;
    size_t len, olen;

    if (size < 1) return 0;
    method = methods[data[0] % (sizeof methods / sizeof methods[0])];
    raw = (const char *)data + 1;
    len = size - 1;
    /* Any bytes go in (no crash, no overread); the properties are those of
     * a target the server hands over: printable ASCII (http1_target_ok). */
    if (routes_normalise(raw, len, out, sizeof out) != 0 || !http1_target_ok(raw, len)) return 0;
    olen = strlen(out);
    FUZZ_CHECK(out[0] == '/');
    FUZZ_CHECK(olen <= len);
    FUZZ_CHECK(strstr(out, "//") == NULL);
    FUZZ_CHECK(strchr(out, '\\') == NULL);
    for (size_t i = 0; i < olen; i++) {
        unsigned char c = (unsigned char)out[i], nx = (unsigned char)out[i + 1];
        FUZZ_CHECK(c >= 0x20 && c != 0x7f);
        /* No escape left to decode again ("%252e"), no overlong UTF-8. */
        FUZZ_CHECK(!(c == '%' && isxdigit(nx) && isxdigit((unsigned char)out[i + 2])));
        FUZZ_CHECK(!((c == 0xc0 || c == 0xc1) && nx >= 0x80 && nx <= 0xbf));
    }
    {
        /* No empty, "." or ".." segment, also before a ';' ("..;x"). */
        const char *s;
        size_t n;
        for (size_t i = 0; segment(out, i, &s, &n); i++) {
            const char *semi = memchr(s, ';', n);
            size_t m = semi ? (size_t)(semi - s) : n;
            FUZZ_CHECK(!(n == 1 && s[0] == '.') && !(n == 2 && s[0] == '.' && s[1] == '.'));
            FUZZ_CHECK(!semi || !(m == 0 || (m == 1 && s[0] == '.') ||
                                  (m == 2 && s[0] == '.' && s[1] == '.')));
        }
    }
    got = routes_match(table, method, out);
    for (size_t i = 0; i < table->n && !want; i++)
        if (strcmp(table->routes[i].method, method) == 0 && ref_match(&table->routes[i], out))
            want = &table->routes[i];
    FUZZ_CHECK(got == want);
    FUZZ_CHECK(!got || strcmp(got->method, method) == 0);
    return 0;
}
