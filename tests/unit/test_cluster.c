/* test_cluster.c: common/cluster.c on its own: key slots (the cluster
 * specification's examples and hash-tag rules), CLUSTER SLOTS replies read
 * through hiredis's own parser from RESP bytes (masters, replicas, "?"
 * hosts, gaps, malformed shapes, which leave an empty map), and MOVED/ASK
 * texts. With CLUSTER_URL set (tests/e2e/test_cluster.py runs it so, on
 * the stack's real cluster): the live map parses and covers every slot,
 * CLUSTER KEYSLOT agrees on thousands of keys, and a command sent to the
 * wrong master gets a MOVED that names the owner the map says. Exit 0 when
 * every check holds. */
#include "common/cluster.h"
#include "common/redisurl.h"
#include "tests/unit/check.h"

#include <hiredis/hiredis.h>
#include <hiredis/read.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned slot_of(const char *k)
{
    return cluster_keyslot(k, strlen(k));
}

/* The reply RESP parses to (freeReplyObject it), or NULL. */
static redisReply *resp(const char *text)
{
    redisReader *rd = redisReaderCreate();
    void *r = NULL;
    if (!rd) return NULL;
    if (redisReaderFeed(rd, text, strlen(text)) != REDIS_OK ||
        redisReaderGetReply(rd, &r) != REDIS_OK)
        r = NULL;
    redisReaderFree(rd);
    return r;
}

static cluster_map map; /* 34 KB: not on the stack */

static int parse(const char *text, char *err, size_t errlen)
{
    redisReply *r = resp(text);
    int rc;
    CHECK(r != NULL);
    rc = cluster_map_parse(r, "10.0.0.9", &map, err, errlen);
    if (r) freeReplyObject(r);
    return rc;
}

static void keyslots(void)
{
    /* CRC16/XMODEM's check value: "123456789" -> 0x31C3. */
    CHECK(slot_of("123456789") == (0x31C3 % CLUSTER_SLOTS));
    CHECK(slot_of("foo") == 12182);
    CHECK(slot_of("bar") == 5061);
    CHECK(slot_of("") == 0);
    /* Hash tags, as the specification spells them out. */
    CHECK(slot_of("{user1000}.following") == slot_of("{user1000}.followers"));
    CHECK(slot_of("{user1000}.following") == slot_of("user1000"));
    CHECK(slot_of("foo{}{bar}") == cluster_keyslot("foo{}{bar}", 10)); /* empty tag: whole key */
    CHECK(slot_of("foo{}{bar}") != slot_of("bar"));
    CHECK(slot_of("foo{{bar}}zap") == slot_of("{bar"));
    CHECK(slot_of("foo{bar}{zap}") == slot_of("bar"));
    CHECK(slot_of("{bar") == cluster_keyslot("{bar", 4)); /* no '}': whole key */
    /* The gateway's own layout: every key of account 42 in one slot. */
    CHECK(slot_of("pg:{42}:acct") == slot_of("pg:{42}:holds"));
    CHECK(slot_of("pg:{42}:lim") == slot_of("42"));
    /* Binary bytes and a length shorter than the string. */
    CHECK(cluster_keyslot("foo\0bar", 3) == 12182);
    for (int i = 0; i < 100000; i++) {
        char k[32];
        int n = snprintf(k, sizeof k, "k%d", i);
        CHECK(cluster_keyslot(k, (size_t)n) < CLUSTER_SLOTS);
    }
}

#define ID_A "07c37dfeb235213a872192d90877d0cd55635b91"
#define ID_B "67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1"
#define ID_C "292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f"

