/* test_forward.c: the header trust boundary (gateway/forward.c) on header
 * lists: which client headers reach the upstream (every spelling of the
 * ones the gateway sets or vouches for is dropped: case, '-' or '_'), the
 * headers the gateway adds (X-Forwarded-For joined in order with the peer
 * last, also at the parser's bound, X-Real-IP, X-Account-Id, X-Request-Id),
 * Connection-named headers, and which upstream answer headers may reach
 * the client. The request is built by the real proxy.c
 * (proxy_call_add_header); the server's accessors are stood in for by the
 * three functions below, over a list this file owns. Needs no service.
 * Exit 0 when every check holds. */
#include "gateway/forward.h"
#include "gateway/http1req.h"
#include "tests/unit/check.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the server's accessors, over a fixed list ------------------------- */

static const char *const *t_hdrs; /* name, value, name, value, ..., NULL */
static struct sockaddr_storage t_peer;

size_t server_header_count(const server_conn *c)
{
    size_t n = 0;
    while (t_hdrs[2 * n])
        n++;
    return n;
}

void server_header_at(const server_conn *c, size_t i, const char **name, const char **value)
{
    *name = t_hdrs[2 * i];
    *value = t_hdrs[2 * i + 1];
}

const struct sockaddr *server_peer(const server_conn *c)
{
    return (const struct sockaddr *)&t_peer;
}

static void peer4(const char *ip)
{
    struct sockaddr_in *sa = (struct sockaddr_in *)&t_peer;
    memset(&t_peer, 0, sizeof t_peer);
    sa->sin_family = AF_INET;
    inet_pton(AF_INET, ip, &sa->sin_addr);
}

static void peer6(const char *ip)
{
    struct sockaddr_in6 *sa = (struct sockaddr_in6 *)&t_peer;
    memset(&t_peer, 0, sizeof t_peer);
    sa->sin6_family = AF_INET6;
    inet_pton(AF_INET6, ip, &sa->sin6_addr);
}

/* Runs forward_headers over HDRS: its result, the header lines written
 * ("Name: value\r\n"...) in OUT. */
static int forward(const char *const *hdrs, char *out, size_t outlen)
{
    proxy_call call;
    int rc;
    memset(&call, 0, sizeof call);
    t_hdrs = hdrs;
    /* The test links its own server_header* stubs, which ignore the
     * connection: any non-NULL stand-in will do. */
    rc = forward_headers((server_conn *)&t_hdrs, &call, 42, "0123456789abcdef0123456789abcdef");
    snprintf(out, outlen, "%.*s", (int)call.req_hdrs.len, call.req_hdrs.p ? call.req_hdrs.p : "");
    proxy_call_clear(&call);
    return rc;
}

/* The value of header line NAME in OUT (exact name), or NULL; *COUNT how
 * many lines start with NAME ignoring case. */
static const char *line_of(const char *out, const char *name, int *count, char *val, size_t vlen)
{
    const char *found = NULL;
    size_t nl = strlen(name);
    *count = 0;
    for (const char *p = out; *p;) {
        const char *e = strstr(p, "\r\n");
        if (!e) break;
        if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            (*count)++;
            snprintf(val, vlen, "%.*s", (int)(e - p - nl - 2), p + nl + 2);
            found = val;
        }
        p = e + 2;
    }
    return found;
}

