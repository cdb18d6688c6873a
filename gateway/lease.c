/* lease.c: point leases (see lease.h).
 *
 * This file keeps the lease table, each lease's records (text and
 * callbacks) and their queues, the timers, the sending through hotclient
 * and the spill. The figures and every decision on them (what may be
 * promised, the fence, what an op carries, what its answer means, when an
 * op is due) are leasecore.c's, which does no I/O and is unit-tested on its
 * own: lease.c tells it each event and carries out what it decides. */
#include "gateway/lease.h"

#include "common/hotkeys.h"
#include "common/log.h"
#include "gateway/leasecore.h"
#include "gateway/spill.h"
#include "gateway/worker.h"

#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#define LEASE_BUCKETS 256
#define LEASE_TICK_MS 100
#define LEASE_REC_LEN 256 /* rid|acct|route(<=128)|amount|hold|outcome|status */

typedef struct lease_rec {
    char text[LEASE_REC_LEN];
    size_t len;
    int64_t charge;
    hot_cb cb; /* NULL once run (answered) */
    void *arg;
} lease_rec;

typedef struct lease_recs {
    int n, cap;
    lease_rec *r;
} lease_recs;

struct lease {
    lease_table *t;
    LIST_ENTRY(lease) bucket;
    TAILQ_ENTRY(lease) all;
    int64_t account;
    char lid[34];
    leasecore c;  /* its figures and op state (leasecore.h) */
    int in_table; /* found by lease_take; 0 once lost or given back */
    int in_dirty; /* on the table's dirty list */
    TAILQ_ENTRY(lease) dirty;
    lease_recs op;    /* the records of the op on its way or failed */
    lease_recs queue; /* records for the next op */
};

LIST_HEAD(lease_bucket, lease);
TAILQ_HEAD(lease_queue, lease);

struct lease_table {
    hotclient *hc;
    lease_config cfg;
    int down; /* lease_table_shutdown: send nothing */
    int closing;
    struct lease_bucket buckets[LEASE_BUCKETS];
    struct lease_queue leases; /* every lease alive, in or out of the table */
    struct lease_queue dirty;  /* leases with want_op, sent at the end of the pass */
    struct event *tick;
    struct event *flush;
    int flush_scheduled;
};

static size_t lease_bucket(int64_t account)
{
    return (size_t)((uint64_t)account * 0x9E3779B97F4A7C15ULL >> 56) % LEASE_BUCKETS;
}

#ifdef LEASE_TESTING
/* Test builds only (tests/unit/test_lease.c): the next allocations fail. */
int lease_test_fail_allocs;
#endif

/* Room for at least CAP records in Q. */
static int lease_recs_reserve(lease_recs *q, int cap)
{
    lease_rec *r;
    if (q->cap >= cap) return 0;
#ifdef LEASE_TESTING
    if (lease_test_fail_allocs > 0) {
        lease_test_fail_allocs--;
        return -1;
    }
#endif
    r = realloc(q->r, (size_t)cap * sizeof *r);
    if (!r) return -1;
    q->r = r;
    q->cap = cap;
    return 0;
}

static int lease_recs_push(lease_recs *q, const lease_rec *rec)
{
    if (q->n == q->cap && lease_recs_reserve(q, q->cap ? q->cap * 2 : 16) != 0) return -1;
    q->r[q->n++] = *rec;
    return 0;
}

/* Runs the callbacks of RECS[0..N) still waiting, with RC and a settle
 * reply: STATUS, each record's charge if CHARGED (else 0), AVAILABLE. */
static void lease_recs_answer(lease_rec *recs, int n, int rc, int64_t status, int64_t available,
                              int charged)
{
    for (int i = 0; i < n; i++) {
        hot_cb cb = recs[i].cb;
        hot_reply rep = {.settle = {status, charged ? recs[i].charge : 0, available}};
        recs[i].cb = NULL;
        if (cb) cb(recs[i].arg, rc, &rep);
    }
}

/* Redis is away (or we are shutting down): every call waiting on L is
 * answered now with the charge to come; its record stays for a resend. */
static void lease_answer_later(lease *l)
{
    lease_recs_answer(l->op.r, l->op.n, -1, 0, 0, 1);
    lease_recs_answer(l->queue.r, l->queue.n, -1, 0, 0, 1);
}

/* Puts L on the dirty list (its op is sent at the end of the pass); the
 * core has marked the op due. */
