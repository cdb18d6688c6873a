/* test_routes.c: request path normalisation (gateway/routes.c,
 * routes_normalise) on byte strings: what is decoded, and what is refused
 * before anything is matched, held or proxied: not absolute, "." and ".."
 * (also encoded), "//", encoded '/' and '\', bad escapes, percent-encoded
 * control bytes (%00-%1F, %7F: a CR LF decoded upstream is a header
 * injection) and double encoding (%25 followed by two hex digits: an
 * upstream that decodes twice would see another path). Needs no service.
 * Exit 0 when every check holds. */
#include "gateway/routes.h"
#include "tests/unit/check.h"

#include <stdio.h>
#include <string.h>

static int norm(const char *raw, char *out, size_t outlen)
{
    return routes_normalise(raw, strlen(raw), out, outlen);
}

static void test_decoded(void)
{
    static const struct {
        const char *raw, *want;
    } good[] = {
        {"/", "/"},
        {"/v1/devices/d1", "/v1/devices/d1"},
        {"/v1/devices/%41b%7e", "/v1/devices/Ab~"},
        {"/v1/devices/a%20b", "/v1/devices/a b"},
        {"/v1/devices/100%25", "/v1/devices/100%"}, /* a '%' that is data */
        {"/v1/devices/a%25zz", "/v1/devices/a%zz"}, /* not followed by two hex digits */
        {"/v1/devices/a%25z1", "/v1/devices/a%z1"},
        {"/v1/devices/a%251", "/v1/devices/a%1"},       /* one hex digit, at the end */
        {"/v1/devices/%C3%A9", "/v1/devices/\xc3\xa9"}, /* UTF-8 passes */
        {"/v1/devices/...", "/v1/devices/..."},
        {"/v1/devices/a.b", "/v1/devices/a.b"},
        {"/v1/devices/", "/v1/devices/"},
        /* review r2: what the new refusals must leave alone */
        {"/v1/devices/a%25%32", "/v1/devices/a%2"},   /* one hex digit after the '%' */
        {"/v1/devices/d1;v=2", "/v1/devices/d1;v=2"}, /* a path parameter */
        {"/v1/devices/a;", "/v1/devices/a;"},
        {"/v1/devices/...;x", "/v1/devices/...;x"},
        {"/v1/devices/%E0%A0%80", "/v1/devices/\xe0\xa0\x80"},        /* U+0800, shortest */
        {"/v1/devices/%F0%90%80%80", "/v1/devices/\xf0\x90\x80\x80"}, /* U+10000 */
        {"/v1/devices/%C2%80", "/v1/devices/\xc2\x80"},
        {"/v1/devices/a%C0", "/v1/devices/a\xc0"}, /* a lone lead byte: not overlong */
    };
    char out[256];
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        if (norm(good[i].raw, out, sizeof out) != 0 || strcmp(out, good[i].want) != 0) {
            fprintf(stderr, "normalise %s: got %s\n", good[i].raw, out);
            failures++;
        }
    }
}

static void test_refused(void)
{
    static const char *const bad[] = {
        "",
        "v1/devices",
        "*",
        "http://h/v1",
        /* dot segments, empty segments */
        "/v1/devices/../x",
        "/v1/./devices",
        "/..",
        "/.",
        "//v1",
        "/v1//devices",
        "/v1/devices/%2e%2e",
        "/v1/devices/%2E",
        "/v1/devices/.%2e/x",
        /* encoded separators */
        "/v1/devices/a%2fb",
        "/v1/devices/a%2Fb",
        "/v1/devices/a%5cb",
        "/v1/devices/a\\b",
        /* bad escapes */
        "/v1/devices/%zz",
        "/v1/devices/%4",
        "/v1/devices/%",
        "/v1/devices/%g1",
        /* encoded control bytes: the case first */
        "/v1/devices/ab%0d%0aX-Evil:%201",
        "/v1/devices/a%0D",
        "/v1/devices/a%0a",
        "/v1/devices/a%00",
        "/v1/devices/a%01",
        "/v1/devices/a%09",
        "/v1/devices/a%1f",
        "/v1/devices/a%1F",
        "/v1/devices/a%7f",
        "/v1/devices/a%7F",
        /* double encoding */
        "/v1/devices/%252e%252e",
        "/v1/devices/%252E",
        "/v1/devices/a%252fb",
        "/v1/devices/a%2541",
        "/v1/devices/a%2500",
        "/v1/devices/a%250d%250a",
        "/v1%2530/devices",
        "/v1/devices/%25aa",
        /* review r2: double encoding spelled with encoded hex digits; the
         * raw escapes differ, the decoded "%2e" is the same */
        "/v1/devices/%25%32%65%25%32%65",
        "/v1/devices/%25%32e",
        "/v1/devices/%252%65",
        "/v1/devices/a%25%32%66b",
        "/v1/devices/a%25%30%30",
        /* overlong UTF-8: '.', '/' and '\\' to a lenient decoder */
        "/v1/devices/%c0%ae%c0%ae",
        "/v1/devices/%C0%AE",
        "/v1/devices/a%c0%afb",
        "/v1/devices/a%c1%9cb",
        "/v1/devices/%e0%80%ae",
        "/v1/devices/%e0%9f%bf",
        "/v1/devices/%f0%80%80%ae",
        "/v1/devices/%f0%8f%bf%bf",
        "/v1/devices/%f8%80%80%80%ae",
        "/v1/devices/%fc%80%80%80%80%ae",
        /* dot and empty segments behind a path parameter (servlet containers
         * drop ";..." first) */
        "/v1/devices/..;/x",
        "/v1/devices/..;x/commands",
        "/v1/devices/.;/x",
        "/v1/devices/;/commands",
        "/v1/devices/;jsessionid=1",
        "/v1/devices/%2e%2e;/x",
        "/v1/devices/%2e%2e%3b/x",
        "/v1/devices/..%3Bx",
        "/..;",
    };
    char out[256];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (norm(bad[i], out, sizeof out) != -1) {
            fprintf(stderr, "normalise accepted: %s\n", bad[i]);
            failures++;
        }
    }
    /* A raw NUL inside the given length. */
    CHECK(routes_normalise("/a\0b", 4, out, sizeof out) == -1);
    /* Every encoded byte: control bytes refused, the rest decoded. */
    for (int c = 0; c < 256; c++) {
        char raw[16];
        int rc;
        snprintf(raw, sizeof raw, "/a%%%02X", c);
        rc = norm(raw, out, sizeof out);
        if (c < 0x20 || c == 0x7f || c == '/' || c == '\\')
            CHECK(rc == -1);
        else
            CHECK(rc == 0 && (unsigned char)out[2] == c && out[3] == '\0');
    }
    /* OUT too small for the path. */
    CHECK(routes_normalise("/abc", 4, out, 4) == -1);
}