static void test_dropped_in_any_spelling(void)
{
    static const char *const hdrs[] = {
        "X-Account-Id", "1", "X_Account_Id", "2", "x-account_id", "3", "X-ACCOUNT-ID", "4",
        "X-Request-Id", "r", "X_Request_Id", "r", "X-Points-Charged", "0", "X_Points_Remaining",
        "9", "x-points-bonus", "1", "X-Billing-Plan", "free", "X_BILLING_plan", "free", "X-Real-IP",
        "6.6.6.6", "X_Real_Ip", "6.6.6.6", "Forwarded", "for=6.6.6.6", "X_Forwarded_For", "6.6.6.6",
        "X-Forwarded_For", "6.6.6.6", "X-Forwarded-Host", "evil", "X-Forwarded-Proto", "https",
        "True-Client-IP", "6.6.6.6", "X-HTTP-Method-Override", "POST", "X_Original_URL", "/admin",
        "Authorization", "Bearer k", "X_Api_Key", "k", "Content_Length", "5", "Transfer_Encoding",
        "chunked", "Host", "h", "Expect", "100-continue", "Keep-Alive", "timeout=5", "TE",
        "trailers", "Upgrade", "h2c", "Proxy-Authorization", "x",
        /* passed on */
        "X-Custom", "kept", "X_Custom_Underscore", "kept", "X-Pointsless", "kept", "X-Forwarded",
        "kept", NULL};
    static const char *const kept[] = {"X-Custom: kept\r\n", "X_Custom_Underscore: kept\r\n",
                                       "X-Pointsless: kept\r\n", "X-Forwarded: kept\r\n"};
    char out[4096], v[256];
    int n;
    peer4("192.0.2.7");
    CHECK(forward(hdrs, out, sizeof out) == 0);
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++)
        CHECK(strstr(out, kept[i]) != NULL);
    CHECK(strstr(out, "6.6.6.6") == NULL && strstr(out, "evil") == NULL);
    CHECK(strstr(out, "free") == NULL && strstr(out, "/admin") == NULL);
    CHECK(strstr(out, "Bearer") == NULL && strstr(out, ": k\r\n") == NULL);
    CHECK(strstr(out, "chunked") == NULL && strstr(out, "h2c") == NULL);
    /* Exactly the lines the gateway writes, and the kept ones. */
    CHECK(line_of(out, "X-Account-Id", &n, v, sizeof v) && n == 1 && strcmp(v, "42") == 0);
    CHECK(line_of(out, "X-Request-Id", &n, v, sizeof v) && n == 1 &&
          strcmp(v, "0123456789abcdef0123456789abcdef") == 0);
    CHECK(line_of(out, "X-Forwarded-For", &n, v, sizeof v) && n == 1 &&
          strcmp(v, "192.0.2.7") == 0);
    CHECK(line_of(out, "X-Real-IP", &n, v, sizeof v) && n == 1 && strcmp(v, "192.0.2.7") == 0);
    {
        int lines = 0;
        for (const char *p = out; (p = strstr(p, "\r\n")) != NULL; p += 2)
            lines++;
        CHECK(lines == 4 + 4);
    }
}

/* Review r2: servers that map header names to variables map more than '-'
 * to '_' (lighttpd's CGI and FastCGI map every byte that is not a letter
 * or digit): "X.Account.Id" is X-Account-Id there. */
static void test_dropped_other_punctuation(void)
{
    static const char *const hdrs[] = {
        "X.Account.Id", "6", "X~Account~Id", "6", "X+Request+Id", "6", "x.real.ip", "6.6.6.6",
        "X|Forwarded|Host", "evil", "X.Forwarded.For", "6.6.6.6", "X.Points.Charged", "6",
        "X*Billing*Plan", "free", "X'Api'Key", "k", "Content.Length", "5", "Transfer!Encoding",
        "chunked", "X`Http`Method`Override", "POST",
        /* address claims other frameworks read before X-Forwarded-For */
        "Client-IP", "6.6.6.6", "CLIENT_IP", "6.6.6.6", "Fastly-Client-IP", "6.6.6.6",
        "X-Originating-IP", "6.6.6.6", "X-Remote-IP", "6.6.6.6", "X_Remote_Addr", "6.6.6.6",
        /* passed on */
        "X.Custom", "kept", NULL};
    char out[4096], v[256];
    int n;
    peer4("192.0.2.8");
    CHECK(forward(hdrs, out, sizeof out) == 0);
    CHECK(strstr(out, "X.Custom: kept\r\n") != NULL);
    CHECK(strstr(out, "6.6.6.6") == NULL && strstr(out, "evil") == NULL);
    CHECK(strstr(out, ": 6\r\n") == NULL && strstr(out, "free") == NULL);
    CHECK(strstr(out, ": k\r\n") == NULL && strstr(out, "chunked") == NULL);
    CHECK(strstr(out, "POST") == NULL && strstr(out, ": 5\r\n") == NULL);
    CHECK(line_of(out, "X-Forwarded-For", &n, v, sizeof v) && n == 1 &&
          strcmp(v, "192.0.2.8") == 0);
    CHECK(!forward_response_header("X.Points.Charged"));
    CHECK(!forward_response_header("x~request~id"));
    CHECK(forward_response_header("X.Custom"));
}

