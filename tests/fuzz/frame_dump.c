/* frame_dump.c: the gateway's request framing as a filter, for the
 * differential test (tests/e2e/test_differential.py).
 *
 * Reads cases from stdin, each "<length>\n" and that many bytes (what one
 * client sent on one connection), and frames each the way gateway/server.c
 * does: the head found by http1req_head_end within the server's bound,
 * parsed by http1req_parse, the body taken by Content-Length or decoded by
 * http1.c's chunked decoder with the server's bounds, then the next
 * pipelined request while the connection stays open. Prints one JSON line
 * per case, every string in hex (the bytes are arbitrary):
 *   {"msgs":[{"m":..,"t":..,"ot":..,"v":minor,"ka":0|1,"h":[[name,value],..],"b":..}],
 *    "end":"clean"|"partial"|"closed"|"refused","status":N,"why":".."}
 * "closed": bytes after a request that ends the connection (ignored, as
 * the server does); "refused": the server answers STATUS and closes,
 * forwarding nothing of that request. */
#include "gateway/http1.h"
#include "gateway/http1req.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* server.c's bounds (SERVER_HEAD_MAX, SERVER_MAX_FIELDS, SERVER_ROOM / 2)
 * and MAX_BODY_BYTES' default (config.c). */
#define HEAD_MAX (16 * 1024)
#define MAX_FIELDS 128
#define TRAILER_MAX 2048
#define MAX_BODY (1 << 20)

static void hex(const char *s, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n; i++)
        printf("%02x", (unsigned char)s[i]);
    putchar('"');
}

/* The body of the request whose head ended at IN[0..): its length in the
 * input (*USED) and its bytes in *BODY (malloc'd, *BLEN); 0, 1 when the
 * input ends first, or the status of the refusal. */
static int frame_body(const http1req *h, const char *in, size_t len, size_t *used, char **body,
                      size_t *blen)
{
    http1_parser p;
    size_t off = 0;
    *body = NULL;
    *blen = 0;
    if (!h->chunked) {
        size_t need = h->content_length > 0 ? (size_t)h->content_length : 0;
        if (len < need) return 1;
        *body = malloc(need + 1);
        if (!*body) abort();
        memcpy(*body, in, need);
        *blen = need;
        *used = need;
        return 0;
    }
    http1_init_body(&p, HTTP1_CHUNKED, 0, TRAILER_MAX, MAX_BODY);
    *body = malloc(MAX_BODY);
    if (!*body) abort();
    for (;;) {
        http1_event ev;
        size_t u = 0;
        enum http1_ev e = http1_next(&p, in + off, len - off, &u, &ev);
        off += u;
        if (e == HTTP1_BODY) {
            memcpy(*body + *blen, ev.data, ev.len);
            *blen += ev.len;
            continue;
        }
        if (e == HTTP1_DONE) break;
        if (e == HTTP1_MORE) return 1;
        return e == HTTP1_TOO_LARGE ? 413 : 400;
    }
    *used = off;
    return 0;
}

static void frame_case(const char *in, size_t len)
{
    size_t off = 0;
    int first = 1;
    const char *end = "clean", *why = "";
    int status = 0;
    printf("{\"msgs\":[");
    while (off < len) {
        http1req_field fields[MAX_FIELDS];
        http1req h;
        size_t scan = 0, used = 0, blen;
        long e = http1req_head_end(in + off, len - off, HEAD_MAX, &scan);
        char *head, *body;
        int rc;
        if (e == 0) {
            /* Only line ends: the server waits for a request, as idle. */
            size_t i = off;
            while (i < len && (in[i] == '\r' || in[i] == '\n'))
                i++;
            if (i < len) end = "partial";
            break;
        }
        if (e < 0) {
            end = "refused", status = 431, why = "request head too large";
            break;
        }
        head = malloc((size_t)e);
        if (!head) abort();
        memcpy(head, in + off, (size_t)e);
        memset(&h, 0, sizeof h);
        h.fields = fields;
        h.max_fields = MAX_FIELDS;
        rc = http1req_parse(head, (size_t)e, &h);
        if (rc == 0 && h.content_length > MAX_BODY) rc = 413, h.error = "request body too large";
        if (rc != 0) {
            end = "refused", status = rc, why = h.error;
            free(head);
            break;
        }
        rc = frame_body(&h, in + off + (size_t)e, len - off - (size_t)e, &used, &body, &blen);
        if (rc != 0) {
            if (rc == 1)
                end = "partial";
            else
                end = "refused", status = rc, why = "malformed chunked body";
            free(head);
            free(body);
            break;
        }
        printf("%s{\"m\":", first ? "" : ",");
        first = 0;
        hex(head + h.method, h.method_len);
        /* The target as sent ("t", what llhttp reports) and as the gateway
         * routes it ("ot": an absolute-form one rewritten to origin-form). */
        {
            const char *rl = in + off, *sp1, *sp2;
            while (*rl == '\r' || *rl == '\n')
                rl++;
            sp1 = memchr(rl, ' ', (size_t)e);
            sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)e - (size_t)(sp1 + 1 - (in + off))) : NULL;
            printf(",\"t\":");
            if (sp1 && sp2)
                hex(sp1 + 1, (size_t)(sp2 - sp1 - 1));
            else
                hex("", 0);
        }
        printf(",\"ot\":");
        hex(head + h.target, h.target_len);
        printf(",\"v\":%d,\"ka\":%d,\"h\":[", h.minor, h.keep_alive);
        for (size_t i = 0; i < h.nfields; i++) {
            printf("%s[", i ? "," : "");
            hex(head + fields[i].name, fields[i].name_len);
            putchar(',');
            hex(head + fields[i].value, fields[i].value_len);
            putchar(']');
        }
        printf("],\"b\":");
        hex(body, blen);
        putchar('}');
        free(head);
        free(body);
        off += (size_t)e + used;
        if (!h.keep_alive) {
            if (off < len) end = "closed";
            break;
        }
    }
    printf("],\"end\":\"%s\",\"status\":%d,\"why\":", end, status);
    hex(why, strlen(why));
    printf("}\n");
}

int main(void)
{
    size_t n;
    while (scanf("%zu", &n) == 1) {
        char *buf;
        if (getchar() != '\n') return 2;
        buf = malloc(n ? n : 1);
        if (!buf || fread(buf, 1, n, stdin) != n) return 2;
        frame_case(buf, n);
        free(buf);
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
