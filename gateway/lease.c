/* lease.c: point leases (see lease.h).
 *
 * A lease's points, as this worker sees them:
 *   amount   what Redis holds for it after the last op that answered
 *   used     prices promised to calls in flight
 *   pending  charges of ended calls whose records are queued or in the op
 *            on its way
 *   free = amount - used - pending: what the next call may be promised.
 * Redis lowers amount by the charges of our records, by a give-back we ask
 * for while no call is being promised (closing), or, once we are silent
 * past lease.lua's soft deadline, by the sweeper taking the free points
 * back (we stopped promising before: LEASE_FENCE_MS; what we promised
 * before that the next op takes again from the available points). So a
 * promise made while an op is on its way is never cut from under it.
 *
 * One op per lease at a time, numbered: a resend after a lost reply carries
 * the same number and lease.lua applies it once. The records of an op that
 * failed stay with it until an answer says they are in (or that the lease
 * is gone); their calls were answered meanwhile with the charge to come, as
 * per-call settles are when Redis is away. */
#include "gateway/lease.h"

#include "common/hotkeys.h"
#include "common/log.h"
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
#define LEASE_PROBE_MS 250 /* an op at least this often: renewal, contention news */
/* No promise from a lease whose last confirmed op was sent longer ago than
 * this: lease.lua's soft deadline (3000 ms after the op ran, which is after
 * it was sent) lets the sweeper give the lease's free points back, so that
 * a worker cut off from Redis, or dead, does not keep them from callers
 * elsewhere. The margin covers Redis's clock against ours. */
#define LEASE_FENCE_MS 1500
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
    int64_t amount, used, pending;
    int64_t want; /* free points it tries to keep */
    int64_t seq;  /* of the last op built */
    int refs;     /* calls promised from it, not yet ended */
    int in_table; /* found by lease_take; 0 once lost or given back */
    int closing;  /* takes no more; gives its free points back */
    int deleted;  /* Redis no longer has it: no more ops */
    int orphan;   /* Redis released it while records answered with the charge
                     to come waited: only late ops carrying them (lease.lua
                     charges them against its swept mark), nothing else */
    int want_op;  /* an op is due (records, more points, renewal, give-back) */
    int in_dirty; /* on the table's dirty list */
    TAILQ_ENTRY(lease) dirty;
    uint64_t last_take_ms, last_op_ms;
    uint64_t confirmed_ms; /* when the last op answered was sent */
    unsigned epoch;        /* hotclient connection it was answered on */
    uint64_t op_sent_ms;
    unsigned op_epoch;
    /* the op on its way (op_sent) or failed (op_failed), and its records */
    lease_recs op;
    int64_t op_seq, op_charge, op_resize, op_busy;
    int op_sent, op_failed;
    int op_close;     /* closing, nothing promised: an op that empties it drops it */
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

static int64_t lease_free_points(const lease *l)
{
    return l->amount - l->used - l->pending;
}

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