static void maps(void)
{
    char err[128];
    /* Redis 7's reply: three masters, the first with a replica, the second
     * with "?" for its host, the third with a metadata map (RESP3 in
     * RESP2: an array) after its id. */
    CHECK(parse("*3\r\n"
                "*4\r\n:0\r\n:5460\r\n"
                "*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$40\r\n" ID_A "\r\n"
                "*3\r\n$9\r\n127.0.0.1\r\n:7003\r\n$40\r\n" ID_C "\r\n"
                "*3\r\n:5461\r\n:10922\r\n"
                "*3\r\n$1\r\n?\r\n:7001\r\n$40\r\n" ID_B "\r\n"
                "*3\r\n:10923\r\n:16383\r\n"
                "*4\r\n$9\r\n127.0.0.1\r\n:7002\r\n$0\r\n\r\n*0\r\n",
                err, sizeof err) == 0);
    CHECK(map.nnodes == 4 && map.covered == CLUSTER_SLOTS);
    CHECK(map.owner[0] == 0 && map.owner[5460] == 0 && map.owner[5461] == 2);
    CHECK(map.owner[16383] == 3);
    CHECK(strcmp(map.nodes[0].id, ID_A) == 0 && map.nodes[0].master);
    CHECK(!map.nodes[1].master && map.nodes[1].master_idx == 0 && map.nodes[1].port == 7003);
    CHECK(strcmp(map.nodes[2].host, "10.0.0.9") == 0 && map.nodes[2].port == 7001);
    CHECK(map.nodes[3].id[0] == '\0');
    CHECK(cluster_map_find(&map, "127.0.0.1", 7002) == 3);
    CHECK(cluster_map_find(&map, "127.0.0.1", 7003) == -1); /* a replica is not a master */
    int idx[8];
    CHECK(cluster_map_masters(&map, idx, 8) == 3 && idx[0] == 0 && idx[1] == 2 && idx[2] == 3);

    /* A gap: slots no range names stay unserved. Two ranges of one master. */
    CHECK(parse("*2\r\n"
                "*3\r\n:0\r\n:99\r\n*2\r\n$1\r\nh\r\n:1\r\n"
                "*3\r\n:200\r\n:299\r\n*2\r\n$1\r\nh\r\n:1\r\n",
                err, sizeof err) == 0);
    CHECK(map.nnodes == 1 && map.covered == 200 && map.owner[150] == -1 && map.owner[250] == 0);
    /* An empty reply: a cluster with no slots assigned yet. */
    CHECK(parse("*0\r\n", err, sizeof err) == 0 && map.covered == 0);

    /* Malformed: refused, and the map is left empty. */
    const char *bad[] = {
        "+OK\r\n",
        "*1\r\n:0\r\n",
        "*1\r\n*2\r\n:0\r\n:1\r\n",
        "*1\r\n*3\r\n:0\r\n:16384\r\n*2\r\n$1\r\nh\r\n:1\r\n",
        "*1\r\n*3\r\n:9\r\n:1\r\n*2\r\n$1\r\nh\r\n:1\r\n",
        "*1\r\n*3\r\n:-1\r\n:1\r\n*2\r\n$1\r\nh\r\n:1\r\n",
        "*1\r\n*3\r\n:0\r\n:1\r\n*2\r\n$1\r\nh\r\n:0\r\n",
        "*1\r\n*3\r\n:0\r\n:1\r\n*2\r\n$1\r\nh\r\n$1\r\n1\r\n",
        "*1\r\n*3\r\n:0\r\n:1\r\n*1\r\n$1\r\nh\r\n",
        "*1\r\n*4\r\n:0\r\n:1\r\n*2\r\n$1\r\nh\r\n:1\r\n:5\r\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        int rc = parse(bad[i], err, sizeof err);
        if (rc != -1) fprintf(stderr, "  accepted bad map %zu\n", i);
        CHECK(rc == -1 && err[0] != '\0' && map.covered == 0 && map.nnodes == 0);
        CHECK(map.owner[0] == -1 && map.owner[1] == -1);
    }
    CHECK(cluster_map_parse(NULL, "h", &map, err, sizeof err) == -1);
}

