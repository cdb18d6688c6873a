/* test_redisurl.c: REDIS_URL (common/redisurl.c): hosts, ports and dbs
 * with their defaults, the ACL user and the default user's password,
 * percent-decoding, every malformed form refused with a reason that never
 * holds the password, and the redacted form log lines use. Needs no
 * service. Exit 0 when every check holds. */
#include "common/redisurl.h"
#include "tests/unit/check.h"

#include <string.h>

static redisurl u;
static char err[256];

static int parse(const char *url)
{
    err[0] = '\0';
    return redisurl_parse(url, &u, err, sizeof err);
}

/* URL is refused, with a reason that names WHY and does not show SECRET. */
static void refused(const char *url, const char *why, const char *secret)
{
    int rc = parse(url);
    CHECK(rc == -1);
    if (rc != -1) fprintf(stderr, "  accepted: %s\n", url);
    CHECK(err[0] != '\0');
    if (why && !strstr(err, why)) fprintf(stderr, "  %s: error '%s' lacks '%s'\n", url, err, why);
    CHECK(!why || strstr(err, why));
    CHECK(!secret || !strstr(err, secret));
    CHECK(u.password[0] == '\0'); /* wiped on failure */
}

static void redacted(const char *url, const char *want)
{
    char out[256];
    redisurl_redact(url, out, sizeof out);
    if (strcmp(out, want) != 0) fprintf(stderr, "  redact(%s) = %s, want %s\n", url, out, want);
    CHECK(strcmp(out, want) == 0);
}