static void lease_schedule(lease *l)
{
    lease_table *t = l->t;
    if (!l->in_dirty) {
        TAILQ_INSERT_TAIL(&t->dirty, l, dirty);
        l->in_dirty = 1;
    }
    if (!t->flush_scheduled && !t->down) {
        event_active(t->flush, EV_TIMEOUT, 0);
        t->flush_scheduled = 1;
    }
}

/* Out of the table: lease_take finds it no more (a new one may start). */
static void lease_unlist(lease *l)
{
    if (!l->in_table) return;
    LIST_REMOVE(l, bucket);
    l->in_table = 0;
}

/* Only from the tick's first pass and lease_table_free, where no callback
 * runs: a lease is never freed under a loop that walks the leases. */
static void lease_free(lease *l)
{
    lease_unlist(l);
    if (l->in_dirty) TAILQ_REMOVE(&l->t->dirty, l, dirty);
    TAILQ_REMOVE(&l->t->leases, l, all);
    free(l->op.r);
    free(l->queue.r);
    free(l);
}

static void lease_send(lease *l);

static void lease_on_reply(void *arg, int rc, const hot_lease_reply *v)
{
    lease *l = arg;
    lease_table *t = l->t;
    leasecore *c = &l->c;
    leasecore_reply r = {0};
    leasecore_answer a;
    if (v) r = (leasecore_reply){v->status, v->amount, v->contended, v->charged};
    if (t->down) {
        leasecore_answer_begin(c, -1, NULL, worker_now_ms(), &a);
        lease_answer_later(l);
        return;
    }
    leasecore_answer_begin(c, rc, v ? &r : NULL, worker_now_ms(), &a);
    if (a.kind == LEASECORE_ANSWER_FAILED) {
        if (a.first_failure)
            log_warn("lease %s of account %" PRId64 ": op %" PRId64 " unanswered, will resend",
                     l->lid, l->account, c->op_seq);
        lease_answer_later(l);
        return;
    }
    if (a.kind == LEASECORE_ANSWER_APPLIED) {
        if (a.charged < l->op.n)
            log_warn("lease %s of account %" PRId64 ": op %" PRId64 " short of points: %d of %d "
                     "calls charged",
                     l->lid, l->account, c->op_seq, a.charged, l->op.n);
        lease_recs_answer(l->op.r, a.charged, 0, 1, v->available, 1);
        lease_recs_answer(l->op.r + a.charged, l->op.n - a.charged, 0, 1, v->available, 0);
    } else {
        if (v->status == 0)
            log_warn("lease %s of account %" PRId64 ": gone from Redis (expired?): %d calls not "
                     "charged",
                     l->lid, l->account, l->op.n);
        else if (c->op_seq > 1 || v->status != -1)
            log_error("lease %s of account %" PRId64 ": unusable in Redis (status %" PRId64 ")",
                      l->lid, l->account, v->status);
        lease_recs_answer(l->op.r, l->op.n, 0, v->status < 0 ? HOT_STATUS_UNUSABLE : 0,
                          v->available, 0);
    }
    /* The calls answered above may have taken from or ended calls of L:
     * the rest of the answer's decisions see them. */
    leasecore_answer_done(c, &a);
    if (a.contended)
        log_info("lease %s of account %" PRId64 ": contended, giving back", l->lid, l->account);
    if (a.unlist) lease_unlist(l);
    if (a.lost) {
        /* Nothing in its queue can be charged. */
        lease_recs_answer(l->queue.r, l->queue.n, 0, 0, v->available, 0);
        l->queue.n = 0;
        leasecore_queue_dropped(c);
    }
    l->op.n = 0;
    if (a.schedule) lease_schedule(l);
}

