/* test_idem.c: gateway/idem.c: the Idempotency-Key's syntax, the
 * fingerprint, and stored answers written and read back (including damaged
 * ones, which must never reach a client as headers). proxy_header_next and
 * forward_response_header are stubbed here: idem.c is tested alone. */
#include "gateway/idem.h"
#include "tests/unit/check.h"

#include <sodium.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

size_t proxy_header_next(const proxy_call *c, size_t off, const char **name, const char **value)
{
    if (off >= c->hdrs.len) return 0;
    *name = c->hdrs.p + off;
    *value = *name + strlen(*name) + 1;
    return (size_t)(*value - c->hdrs.p) + strlen(*value) + 1;
}

int forward_response_header(const char *name)
{
    return strcasecmp(name, "X-Request-Id") != 0 && strncasecmp(name, "X-Points-", 9) != 0;
}

static int key_ok(const char *v)
{
    unsigned char h[IDEM_HASH];
    return idem_key_hash(v, h) == 0;
}

static void test_keys(void)
{
    char k[300];
    unsigned char a[IDEM_HASH], b[IDEM_HASH];
    CHECK(key_ok("a"));
    CHECK(key_ok("8e03978e-40d5-43e8-bc93-6894a57f9324"));
    CHECK(key_ok("\"8e03978e\""));
    CHECK(key_ok("\"with space \\\" quote \\\\ backslash\""));
    CHECK(!key_ok(""));
    CHECK(!key_ok("\"\""));
    CHECK(!key_ok("a b"));
    CHECK(!key_ok("caf\xc3\xa9"));
    CHECK(!key_ok("a\tb"));
    CHECK(!key_ok("\"open"));
    CHECK(!key_ok("\"a\"b"));
    CHECK(!key_ok("\"\\n\""));
    memset(k, 'x', sizeof k);
    k[255] = '\0';
    CHECK(key_ok(k));
    k[255] = 'x';
    k[256] = '\0';
    CHECK(!key_ok(k));
    /* the sf-string and the bare token name the same key */
    CHECK(idem_key_hash("abc", a) == 0 && idem_key_hash("\"abc\"", b) == 0);
    CHECK(memcmp(a, b, sizeof a) == 0);
    CHECK(idem_key_hash("abd", b) == 0 && memcmp(a, b, sizeof a) != 0);
}

static void test_fingerprint(void)
{
    unsigned char f[4][IDEM_HASH];
    idem_fingerprint("POST", "/a", "x", 1, f[0]);
    idem_fingerprint("PATCH", "/a", "x", 1, f[1]);
    idem_fingerprint("POST", "/a?q", "x", 1, f[2]);
    idem_fingerprint("POST", "/a", "y", 1, f[3]);
    for (int i = 0; i < 4; i++)
        for (int j = i + 1; j < 4; j++)
            CHECK(memcmp(f[i], f[j], IDEM_HASH) != 0);
    /* the boundaries between the parts are fixed: "POST" "/ab" != "POS" "T/ab" */
    idem_fingerprint("POS", "T/a", "x", 1, f[1]);
    CHECK(memcmp(f[0], f[1], IDEM_HASH) != 0);
    idem_fingerprint("POST", "/a", "x", 1, f[1]);
    CHECK(memcmp(f[0], f[1], IDEM_HASH) == 0);
}

static void test_answers(void)
{
    static const char hdrs[] = "Content-Type\0application/json\0X-Request-Id\0up\0"
                               "X-Points-Charged\0999\0Idempotent-Replayed\0true\0ETag\0\"v1\"\0";
    static const char rid[] = "0123456789abcdef0123456789abcdef";
    unsigned char fp[IDEM_HASH];
    proxy_call c;
    char *m, body[100];
    size_t len, off = 0;
    int kept = -1, n = 0;
    idem_answer a;
    const char *name, *value, *ans;

    memset(&c, 0, sizeof c);
    memset(fp, 7, sizeof fp);
    memset(body, 'b', sizeof body);
    c.hdrs.p = (char *)hdrs;
    c.hdrs.len = sizeof hdrs - 1;
    c.status = 201;
    c.body.p = body;
    c.body.len = sizeof body;
    m = idem_marker_answer(fp, rid, &c, 100, &len, &kept);
    CHECK(m && kept == 1 && strncmp(m, "d|0707", 6) == 0);
    /* reserve.lua hands back what follows the rid's '|' */
    ans = m ? memchr(m + 2 + 64 + 1, '|', len - 67) : NULL;
    CHECK(ans != NULL);
    if (ans) {
        ans++;
        CHECK(idem_answer_parse(ans, len - (size_t)(ans - m), &a) == 0);
        CHECK(a.status == 201 && a.body_len == sizeof body && memcmp(a.body, body, 100) == 0);
        while ((off = idem_answer_header_next(&a, off, &name, &value)) != 0) {
            n++;
            CHECK(strcmp(name, "Content-Type") == 0 || strcmp(name, "ETag") == 0);
        }
        CHECK(n == 2);
    }
    free(m);
    /* over the body bound: the bare marker, with the status */
    m = idem_marker_answer(fp, rid, &c, 99, &len, &kept);
    CHECK(m && kept == 0 && len > 0);
    if (m) CHECK(strcmp(m + len - 6, "|201|t") == 0 && m[0] == 'n');
    free(m);
    /* damaged answers never parse */
    {
#define BAD(lit) CHECK(idem_answer_parse(lit, sizeof lit - 1, &a) != 0)
        BAD("20|0|");
        BAD("2001|0|");
        BAD("099|0|");
        BAD("600|0|");
        BAD("200|");
        BAD("200|5|abc");        /* head past the end */
        BAD("200|3|a\0b");       /* a value without its NUL */
        BAD("200|6|a\0b\r\n\0"); /* CR LF in a value: header splitting */
        BAD("200|4|\0b\0\0");    /* an empty name */
        BAD("200|4|a b\0");      /* a name that is not a token */
        BAD("200|2|a\0");        /* a name without a value */
#undef BAD
        CHECK(idem_answer_parse("200|4|a\0b\0body", 14, &a) == 0 && a.body_len == 4);
        CHECK(idem_answer_parse("204|0|", 6, &a) == 0 && a.body_len == 0 && a.head_len == 0);
    }
}

int main(void)
{
    if (sodium_init() < 0) return 1;
    test_keys();
    test_fingerprint();
    test_answers();
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("idem: all checks passed\n");
    return 0;
}