int main(void)
{
    /* Plain, with the defaults. */
    CHECK(parse("redis://127.0.0.1:6380/3") == 0);
    CHECK(strcmp(u.host, "127.0.0.1") == 0 && u.port == 6380 && u.db == 3);
    CHECK(u.user[0] == '\0' && u.password[0] == '\0');
    CHECK(parse("redis://localhost") == 0);
    CHECK(strcmp(u.host, "localhost") == 0 && u.port == 6379 && u.db == 0);
    CHECK(parse("redis://redis:6379/") == 0 && u.db == 0);
    CHECK(parse("redis://redis/15") == 0 && u.port == 6379 && u.db == 15);
    CHECK(parse("redis://[::1]:7000/2") == 0);
    CHECK(strcmp(u.host, "::1") == 0 && u.port == 7000 && u.db == 2);
    CHECK(parse("redis://[::1]") == 0 && u.port == 6379);

    CHECK(!u.cluster && u.nseeds == 1 && u.seeds[0].port == 6379);

    /* A cluster by its seeds; the first is also host:port. */
    CHECK(parse("redis+cluster://127.0.0.1:7000") == 0);
    CHECK(u.cluster && u.nseeds == 1 && strcmp(u.host, "127.0.0.1") == 0 && u.port == 7000);
    CHECK(parse("redis+cluster://:pw@a:7000,b,[::1]:7002/") == 0);
    CHECK(u.cluster && u.nseeds == 3 && strcmp(u.password, "pw") == 0);
    CHECK(strcmp(u.seeds[0].host, "a") == 0 && u.seeds[0].port == 7000);
    CHECK(strcmp(u.seeds[1].host, "b") == 0 && u.seeds[1].port == 6379);
    CHECK(strcmp(u.seeds[2].host, "::1") == 0 && u.seeds[2].port == 7002);
    CHECK(strcmp(u.host, "a") == 0 && u.port == 7000 && u.db == 0);
    refused("redis+cluster://a:1,b:2/3", "no databases", NULL);
    refused("redis+cluster://a:1,,b:2", "empty", NULL);
    refused("redis+cluster://a:1,", "empty host after", NULL);
    refused("redis+cluster://:s3cret@a:1,b:x", "port", "s3cret");
    refused("redis://a:1,b:2", "redis+cluster://", NULL);
    refused("redis+cluster://h1,h2,h3,h4,h5,h6,h7,h8,h9,h10,h11,h12,h13,h14,h15,h16,h17", "16 seed",
            NULL);
    CHECK(parse("redis+cluster://h1,h2,h3,h4,h5,h6,h7,h8,h9,h10,h11,h12,h13,h14,h15,h16") == 0 &&
          u.nseeds == 16 && strcmp(u.seeds[15].host, "h16") == 0);

    /* The default user: AUTH password. */
    CHECK(parse("redis://:s3cret@127.0.0.1:6379/0") == 0);
    CHECK(u.user[0] == '\0' && strcmp(u.password, "s3cret") == 0);
    CHECK(strcmp(u.host, "127.0.0.1") == 0 && u.port == 6379);
    /* An ACL user: AUTH user password. */
    CHECK(parse("redis://pointgate-gateway:pw@redis:6379/1") == 0);
    CHECK(strcmp(u.user, "pointgate-gateway") == 0 && strcmp(u.password, "pw") == 0);
    CHECK(strcmp(u.host, "redis") == 0 && u.db == 1);
    /* Percent-decoding; a raw ':' belongs to the password. */
    CHECK(parse("redis://us%40er:p%40ss%3Aw%2Fo%25rd@h:1/0") == 0);
    CHECK(strcmp(u.user, "us@er") == 0 && strcmp(u.password, "p@ss:w/o%rd") == 0);
    CHECK(parse("redis://u:a:b@h") == 0 && strcmp(u.password, "a:b") == 0);
    CHECK(parse("redis://u:%7e%7E!$&'()*+,;=-._@h") == 0 &&
          strcmp(u.password, "~~!$&'()*+,;=-._") == 0);
    CHECK(parse("redis://u:%20x@h") == 0 && strcmp(u.password, " x") == 0);
    redisurl_wipe(&u);
    CHECK(u.password[0] == '\0');

    /* Refused, with the reason. */
    refused("http://127.0.0.1:6379", "expected redis://", NULL);
    refused("rediss://:pw@h:6379", "TLS", "pw");
    refused("", "expected redis://", NULL);
    refused(NULL, "expected redis://", NULL);
    refused("redis://", "host", NULL);
    refused("redis://:6379/0", "host", NULL);
    refused("redis://h:0/0", "port", NULL);
    refused("redis://h:65536/0", "port", NULL);
    refused("redis://h:12x/0", "port", NULL);
    refused("redis://h:/0", "port", NULL);
    refused("redis://h:6379/16", "db", NULL);
    refused("redis://h:6379/x", "db", NULL);
    refused("redis://h:6379/-1", "db", NULL);
    refused("redis://h:6379/0/1", "db", NULL);
    refused("redis://h:6379/0?timeout=1", "query", NULL);
    refused("redis://h b:6379", "host", NULL);
    refused("redis://[::1:6379", "IPv6", NULL);
    refused("redis://[::1]x:6379", "IPv6", NULL);
    refused("redis://hunter2@h:6379", "without ':'", "hunter2");
    refused("redis://user:@h:6379", "empty password", NULL);
    refused("redis://u:hun%zzter2@h", "percent-encoding", "hunter2");
    refused("redis://u:hunter2%4@h", "percent-encoding", "hunter2");
    refused("redis://u:hunter2%@h", "percent-encoding", "hunter2");
    refused("redis://u:hun%00ter2@h", "NUL", "hunter2");
    refused("redis://u:hun/ter2@h:6379/0", "percent-encoded", "hunter2");
    refused("redis://u:hun@ter2@h:6379/0", "percent-encoded", "hunter2");
    refused("redis://u:hun ter2@h", "percent-encoded", "hunter2");
    {
        char big[600] = "redis://u:";
        memset(big + 10, 'a', 300);
        strcpy(big + 310, "@h:1/0");
        refused(big, "longer than", NULL);
        memset(big, 0, sizeof big);
        strcpy(big, "redis://");
        memset(big + 8, 'h', 300);
        refused(big, "host", NULL);
    }
    /* A user with a raw ':' cannot exist: the first ':' splits. */
    CHECK(parse("redis://u%3Ax:pw@h") == 0 && strcmp(u.user, "u:x") == 0);

    /* Redaction: the password never shows; the rest does. */
    redacted("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0");
    redacted("redis://gw:s3cret@redis:6379/0", "redis://gw:***@redis:6379/0");
    redacted("redis://gw:a@b@redis:6379/0", "redis://gw:***@redis:6379/0");
    redacted("redis://s3cret@redis:6379/0", "redis://***@redis:6379/0");
    redacted("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0");
    redacted("gw:s3cret@redis", "gw:***@redis");
    redacted("http://x", "http://x");
    {
        char small[12];
        redisurl_redact("redis://:s3cret@h", small, sizeof small);
        CHECK(strlen(small) == sizeof small - 1 && !strstr(small, "s3cret"));
    }
    if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
    return failures ? 1 : 0;
}