static void redirects(void)
{
    cluster_redirect rd;
    CHECK(cluster_redirect_parse("MOVED 3999 127.0.0.1:6381", &rd) == 1);
    CHECK(!rd.ask && rd.slot == 3999 && strcmp(rd.host, "127.0.0.1") == 0 && rd.port == 6381);
    CHECK(cluster_redirect_parse("ASK 0 redis-2.svc:7000", &rd) == 1);
    CHECK(rd.ask && rd.slot == 0 && strcmp(rd.host, "redis-2.svc") == 0 && rd.port == 7000);
    CHECK(cluster_redirect_parse("MOVED 16383 [::1]:7001", &rd) == 1);
    CHECK(strcmp(rd.host, "::1") == 0 && rd.port == 7001 && rd.slot == 16383);
    CHECK(cluster_redirect_parse("MOVED 12 ::1:7001", &rd) == 1 && strcmp(rd.host, "::1") == 0);
    /* An empty host: the node that answered (the caller knows it). */
    CHECK(cluster_redirect_parse("MOVED 12 :7001", &rd) == 1 && rd.host[0] == '\0');
    CHECK(cluster_redirect_parse("ERR unknown command", &rd) == 0);
    CHECK(cluster_redirect_parse("CROSSSLOT Keys in request don't hash", &rd) == 0);
    CHECK(cluster_redirect_parse("MOVEDX 1 h:1", &rd) == 0);
    const char *bad[] = {"MOVED ",       "MOVED x h:1", "MOVED 16384 h:1", "MOVED -1 h:1",
                         "MOVED 1 h",    "MOVED 1 h:",  "MOVED 1 h:0",     "MOVED 1 h:70000",
                         "MOVED 1 h:1x", "ASK 1",       "MOVED 1  h:1x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = cluster_redirect_parse(bad[i], &rd);
        if (rc != -1) fprintf(stderr, "  '%s' -> %d\n", bad[i], rc);
        CHECK(rc == -1);
    }
}

static redisContext *live_connect(const redisurl *u, const char *host, int port)
{
    redisContext *c = redisConnect(host, port);
    redisReply *r;
    CHECK(c && !c->err);
    if (!c || c->err) return c;
    r = redisCommand(c, "AUTH %s", u->password);
    CHECK(r && r->type == REDIS_REPLY_STATUS);
    if (r) freeReplyObject(r);
    return c;
}

static void live(const char *url)
{
    redisurl u;
    char err[256];
    redisContext *c;
    redisReply *r;
    int idx[8], nm;

    CHECK(redisurl_parse(url, &u, err, sizeof err) == 0 && u.cluster);
    c = live_connect(&u, u.seeds[0].host, u.seeds[0].port);
    if (!c || c->err) goto out;
    r = redisCommand(c, "CLUSTER SLOTS");
    CHECK(cluster_map_parse(r, u.seeds[0].host, &map, err, sizeof err) == 0);
    if (r) freeReplyObject(r);
    CHECK(map.covered == CLUSTER_SLOTS);
    nm = cluster_map_masters(&map, idx, 8);
    CHECK(nm == 3);
    for (int i = 0; i < 3000; i++) {
        char k[64];
        int n = i % 3 ? snprintf(k, sizeof k, "pg:{%d}:acct", i * 7919)
                      : snprintf(k, sizeof k, "k\x01%d{%x}z", i, (unsigned)i * 2654435761u);
        r = redisCommand(c, "CLUSTER KEYSLOT %b", k, (size_t)n);
        CHECK(r && r->type == REDIS_REPLY_INTEGER && r->integer == cluster_keyslot(k, (size_t)n));
        if (r) freeReplyObject(r);
    }
    /* A key owned elsewhere: the seed answers MOVED to the map's owner. */
    for (int i = 0; i < 64; i++) {
        char k[32];
        int n = snprintf(k, sizeof k, "pg:{%d}:acct", i);
        unsigned slot = cluster_keyslot(k, (size_t)n);
        const cluster_node *own = &map.nodes[map.owner[slot]];
        cluster_redirect rd;
        r = redisCommand(c, "GET %b", k, (size_t)n);
        CHECK(r != NULL);
        if (!r) break;
        if (own->port == u.seeds[0].port && strcmp(own->host, u.seeds[0].host) == 0) {
            CHECK(r->type == REDIS_REPLY_NIL);
        } else {
            CHECK(r->type == REDIS_REPLY_ERROR && cluster_redirect_parse(r->str, &rd) == 1);
            CHECK(!rd.ask && rd.slot == (int)slot && rd.port == own->port);
            CHECK(cluster_map_find(&map, rd.host, rd.port) == map.owner[slot]);
        }
        freeReplyObject(r);
    }
out:
    if (c) redisFree(c);
    redisurl_wipe(&u);
}

int main(void)
{
    const char *url = getenv("CLUSTER_URL");
    keyslots();
    maps();
    redirects();
    if (url && *url) live(url);
    return failures ? 1 : 0;
}