/* Builds and sends L's next op (or resends the failed one). */
static void lease_send(lease *l)
{
    lease_table *t = l->t;
    leasecore *c = &l->c;
    const char *recs[2 * HOT_LEASE_RECORDS_MAX];
    size_t lens[2 * HOT_LEASE_RECORDS_MAX];
    hot_lease_args a;
    int close;
    leasecore_send_what what = leasecore_send_what_now(c);
    if (t->down || what == LEASECORE_SEND_NONE) return;
    if (what == LEASECORE_SEND_NEW) {
        int64_t charge = 0;
        if (l->queue.n <= HOT_LEASE_RECORDS_MAX) {
            /* The op takes every queued record: the arrays swap, nothing
             * to allocate. */
            lease_recs tmp = l->op;
            l->op = l->queue;
            l->queue = tmp;
            l->queue.n = 0;
        } else {
            /* The op takes the first HOT_LEASE_RECORDS_MAX; the rest stay
             * queued, in order. Its room is made first: if that fails,
             * nothing moved and the op waits for the next tick (a record
             * is never lost, and an op never carries more records than
             * one lease.lua call takes: an op that could never be sent
             * would never complete). */
            int n = HOT_LEASE_RECORDS_MAX;
            if (lease_recs_reserve(&l->op, n) != 0) {
                log_error("lease %s: out of memory building an op, retrying", l->lid);
                leasecore_op_defer(c);
                return;
            }
            memcpy(l->op.r, l->queue.r, (size_t)n * sizeof *l->op.r);
            l->op.n = n;
            memmove(l->queue.r, l->queue.r + n, (size_t)(l->queue.n - n) * sizeof *l->queue.r);
            l->queue.n -= n;
        }
        for (int i = 0; i < l->op.n; i++)
            charge += l->op.r[i].charge;
        leasecore_op_build(c, l->op.n, charge, worker_now_ms(), hotclient_refusing(t->hc));
    }
    for (int i = 0; i < l->op.n; i++) {
        recs[2 * i] = "c";
        lens[2 * i] = 1;
        recs[2 * i + 1] = l->op.r[i].text;
        lens[2 * i + 1] = l->op.r[i].len;
    }
    switch (leasecore_op_mode_of(c)) {
    case LEASECORE_OP_LATE:
        close = HOT_LEASE_LATE;
        break;
    case LEASECORE_OP_CLOSE:
        close = 1;
        break;
    default:
        close = 0;
    }
    a = (hot_lease_args){.account = l->account,
                         .lid = l->lid,
                         .seq = c->op_seq,
                         .ttl_ms = t->cfg.ttl_ms,
                         .charge = c->op_charge,
                         .resize = c->op_resize,
                         .busy = c->op_busy,
                         .close = close,
                         .nrec = 2 * l->op.n,
                         .recs = recs,
                         .lens = lens};
    {
        unsigned epoch = hotclient_epoch(t->hc);
        if (hotclient_lease(t->hc, &a, lease_on_reply, l) == 0) {
            leasecore_op_sent(c, epoch);
            return;
        }
    }
    if (leasecore_op_unsent(c))
        log_warn("lease %s of account %" PRId64 ": redis away, op %" PRId64 " kept", l->lid,
                 l->account, c->op_seq);
    lease_answer_later(l);
}

static void lease_on_flush(evutil_socket_t fd, short what, void *arg)
{
    lease_table *t = arg;
    lease *l;
    t->flush_scheduled = 0;
    /* A send that fails answers its calls, whose code may schedule again:
     * the list is walked from its head until empty, and a failed or sent
     * lease is skipped (its reply or the tick sends what it wants). */
    while ((l = TAILQ_FIRST(&t->dirty)) != NULL) {
        TAILQ_REMOVE(&t->dirty, l, dirty);
        l->in_dirty = 0;
        if (!t->down && leasecore_send_what_now(&l->c) == LEASECORE_SEND_NEW) lease_send(l);
    }
}

static void lease_on_tick(evutil_socket_t fd, short what, void *arg)
{
    lease_table *t = arg;
    uint64_t now = worker_now_ms();
    lease *l, *next;
    if (t->down) return;
    for (l = TAILQ_FIRST(&t->leases); l; l = next) {
        next = TAILQ_NEXT(l, all);
        if (leasecore_finished(&l->c)) lease_free(l);
    }
    /* No callback runs below: a resend's calls were answered already, and a
     * new op is only scheduled. */
    TAILQ_FOREACH(l, &t->leases, all)
    {
        int f = leasecore_tick(&l->c, now, t->cfg.idle_ms, t->closing);
        if (f & LEASECORE_TICK_RESEND) {
            if (hotclient_up(t->hc)) lease_send(l);
            continue;
        }
        if (f & LEASECORE_TICK_UNLIST) lease_unlist(l);
        if (f & LEASECORE_TICK_SCHEDULE) lease_schedule(l);
    }
}

