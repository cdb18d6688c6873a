/* fuzz_http1resp.c: the upstream response parser (gateway/http1.c).
 *
 * Properties: what the parser reports (headers, the head's status and
 * framing, body bytes, the final state, and what the close of the
 * connection then means) does not depend on how the response arrives (all
 * at once, or byte by byte, each call on an exact-size copy); a reported
 * header is a token name and a trimmed value without control bytes; a
 * completed head has a final status (200..599) and a framing consistent
 * with its Content-Length; a body never exceeds its bound nor, with
 * Content-Length, that length; a bodiless answer (HEAD, 204, 304) reports
 * no body and is never kept alive; HTTP/1.0 is never kept alive. The
 * first input byte picks HEAD or not and the bounds. */
#include "gateway/http1.h"
#include "tests/fuzz/fuzz.h"
#include "tests/fuzz/transcript.h"

static uint64_t max_body;
static int head_done, is_head;

static void check_event(const http1_parser *p, enum http1_ev e, const http1_event *ev)
{
    FUZZ_CHECK(p->body_bytes <= max_body);
    if (e == HTTP1_HEADER) {
        FUZZ_CHECK(!head_done);
        FUZZ_CHECK(http1_token(ev->name, ev->name_len));
        FUZZ_CHECK(http1_text_ok(ev->value, ev->value_len));
        FUZZ_CHECK(ev->value_len == 0 ||
                   (ev->value[0] != ' ' && ev->value[0] != '\t' &&
                    ev->value[ev->value_len - 1] != ' ' && ev->value[ev->value_len - 1] != '\t'));
    } else if (e == HTTP1_HEAD_DONE) {
        head_done = 1;
        FUZZ_CHECK(p->status >= 200 && p->status <= 599);
        FUZZ_CHECK(p->keep_alive == 0 || p->minor >= 1);
        switch (p->framing) {
        case HTTP1_NONE:
            FUZZ_CHECK(p->keep_alive == 0 || p->content_length == 0);
            break;
        case HTTP1_LENGTH:
            FUZZ_CHECK(p->content_length > 0 && (uint64_t)p->content_length <= max_body);
            break;
        case HTTP1_CHUNKED:
            FUZZ_CHECK(p->content_length == -1);
            break;
        case HTTP1_CLOSE:
            FUZZ_CHECK(p->keep_alive == 0 && p->content_length == -1);
            break;
        }
        if (is_head || p->status == 204 || p->status == 304)
            FUZZ_CHECK(p->framing == HTTP1_NONE && p->keep_alive == 0);
    } else if (e == HTTP1_BODY) {
        FUZZ_CHECK(head_done && ev->len > 0);
        FUZZ_CHECK(p->framing != HTTP1_NONE);
        if (p->framing == HTTP1_LENGTH) FUZZ_CHECK(p->body_bytes <= (uint64_t)p->content_length);
    } else if (e == HTTP1_DONE) {
        FUZZ_CHECK(head_done);
        if (p->framing == HTTP1_LENGTH) FUZZ_CHECK(p->body_bytes == (uint64_t)p->content_length);
        if (p->framing == HTTP1_NONE) FUZZ_CHECK(p->body_bytes == 0);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    http1_parser a, b;
    transcript ta = {0}, tb = {0};
    size_t used_a, used_b, max_head;
    enum http1_ev ea, eb, fa, fb;

    if (size < 1) return 0;
    is_head = data[0] & 1;
    max_body = (data[0] & 2) ? 64 : 1u << 20;
    max_head = (data[0] & 4) ? 64 : 8192;
    data++;
    size--;
    head_done = 0;
    http1_init(&a, is_head, max_head, max_body);
    http1_init(&b, is_head, max_head, max_body);
    ea = ts_run_whole(&a, (const char *)data, size, &ta, &used_a, check_event);
    eb = ts_run_bytewise(&b, (const char *)data, size, &tb, &used_b);
    FUZZ_CHECK(ea == eb);
    FUZZ_CHECK(ea == HTTP1_TOO_LARGE ? ts_prefix(&ta, &tb) : ts_same(&ta, &tb));
    FUZZ_CHECK(used_a <= size);
    if (ea == HTTP1_DONE || ea == HTTP1_MORE) FUZZ_CHECK(used_a == used_b);
    /* The connection closes here: the same verdict both ways, and a final
     * state stays what it was. */
    fa = http1_eof(&a);
    fb = http1_eof(&b);
    FUZZ_CHECK(fa == fb);
    FUZZ_CHECK(fa == HTTP1_DONE || fa == HTTP1_MALFORMED || fa == HTTP1_TOO_LARGE);
    if (ts_final(ea)) FUZZ_CHECK(fa == ea);
    if (fa == HTTP1_DONE && ea == HTTP1_MORE) FUZZ_CHECK(a.framing == HTTP1_CLOSE);
    free(ta.b);
    free(tb.b);
    return 0;
}
