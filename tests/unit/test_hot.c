/* test_hot.c: the Lua scripts' semantics through billing/hot.c, on the real
 * Redis of the test stack (REDIS_URL): reserve, short, commit, partial commit,
 * release, settle twice, credit sync out of order, guard holds, and no
 * overdraft with 50 concurrent reservers. Exit 0 when every check holds. */
#include "billing/hot.h"
#include "common/hotkeys.h"
#include "tests/unit/check.h"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *url;

static long long outbox_len(hot_conn *h)
{
    const char *argv[2] = {"XLEN", HOT_OUTBOX};
    redisReply *r = hot_command_argv(h, 2, argv, NULL);
    long long n = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    if (r) freeReplyObject(r);
    return n;
}

static void test_semantics(hot_conn *h, int64_t acct)
{
    int st, applied, found, settled;
    int64_t av, held, credited, spent, charged;
    long long ob0 = outbox_len(h);

    CHECK(hot_reserve(h, acct, "r0", 1, 10000, "t", &st, &av, &held) == 0);
    CHECK(st == HOT_RESERVE_UNKNOWN);

    /* credit sync: creation, newer, then an older one that must be ignored */
    CHECK(hot_credit(h, acct, 1, 10, 0, "", 0, &applied) == 0 && applied == 1);
    CHECK(hot_credit(h, acct, 3, 30, 0, "", 0, &applied) == 0 && applied == 1);
    CHECK(hot_credit(h, acct, 2, 20, 0, "", 0, &applied) == 0 && applied == 0);
    CHECK(hot_credit(h, acct, 3, 30, 0, "", 0, &applied) == 0 && applied == 0);
    CHECK(hot_account(h, acct, &found, &credited, &spent, &held) == 0);
    CHECK(found && credited == 30 && spent == 0 && held == 0);

    /* reserve, then the same rid again is idempotent */
    CHECK(hot_reserve(h, acct, "r1", 10, 10000, "dev.read", &st, &av, &held) == 0);
    CHECK(st == HOT_RESERVE_HELD && av == 20 && held == 10);
    CHECK(hot_reserve(h, acct, "r1", 10, 10000, "dev.read", &st, &av, &held) == 0);
    CHECK(st == HOT_RESERVE_HELD && av == 20 && held == 10);
    /* short: figures reported, nothing changed */
    CHECK(hot_reserve(h, acct, "r2", 25, 10000, "dev.read", &st, &av, &held) == 0);
    CHECK(st == HOT_RESERVE_SHORT && av == 20 && held == 10);

    /* a non-positive price is refused outright: it would mint points */
    CHECK(hot_reserve(h, acct, "r-neg", -5, 10000, "t", &st, &av, &held) == -1);
    CHECK(hot_reserve(h, acct, "r-zero", 0, 10000, "t", &st, &av, &held) == -1);
    CHECK(hot_account(h, acct, &found, &credited, &spent, &held) == 0 && held == 10);

    /* full commit */
    CHECK(hot_settle(h, acct, "r1", 10, "commit", 200, &settled, &charged, &av) == 0);
    CHECK(settled == 1 && charged == 10 && av == 20);
    /* settle twice: no-op */
    CHECK(hot_settle(h, acct, "r1", 10, "commit", 200, &settled, &charged, &av) == 0);
    CHECK(settled == 0 && charged == 0 && av == 20);

    /* partial commit: asks 50 of a 15 hold -> capped at 15; then 4 of 15 */
    CHECK(hot_reserve(h, acct, "r3", 15, 10000, "batch", &st, &av, &held) == 0 && st == 1);
    CHECK(hot_settle(h, acct, "r3", 50, "commit", 200, &settled, &charged, &av) == 0);
    CHECK(settled == 1 && charged == 15 && av == 5);
    CHECK(hot_credit(h, acct, 4, 60, 0, "", 0, &applied) == 0 && applied == 1);
    CHECK(hot_reserve(h, acct, "r4", 15, 10000, "batch", &st, &av, &held) == 0 && st == 1);
    CHECK(hot_settle(h, acct, "r4", 4, "commit", 200, &settled, &charged, &av) == 0);
    CHECK(settled == 1 && charged == 4 && av == 60 - 29);

    /* release: nothing charged, everything given back */
    CHECK(hot_reserve(h, acct, "r5", 7, 10000, "dev.cmd", &st, &av, &held) == 0 && st == 1);
    CHECK(hot_settle(h, acct, "r5", 7, "release", 503, &settled, &charged, &av) == 0);
    CHECK(settled == 1 && charged == 0 && av == 31);

    /* a guard hold is dropped by credit.lua without an outbox entry */
    long long before = outbox_len(h);
    CHECK(hot_reserve(h, acct, "adj-x", 5, 10000, "_adjustment", &st, &av, &held) == 0 && st == 1);
    CHECK(hot_credit(h, acct, 5, 55, 0, "adj-x", 0, &applied) == 0 && applied == 1);
    CHECK(outbox_len(h) == before);
    CHECK(hot_account(h, acct, &found, &credited, &spent, &held) == 0);
    CHECK(credited == 55 && spent == 29 && held == 0);

    /* commit, commit, commit, release: four outbox entries */
    CHECK(outbox_len(h) - ob0 == 4);
}

typedef struct racer {
    int64_t acct;
    int id;
    atomic_int *held;
    atomic_int *negative;
} racer;

static void *racer_run(void *p)
{
    racer *r = p;
    hot_conn *h = hot_open(url);
    char rid[32];
    int st;
    int64_t av, held;
    for (int i = 0; i < 5 && h; i++) {
        snprintf(rid, sizeof rid, "race-%d-%d", r->id, i);
        if (hot_reserve(h, r->acct, rid, 1, 10000, "race", &st, &av, &held) != 0) continue;
        if (st == HOT_RESERVE_HELD) atomic_fetch_add(r->held, 1);
        if (av < 0) atomic_fetch_add(r->negative, 1);
    }
    hot_close(h);
    return NULL;
}

static void test_no_overdraft(hot_conn *h, int64_t acct)
{
    pthread_t t[50];
    racer r[50];
    atomic_int held = 0, negative = 0;
    int applied, found;
    int64_t credited, spent, hsum;
    CHECK(hot_credit(h, acct, 1, 20, 0, "", 0, &applied) == 0);
    for (int i = 0; i < 50; i++) {
        r[i] = (racer){acct, i, &held, &negative};
        CHECK(pthread_create(&t[i], NULL, racer_run, &r[i]) == 0);
    }
    for (int i = 0; i < 50; i++)
        pthread_join(t[i], NULL);
    CHECK(atomic_load(&held) == 20);
    CHECK(atomic_load(&negative) == 0);
    CHECK(hot_account(h, acct, &found, &credited, &spent, &hsum) == 0);
    CHECK(credited == 20 && hsum == 20 && credited - spent - hsum == 0);
}

int main(void)
{
    hot_conn *h;
    int64_t base = 700000000 + (int64_t)getpid() * 10;
    url = getenv("REDIS_URL");
    if (!url) {
        fprintf(stderr, "REDIS_URL is required\n");
        return 2;
    }
    h = hot_open(url);
    CHECK(h != NULL);
    if (!h) return 1;
    CHECK(hot_ping(h) == 0);
    test_semantics(h, base + 1);
    test_no_overdraft(h, base + 2);
    hot_close(h);
    printf("test_hot: %s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