/* Route ids travel into holds, outbox records, logs and CSV reports: only
 * printable ASCII without the records' separators (found by fuzz_routesfile:
 * "a\nb\u0001" loaded). */
static int load_id(const char *id_json)
{
    char buf[512], err[256];
    route_table *t = NULL;
    int rc;
    snprintf(buf, sizeof buf,
             "{\"routes\":[{\"id\":%s,\"method\":\"GET\",\"path\":\"/a\",\"price\":1}]}", id_json);
    rc = routes_load_buffer(buf, strlen(buf), "test", 1000, &t, err, sizeof err);
    if (t) routes_unref(t);
    return rc;
}

static void test_route_ids(void)
{
    CHECK(load_id("\"device.read\"") == 0);
    CHECK(load_id("\"dev-1:cmd_x\"") == 0);
    CHECK(load_id("\"a\\nb\\u0001\"") != 0);
    CHECK(load_id("\"a b\"") != 0);
    CHECK(load_id("\"a|b\"") != 0);
    CHECK(load_id("\"a,b\"") != 0);
    CHECK(load_id("\"a\\\"b\"") != 0);
    CHECK(load_id("\"\\u00e9\"") != 0);
    CHECK(load_id("\"_guard\"") != 0);
    CHECK(load_id("\"~lease\"") != 0);
    CHECK(load_id("\"\"") != 0);
}

/* "idempotency" per route, with the file's default: optional unless said. */
static void test_idempotency_option(void)
{
    const char *ok = "{\"idempotency\":\"required\",\"routes\":["
                     "{\"id\":\"a\",\"method\":\"POST\",\"path\":\"/a\",\"price\":1},"
                     "{\"id\":\"b\",\"method\":\"POST\",\"path\":\"/b\",\"price\":1,"
                     "\"idempotency\":\"off\"},"
                     "{\"id\":\"c\",\"method\":\"POST\",\"path\":\"/c\",\"price\":1,"
                     "\"idempotency\":\"optional\"}]}";
    const char *bad[] = {"{\"routes\":[{\"id\":\"a\",\"method\":\"POST\",\"path\":\"/a\","
                         "\"price\":1,\"idempotency\":\"on\"}]}",
                         "{\"routes\":[{\"id\":\"a\",\"method\":\"POST\",\"path\":\"/a\","
                         "\"price\":1,\"idempotency\":true}]}",
                         "{\"idempotency\":1,\"routes\":[]}"};
    char err[256];
    route_table *t = NULL;
    CHECK(routes_load_buffer(ok, strlen(ok), "test", 1000, &t, err, sizeof err) == 0);
    if (t) {
        CHECK(t->routes[0].idempotency == ROUTES_IDEM_REQUIRED);
        CHECK(t->routes[1].idempotency == ROUTES_IDEM_OFF);
        CHECK(t->routes[2].idempotency == ROUTES_IDEM_OPTIONAL);
        routes_unref(t);
    }
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        t = NULL;
        CHECK(routes_load_buffer(bad[i], strlen(bad[i]), "test", 1000, &t, err, sizeof err) != 0);
        CHECK(t == NULL);
        if (t) routes_unref(t);
    }
    t = NULL;
    CHECK(routes_load_buffer("{\"routes\":[{\"id\":\"a\",\"method\":\"POST\",\"path\":\"/a\","
                             "\"price\":1}]}",
                             strlen("{\"routes\":[{\"id\":\"a\",\"method\":\"POST\",\"path\":"
                                    "\"/a\",\"price\":1}]}"),
                             "test", 1000, &t, err, sizeof err) == 0);
    if (t) {
        CHECK(t->routes[0].idempotency == ROUTES_IDEM_OPTIONAL);
        routes_unref(t);
    }
}

int main(void)
{
    test_decoded();
    test_refused();
    test_route_ids();
    test_idempotency_option();
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("routes: all checks passed\n");
    return 0;
}