static void lease_schedule(lease *l)
{
    lease_table *t = l->t;
    l->want_op = 1;
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

/* Nothing refers to L and nothing is left to send: the tick frees it. */
static int lease_finished(const lease *l)
{
    return l->deleted && l->refs == 0 && !l->op_sent && !l->op_failed && l->queue.n == 0;
}

/* Redis no longer holds L (expired by the sweeper, lost, or unusable):
 * nothing in its queue can be charged. Calls still promised from it end
 * at cost 0 (lease_end). */
static void lease_lost(lease *l, int64_t available)
{
    lease_unlist(l);
    l->deleted = 1;
    l->amount = l->used = l->pending = 0;
    lease_recs_answer(l->queue.r, l->queue.n, 0, 0, available, 0);
    l->queue.n = 0;
}

static void lease_send(lease *l);

static void lease_on_reply(void *arg, int rc, const hot_lease_reply *v)
{
    lease *l = arg;
    lease_table *t = l->t;
    uint64_t now = worker_now_ms();
    l->op_sent = 0;
    if (t->down) {
        lease_answer_later(l);
        l->op_failed = 1;
        return;
    }
    if (rc != 0) {
        /* Maybe applied, maybe not: resent as it is (same seq) by the tick.
         * Its calls are answered now with the charge to come. */
        if (!l->op_failed)
            log_warn("lease %s of account %" PRId64 ": op %" PRId64 " unanswered, will resend",
                     l->lid, l->account, l->op_seq);
        l->op_failed = 1;
        /* Queued records too: none of them goes out before this op does. */
        lease_answer_later(l);
        return;
    }
    l->op_failed = 0;
    l->last_op_ms = now;
    if (v->status == 1 || v->status == 2) {
        l->pending -= l->op_charge;
        l->amount = v->amount;
        l->confirmed_ms = l->op_sent_ms;
        l->epoch = l->op_epoch;
        /* An op short of points charged its records in order as far as
         * the lease and the available points went (lease.lua): the calls
         * past that are answered as not charged, which they were not. */
        int charged_n = v->charged < 0 ? 0 : v->charged > l->op.n ? l->op.n : (int)v->charged;
        if (charged_n < l->op.n)
            log_warn("lease %s of account %" PRId64 ": op %" PRId64 " short of points: %d of %d "
                     "calls charged",
                     l->lid, l->account, l->op_seq, charged_n, l->op.n);
        lease_recs_answer(l->op.r, charged_n, 0, 1, v->available, 1);
        lease_recs_answer(l->op.r + charged_n, l->op.n - charged_n, 0, 1, v->available, 0);
        if (v->contended && !l->closing) {
            /* A reserve elsewhere is short while we hold points: give them
             * back now (lease.lua grants the account no lease while
             * contended). Later give-backs wait for the tick: an answer
             * that did not shrink the lease must not start a loop. */
            log_info("lease %s of account %" PRId64 ": contended, giving back", l->lid, l->account);
            l->closing = 1;
            l->want_op = 1;
        }
        if (!l->closing && l->amount == 0 && l->op_resize > 0 && l->used == 0 && l->pending == 0) {
            /* Spent out and refused more (too few points available): close
             * it; per-call holds serve the account, exact to the point. */
            l->closing = 1;
            l->want_op = 1;
            lease_unlist(l);
        }
        if (v->status == 1 && (l->op_close || l->op_seq == 1) && l->amount == 0 && l->op.n == 0) {
            l->deleted = 1; /* lease.lua dropped the field (or never made it) */
            lease_unlist(l);
        }
    } else {
        if (v->status == 0)
            log_warn("lease %s of account %" PRId64 ": gone from Redis (expired?): %d calls not "
                     "charged",
                     l->lid, l->account, l->op.n);
        else if (l->op_seq > 1 || v->status != -1)
            log_error("lease %s of account %" PRId64 ": unusable in Redis (status %" PRId64 ")",
                      l->lid, l->account, v->status);
        lease_recs_answer(l->op.r, l->op.n, 0, v->status < 0 ? HOT_STATUS_UNUSABLE : 0,
                          v->available, 0);
        if (v->status == 0 && (l->queue.n > 0 || l->refs > 0)) {
            /* Released by the sweeper while our ops failed (or it never
             * was): the records queued behind this op were answered with
             * the charge to come, so they are not dropped but go as late
             * ops, which charge them if the sweeper's mark says so (and
             * change nothing otherwise); calls still promised from it
             * likewise when they end. */
            lease_unlist(l);
            l->orphan = 1;
            l->closing = 1;
            l->amount = l->pending;
        } else {
            lease_lost(l, v->available);
        }
    }
    l->op.n = 0;
    if (l->orphan && l->queue.n == 0 && l->refs == 0 && !l->op_failed) {
        l->deleted = 1; /* nothing left to carry */
        l->amount = l->used = l->pending = 0;
    }
    if (!l->deleted && (l->want_op || l->queue.n > 0)) lease_schedule(l);
}

/* Builds and sends L's next op (or resends the failed one). */
static void lease_send(lease *l)
{
    lease_table *t = l->t;
    const char *recs[2 * HOT_LEASE_RECORDS_MAX];
    size_t lens[2 * HOT_LEASE_RECORDS_MAX];
    hot_lease_args a;
    if (t->down || l->op_sent || l->deleted) return;
    if (l->orphan && !l->op_failed && l->queue.n == 0) return; /* late ops carry records only */
    if (!l->op_failed) {
        int64_t charge = 0, freep;
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
                l->want_op = 1; /* the tick schedules it (not now: the flush loop) */
                return;
            }
            memcpy(l->op.r, l->queue.r, (size_t)n * sizeof *l->op.r);
            l->op.n = n;
            memmove(l->queue.r, l->queue.r + n, (size_t)(l->queue.n - n) * sizeof *l->queue.r);
            l->queue.n -= n;
        }
        l->want_op = 0;
        for (int i = 0; i < l->op.n; i++)
            charge += l->op.r[i].charge;
        l->op_seq = ++l->seq;
        l->op_charge = charge;
        l->op_busy = l->used + l->pending - charge;
        l->op_close = l->closing && l->op_busy == 0;
        /* A resend keeps the first send's time: the fence must not move on
         * a resend that lease.lua finds applied already (it renews nothing). */
        l->op_sent_ms = worker_now_ms();
        freep = lease_free_points(l);
        if (l->closing)
            l->op_resize = -freep; /* nothing is promised while closing */
        else if (hotclient_refusing(t->hc))
            l->op_resize = 0; /* no growth past the backlog bound (or queue full) */
        else if (freep < l->want / 2)
            l->op_resize = l->want - freep;
        else
            l->op_resize = 0;
        if (l->op_resize < 0 && freep <= 0) l->op_resize = 0;
        if (l->orphan) l->op_resize = l->op_busy = 0; /* lease.lua's late path reads neither */
    }
    for (int i = 0; i < l->op.n; i++) {
        recs[2 * i] = "c";
        lens[2 * i] = 1;
        recs[2 * i + 1] = l->op.r[i].text;
        lens[2 * i + 1] = l->op.r[i].len;
    }
    a = (hot_lease_args){.account = l->account,
                         .lid = l->lid,
                         .seq = l->op_seq,
                         .ttl_ms = t->cfg.ttl_ms,
                         .charge = l->op_charge,
                         .resize = l->op_resize,
                         .busy = l->op_busy,
                         /* An op with records goes as `late`, a normal op
                          * while the lease is there (lease.lua drops a lease
                          * only with an op carrying no record, so a closing
                          * op loses nothing). If the sweeper released the
                          * whole lease while our ops failed, their calls
                          * were answered with the charge to come, and
                          * lease.lua still charges them from the available
                          * points, once per seq: as '0' or '1' they would
                          * find no lease and be dropped. */
                         .close = l->op.n > 0 ? HOT_LEASE_LATE : l->op_close,
                         .nrec = 2 * l->op.n,
                         .recs = recs,
                         .lens = lens};
    l->op_epoch = hotclient_epoch(t->hc);
    if (hotclient_lease(t->hc, &a, lease_on_reply, l) == 0) {
        l->op_sent = 1;
        return;
    }
    if (!l->op_failed)
        log_warn("lease %s of account %" PRId64 ": redis away, op %" PRId64 " kept", l->lid,
                 l->account, l->op_seq);
    l->op_failed = 1;
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
        if (!l->op_sent && !l->op_failed && !l->deleted && !t->down) lease_send(l);
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
        if (lease_finished(l)) lease_free(l);
    }
    /* No callback runs below: a resend's calls were answered already, and a
     * new op is only scheduled. */
    TAILQ_FOREACH(l, &t->leases, all)
    {
        if (l->op_sent || l->deleted) continue;
        if (l->op_failed) {
            if (hotclient_up(t->hc)) lease_send(l);
            continue;
        }
        if (l->orphan) continue; /* its records schedule its ops */
        if (!l->closing && (t->closing || now - l->last_take_ms >= (uint64_t)t->cfg.idle_ms)) {
            l->closing = 1;
            lease_unlist(l);
        }
        if (l->closing && lease_free_points(l) > 0)
            lease_schedule(l);
        else if (l->closing && l->amount == 0 && l->refs == 0 && l->pending == 0)
            lease_schedule(l); /* the op that drops it from Redis */
        else if (now - l->last_op_ms >= LEASE_PROBE_MS)
            lease_schedule(l);
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
    int64_t seq = l->seq, charge;
    int lost = 0;
    if ((l->op_sent || l->op_failed) && l->op.n > 0) {
        for (int i = 0; i < l->op.n; i++) {
            recs[2 * i] = "c";
            lens[2 * i] = 1;
            recs[2 * i + 1] = l->op.r[i].text;
            lens[2 * i + 1] = l->op.r[i].len;
        }
        if (!sp || spill_lease_op(sp, l->account, l->lid, l->op_seq, l->op_charge, 2 * l->op.n,
                                  recs, lens) != 0)
            lost += l->op.n;
        seq = l->op_seq;
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
        int unsent = l->queue.n + ((l->op_sent || l->op_failed) ? l->op.n : 0);
        if (unsent > 0 && !l->deleted) {
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
        int unsent = l->queue.n + ((l->op_sent || l->op_failed) ? l->op.n : 0);
        if (unsent > 0 && !l->deleted && lease_spill(l, sp) > 0)
            log_error("lease %s: records missing from the drain's snapshot", l->lid);
    }
}

int lease_table_unsent(const lease_table *t)
{
    int n = 0;
    const lease *l;
    for (l = TAILQ_FIRST(&t->leases); l; l = TAILQ_NEXT(l, all))
        if (!l->deleted) n += l->queue.n + ((l->op_sent || l->op_failed) ? l->op.n : 0);
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
    *n = *points = 0;
    TAILQ_FOREACH(l, &t->leases, all)
    if (!l->deleted && l->amount > 0) {
        (*n)++;
        *points += l->amount - l->used;
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
    uint64_t now;
    /* Past the backlog bound (or a full resend queue) no call is served
     * from a lease either: the per-call reserve answers 503. */
    if (t->cfg.calls <= 0 || t->closing || t->down || hotclient_refusing(t->hc)) return NULL;
    l = lease_find(t, account);
    if (!l || l->closing || l->op_failed || l->deleted) return NULL;
    now = worker_now_ms();
    /* Fenced: only on what an answer on this very connection, recent
     * enough, says Redis holds (LEASE_FENCE_MS; and a reconnect may have
     * found a Redis that lost the lease). The next op or probe lifts it. */
    if (l->epoch == 0 || l->epoch != hotclient_epoch(t->hc) ||
        now - l->confirmed_ms >= LEASE_FENCE_MS) {
        lease_schedule(l);
        return NULL;
    }
    if (lease_free_points(l) < price) {
        lease_schedule(l); /* ask for more */
        return NULL;
    }
    l->used += price;
    l->refs++;
    l->last_take_ms = now;
    return l;
}

void lease_consider(lease_table *t, int64_t account, int64_t price, int64_t available)
{
    lease *l;
    unsigned char raw[16];
    int64_t want;
    if (t->cfg.calls <= 0 || t->closing || t->down || price <= 0 || hotclient_refusing(t->hc))
        return;
    if (price > INT64_MAX / t->cfg.calls / 4) return;
    want = t->cfg.calls * price;
    /* Only an account with room for several: lease.lua grants at most a
     * quarter of what is available, and a small balance is better served
     * by per-call holds, exact to the point. */
    if (available < 4 * want) return;
    l = lease_find(t, account);
    if (l) return;
    l = calloc(1, sizeof *l);
    if (!l) return;
    l->t = t;
    l->account = account;
    l->want = want;
    l->lid[0] = 'L';
    randombytes_buf(raw, sizeof raw);
    sodium_bin2hex(l->lid + 1, sizeof l->lid - 1, raw, sizeof raw);
    l->last_take_ms = l->last_op_ms = worker_now_ms();
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
    l->used -= price;
    l->refs--;
    if (charge < 0 || charge > price) charge = charge < 0 ? 0 : price;
    if (!commit) charge = 0;
    rec.charge = charge;
    len = snprintf(rec.text, sizeof rec.text, "%s|%" PRId64 "|%s|%" PRId64 "|%" PRId64 "|%s|%ld",
                   rid, l->account, route_id, charge, price, commit ? "commit" : "release", status);
    if (l->t->down) {
        hot_reply none = {{0}};
        if (cb) cb(arg, -1, &none);
        return;
    }
    if (l->deleted) {
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
    l->pending += charge;
    if (l->op_failed) {
        /* Redis is away: answered now with the charge to come, as settles are. */
        lease_recs_answer(&l->queue.r[l->queue.n - 1], 1, -1, 0, 0, 1);
    }
    lease_schedule(l);
}
