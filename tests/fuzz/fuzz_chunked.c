/* fuzz_chunked.c: the chunked body decoder (gateway/http1.c, started by
 * http1_init_body as server.c does for a client's request body).
 *
 * Properties: the decoded body, the final state and the bytes consumed do
 * not depend on how the input arrives (all at once, or byte by byte into a
 * buffer of the unconsumed rest, each call on an exact-size copy); the body
 * never exceeds its bound; a DONE consumed no more than the input; the
 * decoder never reports HTTP1_HEADER or HTTP1_HEAD_DONE on a body. The first
 * input byte picks the bounds, so that both the body and the trailer bound
 * get hit. */
#include "gateway/http1.h"
#include "tests/fuzz/fuzz.h"
#include "tests/fuzz/transcript.h"

static uint64_t max_body;

static void check_event(const http1_parser *p, enum http1_ev e, const http1_event *ev)
{
    FUZZ_CHECK(e != HTTP1_HEADER && e != HTTP1_HEAD_DONE);
    FUZZ_CHECK(e != HTTP1_BODY || ev->len > 0);
    FUZZ_CHECK(p->body_bytes <= max_body);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    http1_parser a, b;
    transcript ta = {0}, tb = {0};
    size_t used_a, used_b, max_head;
    enum http1_ev ea, eb;

    if (size < 1) return 0;
    max_body = (data[0] & 1) ? 64 : 1u << 20;
    max_head = (data[0] & 2) ? 32 : 2048; /* server.c: SERVER_ROOM / 2 */
    data++;
    size--;
    http1_init_body(&a, HTTP1_CHUNKED, 0, max_head, max_body);
    http1_init_body(&b, HTTP1_CHUNKED, 0, max_head, max_body);
    ea = ts_run_whole(&a, (const char *)data, size, &ta, &used_a, check_event);
    eb = ts_run_bytewise(&b, (const char *)data, size, &tb, &used_b);
    FUZZ_CHECK(ea == eb);
    FUZZ_CHECK(ea == HTTP1_TOO_LARGE ? ts_prefix(&ta, &tb) : ts_same(&ta, &tb));
    FUZZ_CHECK(ta.body <= max_body);
    FUZZ_CHECK(used_a <= size);
    if (ea == HTTP1_DONE) FUZZ_CHECK(used_a == used_b);
    if (ea == HTTP1_MORE) FUZZ_CHECK(used_a == used_b);
    /* A final state repeats (http1.h). */
    {
        http1_event ev;
        size_t u = 0;
        if (ts_final(ea)) FUZZ_CHECK(http1_next(&a, "x", 1, &u, &ev) == ea && u == 0);
    }
    free(ta.b);
    free(tb.b);
    return 0;
}
