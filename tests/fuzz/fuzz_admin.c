/* fuzz_admin.c: the admin API's JSON bodies (billing/api.c: api_body_parse,
 * api_body_account, api_body_credit, what the POST /v1/accounts, .../topups
 * and .../adjustments handlers run before they touch anything; creating a
 * key takes no body).
 *
 * Properties: a body that passes holds what the handler then relies on:
 * a name of 1..200 characters without control bytes; a top-up amount in
 * [1, 10^12] with a reference; an adjustment amount non-zero within
 * +-10^12 with a reason of 1..500 characters; references of 1..200. A
 * refusal has a message. The verdict is a function of the JSON value, not
 * of its text: the same after the object is dumped and parsed again. */
#include "billing/api.h"
#include "tests/fuzz/fuzz.h"

#include <string.h>

#define MAX_AMOUNT 1000000000000LL

/* 1 if S is 1..MAX characters (UTF-8 lead bytes) without control bytes. */
static int text_ok(const char *s, size_t max)
{
    size_t chars = 0;
    if (!s || !*s) return 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p < 0x20 || *p == 0x7f) return 0;
        if ((*p & 0xc0) != 0x80) chars++;
    }
    return chars <= max;
}

/* The verdicts on BODY as a bit set (1 account, 2 top-up, 4 adjustment),
 * checking what each accepted one holds. */
static int verdicts(json_t *body)
{
    const char *name, *bad;
    api_credit_body c;
    int v = 0;

    bad = api_body_account(body, &name);
    if (!bad) {
        FUZZ_CHECK(text_ok(name, 200));
        FUZZ_CHECK(strlen(name) == json_string_length(json_object_get(body, "name")));
        v |= 1;
    } else {
        FUZZ_CHECK(bad[0]);
    }
    bad = api_body_credit(body, 1, &c);
    if (!bad) {
        FUZZ_CHECK(c.amount >= 1 && c.amount <= MAX_AMOUNT);
        FUZZ_CHECK(text_ok(c.reference, 200) && c.reason == NULL);
        v |= 2;
    } else {
        FUZZ_CHECK(bad[0]);
    }
    bad = api_body_credit(body, 0, &c);
    if (!bad) {
        FUZZ_CHECK(c.amount != 0 && c.amount <= MAX_AMOUNT && c.amount >= -MAX_AMOUNT);
        FUZZ_CHECK(text_ok(c.reason, 500));
        FUZZ_CHECK(c.reference == NULL || text_ok(c.reference, 200));
        v |= 4;
    } else {
        FUZZ_CHECK(bad[0]);
    }
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char msg[256];
    json_t *body = api_body_parse((const char *)data, size, msg, sizeof msg), *again;
    char *text;
    int v;

    if (!body) {
        FUZZ_CHECK(msg[0]);
        return 0;
    }
    FUZZ_CHECK(json_is_object(body));
    v = verdicts(body);
    text = json_dumps(body, JSON_COMPACT);
    FUZZ_CHECK(text != NULL);
    again = api_body_parse(text, strlen(text), msg, sizeof msg);
    FUZZ_CHECK(again != NULL);
    FUZZ_CHECK(verdicts(again) == v);
    json_decref(again);
    free(text);
    json_decref(body);
    return 0;
}