int lease_table_new(struct event_base *base, hotclient *hc, const lease_config *cfg,
                    lease_table **out)
{
    struct timeval tv = {0, LEASE_TICK_MS * 1000};
    lease_table *t = calloc(1, sizeof *t);
    if (!t) return -1;
    t->hc = hc;
    t->cfg = *cfg;
    for (int i = 0; i < LEASE_BUCKETS; i++)
        LIST_INIT(&t->buckets[i]);
    TAILQ_INIT(&t->leases);
    TAILQ_INIT(&t->dirty);
    t->tick = event_new(base, -1, EV_PERSIST, lease_on_tick, t);
    t->flush = event_new(base, -1, 0, lease_on_flush, t);
    if (!t->tick || !t->flush || event_add(t->tick, &tv) != 0) {
        lease_table_free(t);
        return -1;
    }
    *out = t;
    return 0;
}

/* Writes L's records not known to be in Redis to SP as ops with the
 * numbers they would have had: the op on its way or failed (it may have
 * been applied: its seq makes a replay of it harmless), then the queued
 * records, HOT_LEASE_RECORDS_MAX an op, then an op that closes the lease.
 * Returns the records not spilled. */
static int lease_spill(lease *l, spill_file *sp)
{
    const char *recs[2 * HOT_LEASE_RECORDS_MAX];
    size_t lens[2 * HOT_LEASE_RECORDS_MAX];
    const leasecore *c = &l->c;
    int64_t seq = c->seq, charge;
    int lost = 0;
    if ((c->op_sent || c->op_failed) && l->op.n > 0) {
        for (int i = 0; i < l->op.n; i++) {
            recs[2 * i] = "c";
            lens[2 * i] = 1;
            recs[2 * i + 1] = l->op.r[i].text;
            lens[2 * i + 1] = l->op.r[i].len;
        }
        if (!sp || spill_lease_op(sp, l->account, l->lid, c->op_seq, c->op_charge, 2 * l->op.n,
                                  recs, lens) != 0)
            lost += l->op.n;
        seq = c->op_seq;
    }
    for (int at = 0; at < l->queue.n; at += HOT_LEASE_RECORDS_MAX) {
        int n = l->queue.n - at < HOT_LEASE_RECORDS_MAX ? l->queue.n - at : HOT_LEASE_RECORDS_MAX;
        charge = 0;
        for (int i = 0; i < n; i++) {
            const lease_rec *r = &l->queue.r[at + i];
            recs[2 * i] = "c";
            lens[2 * i] = 1;
            recs[2 * i + 1] = r->text;
            lens[2 * i + 1] = r->len;
            charge += r->charge;
        }
        seq++;
        if (!sp || spill_lease_op(sp, l->account, l->lid, seq, charge, 2 * n, recs, lens) != 0)
            lost += n;
    }
    if (sp && seq > 1) spill_lease_close(sp, l->account, l->lid, seq + 1);
    return lost;
}

void lease_table_shutdown(lease_table *t, spill_file *sp)
{
    lease *l;
    if (!t) return;
    t->down = 1;
    for (l = TAILQ_FIRST(&t->leases); l; l = TAILQ_NEXT(l, all)) {
        int unsent = leasecore_unsent(&l->c);
        if (unsent > 0) {
            int lost = lease_spill(l, sp);
            if (lost > 0)
                log_error("lease %s of account %" PRId64 ": exiting with %d records not spilled "
                          "(the sweeper will expire the lease, cost 0)",
                          l->lid, l->account, lost);
            else
                log_warn("lease %s of account %" PRId64 ": %d records spilled for the next start",
                         l->lid, l->account, unsent);
        }
        lease_answer_later(l);
    }
}

void lease_table_spill(const lease_table *t, spill_file *sp)
{
    for (lease *l = TAILQ_FIRST(&t->leases); l; l = TAILQ_NEXT(l, all)) {
        if (leasecore_unsent(&l->c) > 0 && lease_spill(l, sp) > 0)
            log_error("lease %s: records missing from the drain's snapshot", l->lid);
    }
}

int lease_table_unsent(const lease_table *t)
{
    int n = 0;
    const lease *l;
    for (l = TAILQ_FIRST(&t->leases); l; l = TAILQ_NEXT(l, all))
        n += leasecore_unsent(&l->c);
    return n;
}

void lease_table_free(lease_table *t)
{
    if (!t) return;
    t->down = 1;
    while (!TAILQ_EMPTY(&t->leases)) {
        lease *l = TAILQ_FIRST(&t->leases);
        lease_answer_later(l);
        lease_free(l);
    }
    if (t->tick) event_free(t->tick);
    if (t->flush) event_free(t->flush);
    free(t);
}

