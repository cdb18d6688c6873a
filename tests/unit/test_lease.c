/* test_lease.c: gateway/lease.c on its own, with Redis replaced by stubs:
 * the out-of-memory path of building an op (issue 10, 9): more records
 * queued than one op carries, and the allocation that moves them fails
 * (lease.c's fault-injection hook, compiled in only for this test with
 * LEASE_TESTING). The op must never carry more than HOT_LEASE_RECORDS_MAX
 * records (the old code wrote past its argument array and built an op that
 * hotclient refused forever), and every record must still be sent, once,
 * in order, and answered once. Also what a shutdown spills of a lease whose
 * op failed: the op with its seq, then a close. Exit 0 when every check
 * holds. */
#include "gateway/hotclient.h"
#include "gateway/lease.h"
#include "gateway/spill.h"
#include "tests/unit/check.h"

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern int lease_test_fail_allocs;

/* ---- stubs of what lease.c calls ------------------------------------- */

static uint64_t now_ms = 1000000;
static int redis_up = 1;
static int sends;     /* hotclient_lease calls that were sent */
static int too_many;  /* ops with more records than one call takes */
static int last_nrec; /* fields of the last op sent */
static int64_t last_seq, last_charge;
static int last_close;
static hot_lease_cb last_cb;
static void *last_arg;
static int spilled_ops, spilled_recs, spilled_closes;
static int64_t spilled_seq[8], close_seq;

uint64_t worker_now_ms(void)
{
    return now_ms;
}

unsigned hotclient_epoch(const hotclient *hc)
{
    return 1;
}

int hotclient_up(const hotclient *hc)
{
    return redis_up;
}

int hotclient_refusing(const hotclient *hc)
{
    return 0;
}

int hotclient_lease(hotclient *hc, const hot_lease_args *a, hot_lease_cb cb, void *arg)
{
    if (a->nrec > 2 * HOT_LEASE_RECORDS_MAX) {
        too_many++;
        return -1;
    }
    if (!redis_up) return -1;
    sends++;
    last_nrec = a->nrec;
    last_seq = a->seq;
    last_charge = a->charge;
    last_close = a->close;
    last_cb = cb;
    last_arg = arg;
    return 0;
}

int spill_lease_op(spill_file *f, int64_t account, const char *lid, int64_t seq, int64_t charge,
                   int nrec, const char *const *recs, const size_t *lens)
{
    if (spilled_ops < 8) spilled_seq[spilled_ops] = seq;
    spilled_ops++;
    spilled_recs += nrec / 2;
    return 0;
}

int spill_lease_close(spill_file *f, int64_t account, const char *lid, int64_t seq)
{
    spilled_closes++;
    close_seq = seq;
    return 0;
}

/* ---- the calls' answers -------------------------------------------------- */

#define NCALLS 301
static int answered[NCALLS + 16], charged[NCALLS + 16], bad_rc;

static void on_settled(void *arg, int rc, const hot_reply *rep)
{
    int i = (int)(intptr_t)arg;
    answered[i]++;
    if (rc == 0 && rep->settle.status == 1) charged[i] += (int)rep->settle.charged;
    if (rc != 0) bad_rc++;
}

static void reply(int64_t amount)
{
    hot_lease_reply v = {1, amount, 1 << 30, 0, last_nrec / 2}; /* every record charged */
    hot_lease_cb cb = last_cb;
    last_cb = NULL;
    CHECK(cb != NULL);
    if (cb) cb(last_arg, 0, &v);
}

static void run(struct event_base *base)
{
    event_base_loop(base, EVLOOP_NONBLOCK);
}

static lease_table *new_table(struct event_base *base, int64_t account)
{
    lease_table *t = NULL;
    lease_config cfg = {.calls = 1024, .idle_ms = 1000000, .ttl_ms = 10000};
    CHECK(lease_table_new(base, (hotclient *)base, &cfg, &t) == 0);
    lease_consider(t, account, 1, 1 << 30);
    run(base);
    CHECK(sends == 1 && last_seq == 1 && last_nrec == 0); /* creation */
    reply(1024);
    return t;
}

static void test_oom_building_an_op(void)
{
    struct event_base *base = event_base_new();
    lease_table *t = new_table(base, 7);
    char rid[40];
    int first = sends;

    for (int i = 0; i < NCALLS - 1; i++) {
        lease *l = lease_take(t, 7, 1);
        CHECK(l != NULL);
        if (!l) break;
        snprintf(rid, sizeof rid, "%032d", i);
        lease_end(l, rid, "device.read", 1, 1, 1, 200, on_settled, (void *)(intptr_t)i);
    }
    /* 300 queued, more than one op carries: the move fails. */
    lease_test_fail_allocs = 1;
    run(base);
    CHECK(too_many == 0);
    CHECK(sends == first); /* nothing sent, nothing lost: it waits */
    CHECK(lease_table_unsent(t) == NCALLS - 1);

    /* Memory again; the next call's end sends an op. */
    lease_test_fail_allocs = 0;
    {
        lease *l = lease_take(t, 7, 1);
        CHECK(l != NULL);
        if (l) {
            snprintf(rid, sizeof rid, "%032d", NCALLS - 1);
            lease_end(l, rid, "device.read", 1, 1, 1, 200, on_settled,
                      (void *)(intptr_t)(NCALLS - 1));
        }
    }
    run(base);
    CHECK(too_many == 0);
    CHECK(sends == first + 1);
    CHECK(last_nrec == 2 * HOT_LEASE_RECORDS_MAX && last_charge == HOT_LEASE_RECORDS_MAX);
    reply(1024 - HOT_LEASE_RECORDS_MAX);
    run(base);
    CHECK(sends == first + 2);
    CHECK(last_nrec == 2 * (NCALLS - HOT_LEASE_RECORDS_MAX));
    CHECK(last_charge == NCALLS - HOT_LEASE_RECORDS_MAX);
    reply(1024 - NCALLS);
    run(base);
    for (int i = 0; i < NCALLS; i++) {
        CHECK(answered[i] == 1);
        CHECK(charged[i] == 1);
    }
    CHECK(bad_rc == 0);
    CHECK(lease_table_unsent(t) == 0);
    lease_table_shutdown(t, NULL);
    lease_table_free(t);
    event_base_free(base);
}

