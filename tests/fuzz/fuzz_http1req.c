/* fuzz_http1req.c: the request-head parser (gateway/http1req.c).
 *
 * Properties: where the head ends does not depend on how the bytes arrive
 * (whole, or in three reads with the scan position kept); the end lies
 * within the input and the bound; a head that parses has its method, target
 * and fields inside the head, NUL-terminated in place, with the syntax the
 * parser promises (token method and names, printable target, values without
 * control bytes and trimmed), one framing at most (never Content-Length and
 * chunked), a Content-Length that equals its header's digits, exactly one
 * Host in HTTP/1.1, a host that is a valid authority, an absolute-form
 * target rewritten to origin-form, no fragment; a refusal has one of the
 * documented statuses and a
 * message. The head is parsed from an exact-size copy, so any read past it
 * is an ASan report. */
#include "gateway/http1.h"
#include "gateway/http1req.h"
#include "tests/fuzz/fuzz.h"

#include <string.h>

#define HEAD_MAX 4096 /* smaller than the server's 16 KiB: the bound gets hit */
#define NFIELDS 16    /* and so does the field bound (431) */

static int all_digits(const char *s, size_t n)
{
    if (n == 0) return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9') return 0;
    return 1;
}

static void check_parsed(const char *buf, size_t len, const http1req *h)
{
    size_t hosts = 0, cls = 0, tes = 0;
    FUZZ_CHECK(h->method + h->method_len < len && buf[h->method + h->method_len] == '\0');
    FUZZ_CHECK(http1_token(buf + h->method, h->method_len));
    FUZZ_CHECK(h->target + h->target_len < len && buf[h->target + h->target_len] == '\0');
    FUZZ_CHECK(h->target_len > 0 && http1_target_ok(buf + h->target, h->target_len));
    FUZZ_CHECK(!memchr(buf + h->target, '#', h->target_len));
    /* An absolute-form target was rewritten to origin-form, its authority
     * taking Host's place; a request's host is always a valid authority. */
    FUZZ_CHECK(!h->absolute || buf[h->target] == '/');
    FUZZ_CHECK(h->minor == 0 || h->host_len > 0);
    if (h->host_len > 0) {
        FUZZ_CHECK(h->host + h->host_len < len && buf[h->host + h->host_len] == '\0');
        FUZZ_CHECK(http1_authority_ok(buf + h->host, h->host_len));
        FUZZ_CHECK(!memchr(buf + h->host, '@', h->host_len) &&
                   !memchr(buf + h->host, ',', h->host_len));
    }
    FUZZ_CHECK(h->minor == 0 || h->minor == 1);
    FUZZ_CHECK(h->nfields <= NFIELDS);
    FUZZ_CHECK(!(h->chunked && h->content_length >= 0));
    FUZZ_CHECK(h->keep_alive == 0 || h->keep_alive == 1);
    FUZZ_CHECK(!h->expect_continue || h->minor == 1);
    for (size_t i = 0; i < h->nfields; i++) {
        const http1req_field *f = &h->fields[i];
        const char *v = buf + f->value;
        FUZZ_CHECK(f->name + f->name_len < len && buf[f->name + f->name_len] == '\0');
        FUZZ_CHECK(f->value + f->value_len < len && v[f->value_len] == '\0');
        FUZZ_CHECK(f->name > h->target); /* fields follow the request line */
        FUZZ_CHECK(http1_token(buf + f->name, f->name_len));
        FUZZ_CHECK(http1_text_ok(v, f->value_len));
        FUZZ_CHECK(f->value_len == 0 ||
                   (v[0] != ' ' && v[0] != '\t' && v[f->value_len - 1] != ' ' &&
                    v[f->value_len - 1] != '\t'));
        if (HTTP1_IS(buf + f->name, f->name_len, "host")) hosts++;
        if (HTTP1_IS(buf + f->name, f->name_len, "transfer-encoding")) tes++;
        if (HTTP1_IS(buf + f->name, f->name_len, "content-length")) {
            /* Every Content-Length field is plain digits of the one value. */
            cls++;
            FUZZ_CHECK(all_digits(v, f->value_len));
            FUZZ_CHECK(h->content_length == strtoll(v, NULL, 10));
        }
    }
    FUZZ_CHECK(h->minor == 0 || hosts == 1);
    FUZZ_CHECK((h->content_length >= 0) == (cls > 0));
    FUZZ_CHECK(!h->chunked || (tes > 0 && h->minor == 1 && cls == 0));
    FUZZ_CHECK(http1req_get(buf, h, "host") != NULL || h->minor == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *in = (const char *)data;
    size_t scan = 0, scan2 = 0, cuts[3] = {size / 3, 2 * size / 3, size};
    long end = http1req_head_end(in, size, HEAD_MAX, &scan), end2 = 0;
    http1req_field fields[NFIELDS];
    http1req h;
    char *head;
    int st;

    FUZZ_CHECK(end == -1 || (end >= 0 && (size_t)end <= size && end <= HEAD_MAX));
    FUZZ_CHECK(end != -1 || size >= HEAD_MAX);
    /* The same input in three reads, the scan position kept between them
     * (as server.c does): the same answer. */
    for (int i = 0; i < 3 && end2 == 0; i++)
        end2 = http1req_head_end(in, cuts[i], HEAD_MAX, &scan2);
    FUZZ_CHECK(end2 == end);
    if (end <= 0) return 0;

    head = malloc((size_t)end);
    if (!head) return 0;
    memcpy(head, in, (size_t)end);
    memset(&h, 0, sizeof h);
    h.fields = fields;
    h.max_fields = NFIELDS;
    st = http1req_parse(head, (size_t)end, &h);
    if (st == 0) {
        check_parsed(head, (size_t)end, &h);
    } else {
        FUZZ_CHECK(st == 400 || st == 417 || st == 431 || st == 501 || st == 505);
        FUZZ_CHECK(h.error && h.error[0] && h.error_code && h.error_code[0]);
    }
    free(head);
    return 0;
}