static void test_xff(void)
{
    char out[8192], v[4096];
    int n;
    /* Several headers: one list, in order; empty ones skipped; the peer last. */
    {
        static const char *const hdrs[] = {
            "X-Forwarded-For", "10.0.0.1, 10.0.0.2", "X-A", "1", "x-forwarded-for", "",
            "X-FORWARDED-FOR", "10.0.0.3",           NULL};
        peer6("2001:db8::1");
        CHECK(forward(hdrs, out, sizeof out) == 0);
        CHECK(line_of(out, "X-Forwarded-For", &n, v, sizeof v) && n == 1 &&
              strcmp(v, "10.0.0.1, 10.0.0.2, 10.0.0.3, 2001:db8::1") == 0);
        CHECK(line_of(out, "X-Real-IP", &n, v, sizeof v) && strcmp(v, "2001:db8::1") == 0);
    }
    /* The case (1,100 bytes), and the parser's bound exactly, with
     * the longest peer: the peer is always last. */
    {
        static char big[HTTP1REQ_XFF_MAX + 1];
        static const char *hdrs[] = {"X-Forwarded-For", big, NULL};
        const char *peer = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        size_t sizes[] = {1100, HTTP1REQ_XFF_MAX};
        for (size_t i = 0; i < 2; i++) {
            size_t len;
            memset(big, '7', sizes[i]);
            big[sizes[i]] = '\0';
            peer6(peer);
            CHECK(forward(hdrs, out, sizeof out) == 0);
            CHECK(line_of(out, "X-Forwarded-For", &n, v, sizeof v) && n == 1);
            len = strlen(v);
            CHECK(len == sizes[i] + 2 + strlen(peer));
            CHECK(strcmp(v + len - strlen(peer) - 2, ", ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff") ==
                  0);
        }
        /* Past it (the parser answers 431 first): refused, never cut. */
        {
            static char over[HTTP1REQ_XFF_MAX + 64];
            static const char *hdrs2[] = {"X-Forwarded-For", over, NULL};
            memset(over, '8', sizeof over - 1);
            CHECK(forward(hdrs2, out, sizeof out) == -1);
        }
    }
}

static void test_connection_named(void)
{
    static const char *const hdrs[] = {
        "Connection", "X-Hop, keep-alive", "X-Hop", "1",      "connection",
        "x-other",    "X-Other",           "2",     "X-Stay", "3",
        NULL};
    char out[4096];
    peer4("127.0.0.1");
    CHECK(forward(hdrs, out, sizeof out) == 0);
    CHECK(strstr(out, "X-Hop") == NULL && strstr(out, "X-Other") == NULL);
    CHECK(strstr(out, "onnection") == NULL);
    CHECK(strstr(out, "X-Stay: 3\r\n") != NULL);
}

static void test_answer_headers(void)
{
    static const char *const dropped[] = {
        "X-Points-Charged",   "x-points-charged", "X_Points_Charged", "X-Points-Remaining",
        "X_POINTS_REMAINING", "X-Points-Bonus",   "X-Billing-Plan",   "x_billing_x",
        "X-Request-Id",       "X_Request_Id",     "x-request_id",
    };
    static const char *const kept[] = {"Content-Type",  "X-Account-Id",  "X-Points", "X-Pointsx",
                                       "X-Request-Ids", "X-Usage-Units", "ETag"};
    for (size_t i = 0; i < sizeof dropped / sizeof dropped[0]; i++)
        if (forward_response_header(dropped[i])) {
            fprintf(stderr, "answer header passed: %s\n", dropped[i]);
            failures++;
        }
    for (size_t i = 0; i < sizeof kept / sizeof kept[0]; i++)
        if (!forward_response_header(kept[i])) {
            fprintf(stderr, "answer header dropped: %s\n", kept[i]);
            failures++;
        }
}

int main(void)
{
    test_dropped_in_any_spelling();
    test_dropped_other_punctuation();
    test_xff();
    test_connection_named();
    test_answer_headers();
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("forward: all checks passed\n");
    return 0;
}