void lease_table_close(lease_table *t)
{
    t->closing = 1;
    lease_on_tick(-1, 0, t);
}

int lease_table_busy(const lease_table *t)
{
    int n = 0;
    const lease *l;
    TAILQ_FOREACH(l, &t->leases, all)
    n++;
    return n;
}

void lease_table_stats(const lease_table *t, int64_t *n, int64_t *points)
{
    const lease *l;
    int64_t held;
    *n = *points = 0;
    TAILQ_FOREACH(l, &t->leases, all)
    if (leasecore_held(&l->c, &held)) {
        (*n)++;
        *points += held;
    }
}

static lease *lease_find(lease_table *t, int64_t account)
{
    lease *l;
    LIST_FOREACH(l, &t->buckets[lease_bucket(account)], bucket)
    if (l->account == account) return l;
    return NULL;
}

lease *lease_take(lease_table *t, int64_t account, int64_t price)
{
    lease *l;
    /* Past the backlog bound (or a full resend queue) no call is served
     * from a lease either: the per-call reserve answers 503. */
    if (t->cfg.calls <= 0 || t->closing || t->down || hotclient_refusing(t->hc)) return NULL;
    l = lease_find(t, account);
    if (!l) return NULL;
    switch (leasecore_take(&l->c, price, worker_now_ms(), hotclient_epoch(t->hc))) {
    case LEASECORE_TAKEN:
        return l;
    case LEASECORE_FENCED: /* the next op or probe lifts it */
    case LEASECORE_SHORT:  /* ask for more */
        lease_schedule(l);
        return NULL;
    default:
        return NULL;
    }
}

void lease_consider(lease_table *t, int64_t account, int64_t price, int64_t available)
{
    lease *l;
    unsigned char raw[16];
    int64_t want;
    if (t->closing || t->down || hotclient_refusing(t->hc)) return;
    want = leasecore_size(t->cfg.calls, price, available);
    if (want <= 0) return;
    l = lease_find(t, account);
    if (l) return;
    l = calloc(1, sizeof *l);
    if (!l) return;
    l->t = t;
    l->account = account;
    leasecore_init(&l->c, want, worker_now_ms());
    l->lid[0] = 'L';
    randombytes_buf(raw, sizeof raw);
    sodium_bin2hex(l->lid + 1, sizeof l->lid - 1, raw, sizeof raw);
    LIST_INSERT_HEAD(&t->buckets[lease_bucket(account)], l, bucket);
    l->in_table = 1;
    TAILQ_INSERT_TAIL(&t->leases, l, all);
    lease_schedule(l); /* seq 1: creates it, asking for WANT */
}

void lease_end(lease *l, const char *rid, const char *route_id, int64_t price, int64_t charge,
               int commit, long status, hot_cb cb, void *arg)
{
    lease_rec rec = {.cb = cb, .arg = arg};
    int len;
    charge = leasecore_end(&l->c, price, charge, commit);
    rec.charge = charge;
    len = snprintf(rec.text, sizeof rec.text, "%s|%" PRId64 "|%s|%" PRId64 "|%" PRId64 "|%s|%ld",
                   rid, l->account, route_id, charge, price, commit ? "commit" : "release", status);
    if (l->t->down) {
        hot_reply none = {{0}};
        if (cb) cb(arg, -1, &none);
        return;
    }
    if (l->c.deleted) {
        /* Redis released the lease (cost 0 for everything in it). */
        hot_reply none = {{0}};
        if (cb) cb(arg, 0, &none);
        return;
    }
    if (len < 0 || (size_t)len >= sizeof rec.text || lease_recs_push(&l->queue, &rec) != 0) {
        /* Cannot happen for valid ids (route ids are at most 128 bytes). The
         * points go back to the lease: the call is free. */
        hot_reply none = {{0}};
        log_error("lease %s: record of %s not queued: call not charged", l->lid, rid);
        if (cb) cb(arg, 0, &none);
        return;
    }
    rec.len = (size_t)len;
    l->queue.r[l->queue.n - 1].len = rec.len;
    leasecore_queued(&l->c, charge);
    if (l->c.op_failed) {
        /* Redis is away: answered now with the charge to come, as settles are. */
        lease_recs_answer(&l->queue.r[l->queue.n - 1], 1, -1, 0, 0, 1);
    }
    lease_schedule(l);
}
