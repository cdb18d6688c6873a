/* leasecore.c: a point lease's accounting and decisions (see leasecore.h).
 * Owns the arithmetic and the rules; does no I/O, reads no clock and
 * allocates nothing: lease.c carries out what these functions decide. */
#include "gateway/leasecore.h"

#include <string.h>

int64_t leasecore_size(int64_t calls, int64_t price, int64_t available)
{
    int64_t want;
    if (calls <= 0 || price <= 0) return 0;
    if (price > INT64_MAX / calls / 4) return 0;
    want = calls * price;
    /* Only an account with room for several: lease.lua grants at most a
     * quarter of what is available, and a small balance is better served
     * by per-call holds, exact to the point. */
    if (available < 4 * want) return 0;
    return want;
}

void leasecore_init(leasecore *c, int64_t want, uint64_t now_ms)
{
    memset(c, 0, sizeof *c);
    c->want = want;
    c->last_take_ms = c->last_op_ms = now_ms;
    c->want_op = 1; /* seq 1: creates it, asking for WANT */
}

int64_t leasecore_free(const leasecore *c)
{
    return c->amount - c->used - c->pending;
}

leasecore_take_result leasecore_take(leasecore *c, int64_t price, uint64_t now_ms, unsigned epoch)
{
    if (c->closing || c->op_failed || c->deleted) return LEASECORE_CLOSED;
    /* Fenced: only on what an answer on this very connection, recent
     * enough, says Redis holds (LEASE_FENCE_MS; and a reconnect may have
     * found a Redis that lost the lease). The next op or probe lifts it. */
    if (c->epoch == 0 || c->epoch != epoch || now_ms - c->confirmed_ms >= LEASE_FENCE_MS) {
        c->want_op = 1;
        return LEASECORE_FENCED;
    }
    if (leasecore_free(c) < price) {
        c->want_op = 1; /* ask for more */
        return LEASECORE_SHORT;
    }
    c->used += price;
    c->refs++;
    c->last_take_ms = now_ms;
    return LEASECORE_TAKEN;
}

int64_t leasecore_end(leasecore *c, int64_t price, int64_t charge, int commit)
{
    /* A lost lease counts nothing (its figures were zeroed when Redis said
     * so): its calls still in flight end at cost 0 and leave used at 0. */
    if (!c->deleted) c->used -= price;
    c->refs--;
    if (charge < 0 || charge > price) charge = charge < 0 ? 0 : price;
    if (!commit) charge = 0;
    return charge;
}

void leasecore_queued(leasecore *c, int64_t charge)
{
    c->pending += charge;
    c->queued++;
    c->want_op = 1;
}

leasecore_send_what leasecore_send_what_now(const leasecore *c)
{
    if (c->op_sent || c->deleted) return LEASECORE_SEND_NONE;
    if (c->orphan && !c->op_failed && c->queued == 0)
        return LEASECORE_SEND_NONE; /* late ops carry records only */
    return c->op_failed ? LEASECORE_SEND_RESEND : LEASECORE_SEND_NEW;
}

void leasecore_op_defer(leasecore *c)
{
    c->want_op = 1; /* the tick schedules it (not now: the flush loop) */
}

void leasecore_op_build(leasecore *c, int n, int64_t charge, uint64_t now_ms, int refusing)
{
    int64_t freep;
    c->queued -= n;
    c->op_n = n;
    c->want_op = 0;
    c->op_seq = ++c->seq;
    c->op_charge = charge;
    c->op_busy = c->used + c->pending - charge;
    c->op_close = c->closing && c->op_busy == 0;
    /* A resend keeps the first send's time: the fence must not move on
     * a resend that lease.lua finds applied already (it renews nothing). */
    c->op_sent_ms = now_ms;
    freep = leasecore_free(c);
    if (c->closing)
        /* Nothing is promised while closing: give the free points back,
         * and ask for none when there are none (the sweeper took some
         * back: lease.lua tops the lease up to busy by itself). */
        c->op_resize = freep > 0 ? -freep : 0;
    else if (refusing)
        c->op_resize = 0; /* no growth past the backlog bound (or queue full) */
    else if (freep < c->want / 2)
        c->op_resize = c->want - freep;
    else
        c->op_resize = 0;
    if (c->orphan) c->op_resize = c->op_busy = 0; /* lease.lua's late path reads neither */
}

leasecore_op_mode leasecore_op_mode_of(const leasecore *c)
{
    /* An op with records goes as `late`, a normal op while the lease is
     * there (lease.lua drops a lease only with an op carrying no record, so
     * a closing op loses nothing). If the sweeper released the whole lease
     * while our ops failed, their calls were answered with the charge to
     * come, and lease.lua still charges them from the available points,
     * once per seq: as '0' or '1' they would find no lease and be dropped. */
    if (c->op_n > 0) return LEASECORE_OP_LATE;
    return c->op_close ? LEASECORE_OP_CLOSE : LEASECORE_OP_NORMAL;
}

void leasecore_op_sent(leasecore *c, unsigned epoch)
{
    c->op_epoch = epoch;
    c->op_sent = 1;
}

int leasecore_op_unsent(leasecore *c)
{
    int first = !c->op_failed;
    c->op_failed = 1;
    return first;
}