static void test_shutdown_spills_the_failed_op(void)
{
    struct event_base *base = event_base_new();
    lease_table *t;
    char rid[40];
    sends = 0;
    t = new_table(base, 9);
    redis_up = 0; /* the next op cannot be sent: kept, its calls answered */
    for (int i = 0; i < 10; i++) {
        lease *l = lease_take(t, 9, 1);
        CHECK(l != NULL);
        if (!l) break;
        snprintf(rid, sizeof rid, "%032d", 1000 + i);
        lease_end(l, rid, "device.read", 1, 1, 1, 200, NULL, NULL);
    }
    run(base);
    CHECK(lease_table_unsent(t) == 10);
    lease_table_shutdown(t, (spill_file *)base);
    CHECK(spilled_ops == 1 && spilled_recs == 10);
    CHECK(spilled_seq[0] == 2);
    CHECK(spilled_closes == 1 && close_seq == 3);
    lease_table_free(t);
    event_base_free(base);
    redis_up = 1;
}

static void answer(int rc, int64_t status, int64_t amount)
{
    hot_lease_reply v = {status, amount, 1 << 30, 0, status == 1 ? last_nrec / 2 : 0};
    hot_lease_cb cb = last_cb;
    last_cb = NULL;
    CHECK(cb != NULL);
    if (cb) cb(last_arg, rc, &v);
}

/* A lease op is sent and its reply lost; a call ended meanwhile is queued
 * behind it, and both are answered with the charge to come. The sweeper
 * then releases the whole lease (cut off past its deadline): the resend
 * finds no lease (status 0). The queued record must not be dropped: it
 * goes as a `late` op with the next seq (lease.lua charges it against the
 * swept mark), as every op carrying records is sent. */
static void test_records_behind_a_swept_lease_go_late(void)
{
    struct event_base *base = event_base_new();
    lease_table *t;
    int a = NCALLS + 1, b = NCALLS + 2;
    sends = 0;
    bad_rc = 0;
    t = new_table(base, 11);
    {
        lease *l = lease_take(t, 11, 1);
        CHECK(l != NULL);
        if (l)
            lease_end(l, "a0000000000000000000000000000000", "device.read", 1, 1, 1, 200,
                      on_settled, (void *)(intptr_t)a);
    }
    run(base);
    CHECK(sends == 2 && last_seq == 2 && last_nrec == 2);
    CHECK(last_close == HOT_LEASE_LATE);
    {
        lease *l = lease_take(t, 11, 1); /* op 2 on its way: queued behind it */
        CHECK(l != NULL);
        if (l)
            lease_end(l, "b0000000000000000000000000000000", "device.read", 1, 1, 1, 200,
                      on_settled, (void *)(intptr_t)b);
    }
    run(base);
    CHECK(sends == 2);
    answer(-1, 0, 0); /* no usable reply: maybe applied; kept for a resend */
    CHECK(answered[a] == 1 && answered[b] == 1 && bad_rc == 2); /* the charge to come */
    CHECK(lease_table_unsent(t) == 2);
    /* The tick resends op 2 as it was; Redis no longer has the lease. */
    for (int i = 0; i < 50 && last_cb == NULL; i++) {
        usleep(20000);
        run(base);
    }
    CHECK(sends == 3 && last_seq == 2 && last_nrec == 2);
    answer(0, 0, 0);
    run(base);
    /* B's record goes on, late, as op 3; nothing else is sent for it. */
    CHECK(sends == 4 && last_seq == 3 && last_nrec == 2 && last_charge == 1);
    CHECK(last_close == HOT_LEASE_LATE);
    CHECK(lease_table_unsent(t) == 1);
    answer(0, 1, 0);
    run(base);
    CHECK(lease_table_unsent(t) == 0);
    CHECK(answered[a] == 1 && answered[b] == 1);
    lease_table_shutdown(t, NULL);
    lease_table_free(t);
    event_base_free(base);
}

int main(void)
{
    test_oom_building_an_op();
    test_shutdown_spills_the_failed_op();
    test_records_behind_a_swept_lease_go_late();
    if (failures) fprintf(stderr, "%d checks failed\n", failures);
    return failures ? 1 : 0;
}