void leasecore_answer_begin(leasecore *c, int rc, const leasecore_reply *reply, uint64_t now_ms,
                            leasecore_answer *out)
{
    memset(out, 0, sizeof *out);
    c->op_sent = 0;
    if (rc != 0 || !reply) {
        /* Maybe applied, maybe not: resent as it is (same seq) by the tick.
         * Its calls are answered now with the charge to come; queued records
         * too: none of them goes out before this op does. */
        out->kind = LEASECORE_ANSWER_FAILED;
        out->first_failure = !c->op_failed;
        c->op_failed = 1;
        return;
    }
    out->reply = *reply;
    c->op_failed = 0;
    c->last_op_ms = now_ms;
    if (reply->status == 1 || reply->status == 2) {
        out->kind = LEASECORE_ANSWER_APPLIED;
        c->pending -= c->op_charge;
        c->amount = reply->amount;
        c->confirmed_ms = c->op_sent_ms;
        c->epoch = c->op_epoch;
        /* An op short of points charged its records in order as far as
         * the lease and the available points went (lease.lua): the calls
         * past that are answered as not charged, which they were not. */
        out->charged = reply->charged < 0         ? 0
                       : reply->charged > c->op_n ? c->op_n
                                                  : (int)reply->charged;
    } else {
        out->kind = LEASECORE_ANSWER_GONE;
    }
}

void leasecore_answer_done(leasecore *c, leasecore_answer *a)
{
    const leasecore_reply *v = &a->reply;
    if (a->kind == LEASECORE_ANSWER_FAILED) return;
    if (a->kind == LEASECORE_ANSWER_APPLIED) {
        if (v->contended && !c->closing) {
            /* A reserve elsewhere is short while we hold points: give them
             * back now (lease.lua grants the account no lease while
             * contended). Later give-backs wait for the tick: an answer
             * that did not shrink the lease must not start a loop. */
            a->contended = 1;
            c->closing = 1;
            c->want_op = 1;
        }
        if (!c->closing && c->amount == 0 && c->op_resize > 0 && c->used == 0 && c->pending == 0) {
            /* Spent out and refused more (too few points available): close
             * it; per-call holds serve the account, exact to the point. */
            c->closing = 1;
            c->want_op = 1;
            a->unlist = 1;
        }
        if (v->status == 1 && (c->op_close || c->op_seq == 1) && c->amount == 0 && c->op_n == 0) {
            c->deleted = 1; /* lease.lua dropped the field (or never made it) */
            a->unlist = 1;
        }
    } else if (v->status == 0 && (c->queued > 0 || c->refs > 0)) {
        /* Released by the sweeper while our ops failed (or it never
         * was): the records queued behind this op were answered with
         * the charge to come, so they are not dropped but go as late
         * ops, which charge them if the sweeper's mark says so (and
         * change nothing otherwise); calls still promised from it
         * likewise when they end. The op's own records were answered not
         * charged: their charges are pending no more. */
        a->unlist = 1;
        c->orphan = 1;
        c->closing = 1;
        c->pending -= c->op_charge;
        c->amount = c->pending;
    } else {
        /* Redis no longer holds it (expired by the sweeper, lost, or
         * unusable): nothing queued can be charged. Calls still promised
         * from it end at cost 0 (leasecore_end). */
        a->unlist = 1;
        a->lost = 1;
        c->deleted = 1;
        c->amount = c->used = c->pending = 0;
        /* queued stays until leasecore_queue_dropped: the caller answers
         * those records after this returns. */
    }
    c->op_n = 0;
    if (c->orphan && c->queued == 0 && c->refs == 0 && !c->op_failed) {
        c->deleted = 1; /* nothing left to carry */
        c->amount = c->used = c->pending = 0;
    }
    if (!c->deleted && (c->want_op || c->queued > 0)) {
        c->want_op = 1;
        a->schedule = 1;
    }
}

void leasecore_queue_dropped(leasecore *c)
{
    c->queued = 0;
}

int leasecore_tick(leasecore *c, uint64_t now_ms, int64_t idle_ms, int closing)
{
    int flags = 0;
    if (c->op_sent || c->deleted) return 0;
    if (c->op_failed) return LEASECORE_TICK_RESEND;
    if (c->orphan) return 0; /* its records schedule its ops */
    if (!c->closing && (closing || now_ms - c->last_take_ms >= (uint64_t)idle_ms)) {
        c->closing = 1;
        flags |= LEASECORE_TICK_UNLIST;
    }
    if ((c->closing && leasecore_free(c) > 0) ||
        (c->closing && c->amount == 0 && c->refs == 0 && c->pending == 0) /* the op that drops it */
        || now_ms - c->last_op_ms >= LEASE_PROBE_MS) {
        c->want_op = 1;
        flags |= LEASECORE_TICK_SCHEDULE;
    }
    return flags;
}

int leasecore_finished(const leasecore *c)
{
    return c->deleted && c->refs == 0 && !c->op_sent && !c->op_failed && c->queued == 0;
}

int leasecore_unsent(const leasecore *c)
{
    if (c->deleted) return 0;
    return c->queued + ((c->op_sent || c->op_failed) ? c->op_n : 0);
}

int leasecore_held(const leasecore *c, int64_t *points)
{
    if (c->deleted || c->amount <= 0) return 0;
    *points = c->amount - c->used;
    return 1;
}
