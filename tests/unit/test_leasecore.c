/* test_leasecore.c: the lease core (gateway/leasecore.c) on its own, the
 * way test_http1req.c tests the parser. (a) Tables of scenarios, each a
 * sequence of events (take, end, send, answer, tick, time, reconnect) and
 * checks of the figures after them: promises within the free points,
 * refusal when short, the fence after silence and across a reconnect, op
 * numbering and the resend with the same seq, an answer applied once, a
 * lease gone with records waiting (orphan, late ops), give-back when idle,
 * contended or closing, growth, a lease that is spent out; and
 * leasecore_size. (b) Random sequences (seeded PRNG; LEASECORE_SEED=N runs
 * one seed; the seed of a failing run is printed) of the same events
 * against a model of lease.lua (seq dedupe, busy top-up, growth, give-back,
 * drop on close, the sweeper's release and swept mark, late ops), checked
 * after every step against the invariants listed at check_world. Does not
 * test lease.c (test_lease.c, the e2e tests). Needs no service. Exit 0
 * when every check holds. */
#include "gateway/leasecore.h"
#include "tests/unit/check.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- (a) tables ------------------------------------------------------- */

enum {
    T_END_OF = 0,
    /* events; `want` is the result expected */
    T_INIT,      /* x = want */
    T_TAKE,      /* x = price -> leasecore_take_result */
    T_END,       /* x = price, y = charge, committed -> the charge recorded */
    T_RELEASE,   /* x = price, y = charge, released -> the charge recorded */
    T_SEND,      /* flush or tick: -> leasecore_send_what; built and sent */
    T_SENDFAIL,  /* same, but hotclient cannot send it (Redis away) */
    T_REPLY,     /* x = status, y = amount, z = contended; every record charged */
    T_REPLYN,    /* x = status, y = amount, z = records charged */
    T_FAIL,      /* no usable reply -> first_failure */
    T_TICK,      /* -> LEASECORE_TICK_* flags */
    T_CLOSETICK, /* the tick of a closing table */
    T_AT,        /* time moves by x ms */
    T_EPOCH,     /* Redis connection x */
    T_REFUSING,  /* hotclient refusing: x */
    /* checks: `want` is the figure */
    C_AMOUNT,
    C_USED,
    C_PENDING,
    C_FREE,
    C_SEQ,
    C_OPSEQ,
    C_CHARGE,
    C_RESIZE,
    C_BUSY,
    C_MODE,
    C_CLOSING,
    C_DELETED,
    C_ORPHAN,
    C_QUEUED,
    C_WANTOP,
    C_FINISHED,
    C_UNSENT,
    C_CHARGED, /* records the last answer charged */
    C_UNLIST,  /* the last answer took it out of the table */
};

typedef struct step {
    int ev;
    int64_t x, y, z;
    int64_t want;
} step;

typedef struct scenario {
    const char *name;
    const step *steps;
} scenario;

#define INIT(w)                                                                                    \
    {                                                                                              \
        T_INIT, w, 0, 0, 0                                                                         \
    }
#define TAKE(p, r)                                                                                 \
    {                                                                                              \
        T_TAKE, p, 0, 0, r                                                                         \
    }
#define END(p, c, r)                                                                               \
    {                                                                                              \
        T_END, p, c, 0, r                                                                          \
    }
#define RELEASE(p, c)                                                                              \
    {                                                                                              \
        T_RELEASE, p, c, 0, 0                                                                      \
    }
#define SEND(r)                                                                                    \
    {                                                                                              \
        T_SEND, 0, 0, 0, r                                                                         \
    }
#define SENDFAIL(r)                                                                                \
    {                                                                                              \
        T_SENDFAIL, 0, 0, 0, r                                                                     \
    }
#define REPLY(s, a, r)                                                                             \
    {                                                                                              \
        T_REPLY, s, a, 0, r                                                                        \
    }
#define REPLYC(s, a, r)                                                                            \
    {                                                                                              \
        T_REPLY, s, a, 1, r                                                                        \
    }
#define REPLYN(s, a, n, r)                                                                         \
    {                                                                                              \
        T_REPLYN, s, a, n, r                                                                       \
    }
#define FAIL(first)                                                                                \
    {                                                                                              \
        T_FAIL, 0, 0, 0, first                                                                     \
    }
#define TICK(f)                                                                                    \
    {                                                                                              \
        T_TICK, 0, 0, 0, f                                                                         \
    }
#define CLOSETICK(f)                                                                               \
    {                                                                                              \
        T_CLOSETICK, 0, 0, 0, f                                                                    \
    }
#define AT(ms)                                                                                     \
    {                                                                                              \
        T_AT, ms, 0, 0, 0                                                                          \
    }
#define EPOCH(e)                                                                                   \
    {                                                                                              \
        T_EPOCH, e, 0, 0, 0                                                                        \
    }
#define REFUSING(r)                                                                                \
    {                                                                                              \
        T_REFUSING, r, 0, 0, 0                                                                     \
    }
#define IS(what, v)                                                                                \
    {                                                                                              \
        what, 0, 0, 0, v                                                                           \
    }
#define DONE                                                                                       \
    {                                                                                              \
        T_END_OF, 0, 0, 0, 0                                                                       \
    }

enum { NEW = LEASECORE_SEND_NEW, RESEND = LEASECORE_SEND_RESEND, NONE = LEASECORE_SEND_NONE };
enum { TAKEN = LEASECORE_TAKEN, CLOSED = LEASECORE_CLOSED, FENCED = LEASECORE_FENCED };
enum { SHORT = LEASECORE_SHORT, APPLIED = LEASECORE_ANSWER_APPLIED, GONE = LEASECORE_ANSWER_GONE };
enum { SCHED = LEASECORE_TICK_SCHEDULE, UNLIST = LEASECORE_TICK_UNLIST };
enum { NORMAL = LEASECORE_OP_NORMAL, CLOSE = LEASECORE_OP_CLOSE, LATE = LEASECORE_OP_LATE };

#define IDLE_MS 1000

/* A lease created and answered with 100 points at t = 10000. */
#define READY INIT(100), SEND(NEW), REPLY(1, 100, APPLIED)

static const step promise_within_free[] = {
    INIT(100),
    TAKE(10, FENCED), /* no answer yet */
    IS(C_WANTOP, 1),
    SEND(NEW),
    IS(C_OPSEQ, 1),
    IS(C_RESIZE, 100),
    IS(C_MODE, NORMAL),
    IS(C_BUSY, 0),
    REPLY(1, 100, APPLIED),
    IS(C_AMOUNT, 100),
    IS(C_FREE, 100),
    TAKE(10, TAKEN),
    IS(C_USED, 10),
    IS(C_FREE, 90),
    TAKE(90, TAKEN),
    IS(C_FREE, 0),
    TAKE(1, SHORT), /* refused when short: an op asking for more is due */
    IS(C_WANTOP, 1),
    END(10, 7, 7),
    IS(C_USED, 90),
    IS(C_PENDING, 7),
    IS(C_FREE, 3),
    IS(C_QUEUED, 1),
    RELEASE(90, 90), /* a release charges nothing */
    IS(C_USED, 0),
    IS(C_PENDING, 7),
    IS(C_FREE, 93),
    IS(C_QUEUED, 2),
    SEND(NEW),
    IS(C_OPSEQ, 2),
    IS(C_CHARGE, 7),
    IS(C_BUSY, 0),
    IS(C_RESIZE, 0), /* 93 free: no growth */
    IS(C_MODE, LATE),
    IS(C_QUEUED, 0),
    IS(C_UNSENT, 2),
    REPLY(1, 93, APPLIED),
    IS(C_AMOUNT, 93),
    IS(C_PENDING, 0),
    IS(C_FREE, 93),
    IS(C_CHARGED, 2),
    IS(C_UNSENT, 0),
    TAKE(5, TAKEN),
    END(5, 9, 5), /* a charge above the price is the price */
    TAKE(5, TAKEN),
    END(5, -3, 0),
    IS(C_PENDING, 5),
    TAKE(94, SHORT),
    TAKE(88, TAKEN),
    IS(C_FREE, 0),
    DONE,
};

static const step fence_after_silence[] = {
    READY,
    AT(1499),
    TAKE(1, TAKEN),
    AT(1),
    TAKE(1, FENCED), /* 1500 ms after the last answered op was sent */
    IS(C_WANTOP, 1),
    SEND(NEW),
    REPLY(1, 100, APPLIED),
    TAKE(1, TAKEN),
    EPOCH(2),
    TAKE(1, FENCED), /* a reconnect: the new Redis may not have it */
    SEND(NEW),
    REPLY(1, 100, APPLIED),
    TAKE(1, TAKEN),
    /* A resend keeps the first send's time. */
    SENDFAIL(NEW), /* op 4 built at 11500 */
    AT(1000),
    TICK(LEASECORE_TICK_RESEND),
    TAKE(1, CLOSED), /* nothing promised while an op failed */
    SEND(RESEND),
    IS(C_OPSEQ, 4),
    REPLY(2, 100, APPLIED),
    AT(499),
    TAKE(1, TAKEN),
    AT(1),
    TAKE(1, FENCED),
    DONE,
};

static const step numbering_and_resend[] = {
    READY,
    IS(C_SEQ, 1),
    TAKE(10, TAKEN),
    END(10, 10, 10),
    SEND(NEW),
    IS(C_OPSEQ, 2),
    IS(C_CHARGE, 10),
    FAIL(1),
    IS(C_UNSENT, 1),
    IS(C_PENDING, 10),
    TAKE(1, CLOSED),
    TICK(LEASECORE_TICK_RESEND),
    SENDFAIL(RESEND), /* Redis away again: no new number */
    IS(C_OPSEQ, 2),
    IS(C_SEQ, 2),
    TICK(LEASECORE_TICK_RESEND),
    SEND(RESEND),
    FAIL(0), /* failed before: not logged again */
    SEND(RESEND),
    IS(C_OPSEQ, 2),
    IS(C_CHARGE, 10),
    /* Applied by an earlier send: status 2, its charge leaves pending once. */
    REPLY(2, 90, APPLIED),
    IS(C_PENDING, 0),
    IS(C_AMOUNT, 90),
    IS(C_FREE, 90),
    IS(C_SEQ, 2),
    TAKE(1, TAKEN),
    END(1, 1, 1),
    SEND(NEW),
    IS(C_OPSEQ, 3),
    IS(C_SEQ, 3),
    SEND(NONE), /* one op at a time */
    REPLY(1, 89, APPLIED),
    DONE,
};

static const step short_op[] = {
    READY,
    TAKE(10, TAKEN),
    END(10, 10, 10),
    TAKE(10, TAKEN),
    END(10, 10, 10),
    TAKE(10, TAKEN),
    END(10, 10, 10),
    SEND(NEW),
    IS(C_CHARGE, 30),
    REPLYN(1, 80, 1, APPLIED), /* only the first record fitted */
    IS(C_CHARGED, 1),
    IS(C_PENDING, 0),
    IS(C_AMOUNT, 80),
    DONE,
};

static const step gone_with_records_waiting[] = {
    READY,
    TAKE(1, TAKEN),
    END(1, 1, 1),
    SEND(NEW), /* op 2 */
    TAKE(1, TAKEN),
    END(1, 1, 1), /* queued behind it */
    IS(C_PENDING, 2),
    FAIL(1),
    SEND(RESEND),
    REPLY(0, 0, GONE), /* swept while it failed */
    IS(C_ORPHAN, 1),
    IS(C_CLOSING, 1),
    IS(C_DELETED, 0),
    IS(C_UNLIST, 1),
    IS(C_QUEUED, 1),
    IS(C_PENDING, 1),
    IS(C_WANTOP, 1),
    TAKE(1, CLOSED),
    TICK(0), /* an orphan's records schedule its ops, nothing else */
    SEND(NEW),
    IS(C_OPSEQ, 3),
    IS(C_MODE, LATE),
    IS(C_RESIZE, 0),
    IS(C_BUSY, 0),
    IS(C_CHARGE, 1),
    REPLY(1, 0, APPLIED), /* charged against the swept mark */
    IS(C_DELETED, 1),
    IS(C_FINISHED, 1),
    IS(C_UNSENT, 0),
    DONE,
};

static const step gone_with_a_call_in_flight[] = {
    READY,
    TAKE(5, TAKEN),
    TAKE(1, TAKEN),
    END(1, 1, 1),
    SEND(NEW),
    REPLY(0, 0, GONE),
    IS(C_ORPHAN, 1),
    IS(C_QUEUED, 0),
    SEND(NONE), /* nothing to carry yet */
    END(5, 3, 3),
    IS(C_QUEUED, 1),
    SEND(NEW),
    IS(C_MODE, LATE),
    IS(C_CHARGE, 3),
    IS(C_OPSEQ, 3),
    REPLY(1, 0, APPLIED),
    IS(C_DELETED, 1),
    IS(C_FINISHED, 1),
    DONE,
};

static const step gone_for_good[] = {
    READY,
    TAKE(5, TAKEN), /* still in flight when the lease is lost */
    TAKE(1, TAKEN),
    END(1, 1, 1),
    SEND(NEW),
    TAKE(1, TAKEN),
    END(1, 1, 1),
    IS(C_QUEUED, 1),
    REPLY(-2, 0, GONE), /* unusable: nothing queued can be charged */
    IS(C_DELETED, 1),
    IS(C_ORPHAN, 0),
    IS(C_QUEUED, 0),
    IS(C_AMOUNT, 0),
    IS(C_USED, 0),
    IS(C_PENDING, 0),
    IS(C_UNSENT, 0),
    IS(C_FINISHED, 0), /* a call still refers to it */
    TAKE(1, CLOSED),
    END(5, 5, 5), /* not queued: cost 0 */
    IS(C_USED, 0),
    IS(C_FINISHED, 1),
    SEND(NONE),
    TICK(0),
    DONE,
};

static const step give_back_when_contended[] = {
    READY,
    TAKE(10, TAKEN),
    SEND(NEW),
    IS(C_RESIZE, 0),
    IS(C_BUSY, 10),
    REPLYC(1, 100, APPLIED),
    IS(C_CLOSING, 1),
    IS(C_WANTOP, 1),
    IS(C_UNLIST, 0), /* stays in the table: no new lease while it gives back */
    TAKE(1, CLOSED),
    SEND(NEW),
    IS(C_RESIZE, -90), /* the free points back; the promise stays */
    IS(C_BUSY, 10),
    IS(C_MODE, NORMAL),
    REPLY(1, 10, APPLIED),
    IS(C_FREE, 0),
    END(10, 10, 10),
    SEND(NEW),
    IS(C_CHARGE, 10),
    IS(C_BUSY, 0),
    IS(C_RESIZE, 0),
    IS(C_MODE, LATE), /* records: never the op that drops it */
    REPLY(1, 0, APPLIED),
    IS(C_DELETED, 0),
    TICK(SCHED), /* closing and empty: the op that drops it */
    SEND(NEW),
    IS(C_MODE, CLOSE),
    IS(C_CHARGE, 0),
    REPLY(1, 0, APPLIED),
    IS(C_DELETED, 1),
    IS(C_FINISHED, 1),
    DONE,
};

static const step give_back_when_idle[] = {
    READY,
    TICK(0),
    AT(LEASE_PROBE_MS),
    TICK(SCHED), /* renewal */
    AT(IDLE_MS - LEASE_PROBE_MS),
    TICK(UNLIST | SCHED),
    IS(C_CLOSING, 1),
    TAKE(1, CLOSED),
    SEND(NEW),
    IS(C_RESIZE, -100),
    IS(C_MODE, CLOSE),
    REPLY(1, 0, APPLIED),
    IS(C_DELETED, 1),
    IS(C_UNLIST, 1),
    DONE,
};

static const step give_back_when_closing[] = {
    READY,
    TAKE(1, TAKEN),
    CLOSETICK(UNLIST | SCHED),
    TAKE(1, CLOSED),
    SEND(NEW),
    IS(C_RESIZE, -99),
    IS(C_BUSY, 1),
    IS(C_MODE, NORMAL), /* a call in flight: not the op that drops it */
    REPLY(1, 1, APPLIED),
    END(1, 1, 1),
    SEND(NEW),
    IS(C_MODE, LATE),
    REPLY(1, 0, APPLIED),
    CLOSETICK(SCHED),
    SEND(NEW),
    IS(C_MODE, CLOSE),
    REPLY(1, 0, APPLIED),
    IS(C_DELETED, 1),
    DONE,
};

static const step growth[] = {
    READY,
    TAKE(60, TAKEN),
    END(60, 60, 60),
    IS(C_FREE, 40),
    SEND(NEW),
    IS(C_RESIZE, 60), /* below half of want: back up to want */
    IS(C_CHARGE, 60),
    REPLY(1, 100, APPLIED),
    IS(C_FREE, 100),
    TAKE(50, TAKEN),
    END(50, 50, 50),
    SEND(NEW),
    IS(C_RESIZE, 0), /* half is enough */
    REPLY(1, 50, APPLIED),
    REFUSING(1),
    TAKE(10, TAKEN),
    END(10, 10, 10),
    SEND(NEW),
    IS(C_RESIZE, 0), /* no growth past the backlog bound */
    REPLY(1, 40, APPLIED),
    REFUSING(0),
    TICK(0),
    AT(LEASE_PROBE_MS),
    TICK(SCHED),
    SEND(NEW),
    IS(C_RESIZE, 60),
    DONE,
};

static const step spent_out[] = {
    READY,
    TAKE(100, TAKEN),
    END(100, 100, 100),
    SEND(NEW),
    IS(C_RESIZE, 100),
    REPLY(1, 0, APPLIED), /* charged, and refused more */
    IS(C_CLOSING, 1),
    IS(C_UNLIST, 1),
    IS(C_WANTOP, 1),
    IS(C_DELETED, 0),
    SEND(NEW),
    IS(C_MODE, CLOSE),
    REPLY(1, 0, APPLIED),
    IS(C_DELETED, 1),
    DONE,
};

static const step granted_nothing[] = {
    INIT(100),        SEND(NEW),         REPLY(1, 0, APPLIED), /* lease.lua never made it */
    IS(C_DELETED, 1), IS(C_FINISHED, 1), TAKE(1, CLOSED),      DONE,
};

static const scenario scenarios[] = {
    {"promise within free, refusal when short", promise_within_free},
    {"fence after silence, reconnect, resend", fence_after_silence},
    {"op numbering, resend with the same seq, applied once", numbering_and_resend},
    {"an op short of points", short_op},
    {"lease gone with records waiting: orphan, late op", gone_with_records_waiting},
    {"lease gone with a call in flight", gone_with_a_call_in_flight},
    {"lease gone for good", gone_for_good},
    {"give back when contended", give_back_when_contended},
    {"give back when idle", give_back_when_idle},
    {"give back when the table closes", give_back_when_closing},
    {"growth when the account has plenty", growth},
    {"spent out", spent_out},
    {"creation granted nothing", granted_nothing},
};

/* The table driver: lease.c's part reduced to counts and charges. */
typedef struct drive {
    leasecore c;
    uint64_t now;
    unsigned epoch;
    int refusing;
    int64_t q[64], op[64];
    int nq, nop;
    leasecore_answer last;
} drive;

static void drive_send(drive *d, int ok, leasecore_send_what w)
{
    if (w == LEASECORE_SEND_NEW) {
        int64_t charge = 0;
        for (int i = 0; i < d->nq; i++)
            charge += d->op[i] = d->q[i];
        d->nop = d->nq;
        leasecore_op_build(&d->c, d->nq, charge, d->now, d->refusing);
        d->nq = 0;
    }
    if (w == LEASECORE_SEND_NONE) return;
    if (ok)
        leasecore_op_sent(&d->c, d->epoch);
    else
        (void)leasecore_op_unsent(&d->c);
}

static void drive_answer(drive *d, int rc, int64_t status, int64_t amount, int64_t contended,
                         int64_t charged)
{
    leasecore_reply r = {status, amount, contended, charged};
    leasecore_answer_begin(&d->c, rc, &r, d->now, &d->last);
    if (d->last.kind == LEASECORE_ANSWER_FAILED) return;
    leasecore_answer_done(&d->c, &d->last);
    d->nop = 0;
    if (d->last.lost) {
        CHECK(!leasecore_finished(&d->c) || d->nq == 0); /* not freed under its callbacks */
        d->nq = 0;
        leasecore_queue_dropped(&d->c);
    }
}

/* Runs one event or check; returns what it yields, for `want`. */
static int64_t drive_step(drive *d, const step *s)
{
    leasecore *c = &d->c;
    int64_t r;
    switch (s->ev) {
    case T_INIT:
        leasecore_init(c, s->x, d->now);
        return 0;
    case T_TAKE:
        return leasecore_take(c, s->x, d->now, d->epoch);
    case T_END:
    case T_RELEASE:
        r = leasecore_end(c, s->x, s->y, s->ev == T_END);
        if (!c->deleted) {
            d->q[d->nq++] = r;
            leasecore_queued(c, r);
        }
        return s->ev == T_END ? r : 0;
    case T_SEND:
    case T_SENDFAIL:
        r = leasecore_send_what_now(c);
        drive_send(d, s->ev == T_SEND, (leasecore_send_what)r);
        return r;
    case T_REPLY:
        drive_answer(d, 0, s->x, s->y, s->z, d->nop);
        return d->last.kind;
    case T_REPLYN:
        drive_answer(d, 0, s->x, s->y, 0, s->z);
        return d->last.kind;
    case T_FAIL:
        drive_answer(d, -1, 0, 0, 0, 0);
        return d->last.first_failure;
    case T_TICK:
    case T_CLOSETICK:
        return leasecore_tick(c, d->now, IDLE_MS, s->ev == T_CLOSETICK);
    case T_AT:
        d->now += (uint64_t)s->x;
        return 0;
    case T_EPOCH:
        d->epoch = (unsigned)s->x;
        return 0;
    case T_REFUSING:
        d->refusing = (int)s->x;
        return 0;
    case C_AMOUNT:
        return c->amount;
    case C_USED:
        return c->used;
    case C_PENDING:
        return c->pending;
    case C_FREE:
        return leasecore_free(c);
    case C_SEQ:
        return c->seq;
    case C_OPSEQ:
        return c->op_seq;
    case C_CHARGE:
        return c->op_charge;
    case C_RESIZE:
        return c->op_resize;
    case C_BUSY:
        return c->op_busy;
    case C_MODE:
        return leasecore_op_mode_of(c);
    case C_CLOSING:
        return c->closing;
    case C_DELETED:
        return c->deleted;
    case C_ORPHAN:
        return c->orphan;
    case C_QUEUED:
        return c->queued;
    case C_WANTOP:
        return c->want_op;
    case C_FINISHED:
        return leasecore_finished(c);
    case C_UNSENT:
        return leasecore_unsent(c);
    case C_CHARGED:
        return d->last.charged;
    case C_UNLIST:
        return d->last.unlist;
    }
    return -999;
}

static void test_scenarios(void)
{
    for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++) {
        drive d;
        memset(&d, 0, sizeof d);
        d.now = 10000;
        d.epoch = 1;
        for (int k = 0; scenarios[i].steps[k].ev != T_END_OF; k++) {
            const step *s = &scenarios[i].steps[k];
            int64_t got = drive_step(&d, s);
            if (got != s->want) {
                fprintf(stderr,
                        "scenario \"%s\", step %d (event %d): got %" PRId64 ", want %" PRId64 "\n",
                        scenarios[i].name, k, s->ev, got, s->want);
                failures++;
                break;
            }
            /* Whatever the scenario, never promised past the free points. */
            if (!d.c.deleted && !d.c.orphan) CHECK(d.c.used + d.c.pending <= d.c.amount);
        }
    }
}

static void test_size(void)
{
    static const struct {
        int64_t calls, price, available, want;
    } t[] = {
        {0, 1, 1 << 30, 0},                   /* leases off */
        {256, 0, 1 << 30, 0},                 /* a free call */
        {256, 2, 4 * 512 - 1, 0},             /* not room for four */
        {256, 2, 4 * 512, 512},               /* just */
        {256, INT64_MAX / 512, INT64_MAX, 0}, /* would overflow */
        {1, 10, 1000, 10},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        CHECK(leasecore_size(t[i].calls, t[i].price, t[i].available) == t[i].want);
}

/* ---- (b) random sequences ---------------------------------------------- */

#define RUNS 1500
#define STEPS 400
#define MAXREC (STEPS + 64)
#define MAXCALLS 64
#define OP_RECORDS 8 /* a small HOT_LEASE_RECORDS_MAX: ops split the queue */

enum { R_WAITING, R_LATER, R_CHARGED, R_NOTCHARGED };

typedef struct rrec {
    int64_t charge;
    int state; /* the call's first answer (lease.c runs a callback once) */
    int redis; /* times the Redis model charged it */
} rrec;

typedef struct world {
    uint64_t rng;
    leasecore c;
    uint64_t now;
    unsigned epoch;
    int down, contended, unusable_seen;
    /* lease.c's part */
    rrec recs[MAXREC];
    int nrecs;
    int q[MAXREC], nq;
    int op[OP_RECORDS], nop;
    int64_t calls[MAXCALLS];
    int ncalls;
    int dirty; /* lease_schedule was called */
    /* the op on its way, as sent */
    int inflight;
    unsigned sent_epoch;
    uint64_t built_ms;
    int64_t last_seq; /* of the last op built */
    int64_t s_seq, s_charge, s_resize, s_busy;
    int s_n, s_mode;
    /* the test's own view of the fence and of closing */
    uint64_t confirmed_ms;
    unsigned confirmed_epoch;
    int closed_seen;
    /* the Redis model (lease.lua) */
    int exists;
    int64_t amount, stored_seq, mark; /* mark: the swept mark, -1 none */
    int64_t rfree;                    /* the lease's free points as of its last op */
    uint64_t applied_ms;              /* when its last op ran: the soft deadline is 3000 ms later */
    int reclaimed;                    /* since, no op built after it was applied */
    uint64_t reclaimed_ms;
    int64_t available;
} world;

static uint64_t rnd(world *w)
{
    /* xorshift64*: small, fast, and the same on every platform */
    w->rng ^= w->rng >> 12;
    w->rng ^= w->rng << 25;
    w->rng ^= w->rng >> 27;
    return w->rng * 0x2545F4914F6CDD1DULL;
}

static int64_t rnd_in(world *w, int64_t lo, int64_t hi)
{
    return lo + (int64_t)(rnd(w) % (uint64_t)(hi - lo + 1));
}

static int run_failed;
#define WCHECK(cond)                                                                               \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            if (run_failed++ < 5)                                                                  \
                fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);           \
        }                                                                                          \
    } while (0)

/* A call's answer; only the first counts (later ones find its callback
 * run, as lease_recs_answer does). */
static void answer_rec(world *w, int i, int state)
{
    rrec *r = &w->recs[i];
    if (r->state != R_WAITING) return;
    r->state = state;
    if (state == R_CHARGED) WCHECK(r->redis == 1);
    if (state == R_NOTCHARGED) WCHECK(r->redis == 0);
}

/* Redis is away: every call waiting is answered with the charge to come. */
static void answer_later(world *w)
{
    for (int i = 0; i < w->nop; i++)
        answer_rec(w, w->op[i], R_LATER);
    for (int i = 0; i < w->nq; i++)
        answer_rec(w, w->q[i], R_LATER);
}

static void charge_recs(world *w, int n)
{
    for (int i = 0; i < n; i++) {
        rrec *r = &w->recs[w->op[i]];
        r->redis++;
        WCHECK(r->redis == 1); /* never charged twice */
        w->available -= r->charge;
    }
}

/* lease.lua on the op as sent (the points are ample: no short op). */
static leasecore_reply redis_apply(world *w)
{
    leasecore_reply v = {0, 0, w->contended, 0};
    int64_t amt, nw;
    if (w->exists && w->stored_seq >= w->s_seq) {
        v.status = 2; /* a resend of an op applied */
        v.amount = w->amount;
        v.charged = w->s_n;
        return v;
    }
    if (!w->exists) {
        if (w->s_mode == LEASECORE_OP_LATE) {
            if (w->mark < 0 || w->mark >= w->s_seq) return v;
            charge_recs(w, w->s_n);
            w->mark = w->s_seq;
            v.status = 1;
            v.charged = w->s_n;
            return v;
        }
        if (w->s_seq != 1) return v;
        WCHECK(w->s_charge == 0 && w->s_n == 0); /* a new lease has nothing to settle */
    }
    amt = w->exists ? w->amount : 0;
    if (w->s_charge > amt) amt = w->s_charge; /* from the available points */
    nw = amt - w->s_charge;
    if (w->s_busy > nw) nw = w->s_busy;
    if (w->s_resize > 0 && !w->contended && w->available >= 4) {
        int64_t grant = w->available / 4;
        nw += grant < w->s_resize ? grant : w->s_resize;
    } else if (w->s_resize < 0 && nw > w->s_busy) {
        int64_t back = -w->s_resize;
        nw -= nw - w->s_busy < back ? nw - w->s_busy : back;
    }
    charge_recs(w, w->s_n);
    if (nw == 0 && w->s_busy == 0 && w->s_n == 0 &&
        (w->s_mode == LEASECORE_OP_CLOSE || !w->exists)) {
        w->exists = 0; /* dropped (or never made) */
    } else {
        w->exists = 1;
        w->amount = nw;
        w->stored_seq = w->s_seq;
        w->rfree = nw > w->s_busy ? nw - w->s_busy : 0;
        w->applied_ms = w->now;
    }
    v.status = 1;
    v.amount = nw;
    v.charged = w->s_n;
    return v;
}

static void send_op(world *w, leasecore_send_what what)
{
    leasecore *c = &w->c;
    if (what == LEASECORE_SEND_NEW) {
        int n = w->nq < OP_RECORDS ? w->nq : OP_RECORDS;
        int64_t charge = 0;
        for (int i = 0; i < n; i++) {
            w->op[i] = w->q[i];
            charge += w->recs[w->q[i]].charge;
        }
        memmove(w->q, w->q + n, (size_t)(w->nq - n) * sizeof w->q[0]);
        w->nq -= n;
        w->nop = n;
        leasecore_op_build(c, n, charge, w->now, 0);
        /* A new op has the next number. */
        WCHECK(c->op_seq == w->last_seq + 1 && c->seq == c->op_seq);
        w->last_seq = c->op_seq;
        w->built_ms = w->now;
        w->s_seq = c->op_seq;
        w->s_charge = c->op_charge;
        w->s_resize = c->op_resize;
        w->s_busy = c->op_busy;
        w->s_n = c->op_n;
        w->s_mode = leasecore_op_mode_of(c);
        WCHECK(w->s_n == n);
        WCHECK(c->op_charge <= c->pending);
        /* A closing lease never asks for more points. */
        if (c->closing) WCHECK(c->op_resize <= 0);
        /* An op that could drop the lease carries no record. */
        if (w->s_mode == LEASECORE_OP_CLOSE) WCHECK(w->s_n == 0);
        if (w->s_n > 0) WCHECK(w->s_mode == LEASECORE_OP_LATE);
    } else {
        /* A resend repeats the op as it was. */
        WCHECK(c->op_seq == w->s_seq && c->seq == w->last_seq && c->op_charge == w->s_charge &&
               c->op_resize == w->s_resize && c->op_busy == w->s_busy && c->op_n == w->s_n &&
               (int)leasecore_op_mode_of(c) == w->s_mode);
    }
    if (w->down) {
        (void)leasecore_op_unsent(c);
        answer_later(w);
        return;
    }
    leasecore_op_sent(c, w->epoch);
    w->sent_epoch = w->epoch;
    w->inflight = 1;
}

/* The op's answer reaches the worker: APPLY says whether Redis ran it,
 * REPLIED whether its reply arrived, UNUSABLE a status -2. */
static void deliver(world *w, int apply, int replied, int unusable)
{
    leasecore *c = &w->c;
    leasecore_reply v = {-2, 0, 0, 0};
    leasecore_answer a;
    if (unusable)
        w->unusable_seen = 1;
    else if (apply)
        v = redis_apply(w);
    w->inflight = 0;
    leasecore_answer_begin(c, replied ? 0 : -1, &v, w->now, &a);
    if (a.kind == LEASECORE_ANSWER_FAILED) {
        WCHECK(c->op_failed && !c->op_sent);
        answer_later(w);
        return;
    }
    if (a.kind == LEASECORE_ANSWER_APPLIED) {
        WCHECK(a.charged == w->nop);
        for (int i = 0; i < w->nop; i++)
            answer_rec(w, w->op[i], i < a.charged ? R_CHARGED : R_NOTCHARGED);
        w->confirmed_ms = w->built_ms;
        if (w->built_ms >= w->reclaimed_ms) w->reclaimed = 0;
        w->confirmed_epoch = w->sent_epoch;
        /* The worker's view of the lease is Redis's. */
        WCHECK(c->amount == (w->exists ? w->amount : 0));
    } else {
        for (int i = 0; i < w->nop; i++)
            answer_rec(w, w->op[i], R_NOTCHARGED);
    }
    leasecore_answer_done(c, &a);
    if (a.lost) {
        /* Not finished while its queued records are being answered. */
        WCHECK(w->nq == 0 || !leasecore_finished(c));
        for (int i = 0; i < w->nq; i++)
            answer_rec(w, w->q[i], R_NOTCHARGED);
        w->nq = 0;
        leasecore_queue_dropped(c);
    }
    w->nop = 0;
    if (a.schedule) w->dirty = 1;
}

static void take(world *w)
{
    leasecore *c = &w->c;
    int64_t price = rnd_in(w, 1, 30);
    leasecore_take_result r;
    if (w->ncalls == MAXCALLS) return;
    r = leasecore_take(c, price, w->now, w->epoch);
    if (r == LEASECORE_FENCED || r == LEASECORE_SHORT) w->dirty = 1;
    if (r != LEASECORE_TAKEN) return;
    /* Nothing promised after the fence, nor by a closed lease, nor past
     * what it holds. */
    WCHECK(w->confirmed_epoch == w->epoch && w->now - w->confirmed_ms < LEASE_FENCE_MS);
    WCHECK(!w->closed_seen && !c->closing && !c->deleted && !c->op_failed);
    WCHECK(leasecore_free(c) >= 0);
    w->calls[w->ncalls++] = price;
}

static void end_call(world *w, int k)
{
    leasecore *c = &w->c;
    int64_t price = w->calls[k], want = rnd_in(w, -2, price + 2), charge;
    int commit = rnd(w) % 4 != 0;
    w->calls[k] = w->calls[--w->ncalls];
    charge = leasecore_end(c, price, want, commit);
    WCHECK(charge == (!commit ? 0 : want < 0 ? 0 : want > price ? price : want));
    w->recs[w->nrecs].charge = charge;
    w->recs[w->nrecs].state = R_WAITING;
    w->recs[w->nrecs].redis = 0;
    if (c->deleted) {
        answer_rec(w, w->nrecs++, R_NOTCHARGED); /* the lease is gone: cost 0 */
        return;
    }
    w->q[w->nq++] = w->nrecs;
    leasecore_queued(c, charge);
    if (c->op_failed) answer_rec(w, w->nrecs, R_LATER);
    w->nrecs++;
    w->dirty = 1;
}

/* lease_on_flush, then the tick. */
static void flush(world *w)
{
    if (!w->dirty) return;
    w->dirty = 0;
    if (leasecore_send_what_now(&w->c) == LEASECORE_SEND_NEW) send_op(w, LEASECORE_SEND_NEW);
}

static void tick(world *w, int closing)
{
    int f = leasecore_tick(&w->c, w->now, IDLE_MS, closing);
    if (f & LEASECORE_TICK_RESEND) {
        WCHECK(f == LEASECORE_TICK_RESEND);
        if (!w->down) send_op(w, LEASECORE_SEND_RESEND);
        return;
    }
    if (f & LEASECORE_TICK_SCHEDULE) w->dirty = 1;
}

/* The invariants, after every step:
 * - the counts: refs are the calls in flight, used their prices (0 once
 *   the lease is lost), queued and op_n the records lease.c holds;
 * - pending is the charges of the records not yet known in or out;
 * - free >= 0, i.e. used + pending <= amount: never more promised than
 *   held, while Redis holds the lease as the worker last heard. Not after
 *   the sweeper released it (a late op answers amount 0 while records are
 *   still to come: the worker promises nothing then, free being < 0, until
 *   an op finds the lease gone), nor after a reclaim at the soft deadline
 *   until an op built since is answered (a resend carries the busy figure
 *   of its first send; the records then re-take their points from the
 *   available ones, as lease.lua intends). An orphan promises nothing.
 *   take() checks, whatever the case, that a promise leaves free >= 0;
 * - the numbers: the last op built has the highest seq, Redis never holds
 *   a higher one;
 * - a closing lease stays closing (and so promises nothing: take checks);
 * - no record is charged twice (charge_recs), and every call's answer
 *   agrees with Redis (answer_rec). */
static void check_world(world *w)
{
    const leasecore *c = &w->c;
    int64_t used = 0, pending = 0;
    for (int i = 0; i < w->ncalls; i++)
        used += w->calls[i];
    for (int i = 0; i < w->nq; i++)
        pending += w->recs[w->q[i]].charge;
    for (int i = 0; i < w->nop; i++)
        pending += w->recs[w->op[i]].charge;
    WCHECK(c->refs == w->ncalls);
    WCHECK(c->used == (c->deleted ? 0 : used));
    if (!c->deleted) {
        WCHECK(c->queued == w->nq);
        WCHECK(c->op_n == w->nop);
        WCHECK(c->pending == pending);
        WCHECK(leasecore_unsent(c) == w->nq + w->nop);
    } else {
        WCHECK(leasecore_unsent(c) == 0);
    }
    if (w->exists && !w->reclaimed && !c->deleted && !c->orphan)
        WCHECK(c->used + c->pending <= c->amount);
    WCHECK(c->used >= 0 && c->pending >= 0 && c->refs >= 0 && c->amount >= 0);
    WCHECK(c->seq == w->last_seq && c->op_seq <= c->seq);
    WCHECK(w->stored_seq <= c->seq);
    WCHECK(c->op_sent == w->inflight);
    if (w->closed_seen) WCHECK(c->closing || c->deleted);
    if (c->closing) w->closed_seen = 1;
}

static void run_one(uint64_t seed)
{
    world *w = calloc(1, sizeof *w);
    leasecore *c;
    int s;
    if (!w) {
        CHECK(w != NULL);
        return;
    }
    c = &w->c;
    w->rng = seed * 0x9E3779B97F4A7C15ULL + 1;
    w->now = 1000000;
    w->epoch = 1;
    w->mark = -1;
    w->available = INT64_C(1) << 40;
    run_failed = 0;
    leasecore_init(c, 100, w->now);
    w->dirty = 1;
    for (s = 0; s < STEPS && !run_failed; s++) {
        unsigned ev = (unsigned)(rnd(w) % 100);
        if (ev < 25)
            take(w);
        else if (ev < 45) {
            if (w->ncalls > 0) end_call(w, (int)(rnd(w) % (uint64_t)w->ncalls));
        } else if (ev < 57)
            flush(w);
        else if (ev < 77) {
            if (w->inflight) {
                unsigned how = (unsigned)(rnd(w) % 20);
                /* mostly answered; else applied with the reply lost, or
                 * lost before Redis ran it, or (rarely) unusable */
                deliver(w, how < 17 || how == 18, how < 17, how == 19 && rnd(w) % 8 == 0);
            }
        } else if (ev < 85)
            tick(w, 0);
        else if (ev < 94)
            w->now += (uint64_t)(rnd(w) % 8 == 0 ? rnd_in(w, 0, 2000) : rnd_in(w, 0, 120));
        else if (ev < 95) {
            if (w->exists && rnd(w) % 3 == 0) { /* the sweeper releases the whole lease */
                w->exists = 0;
                w->mark = w->stored_seq;
            }
        } else if (ev < 96) {
            if (w->exists && w->now - w->applied_ms >= 3000) {
                /* Past the soft deadline the sweeper gives the free points
                 * back; the next op re-takes what calls were promised. */
                w->amount -= w->rfree;
                w->available += w->rfree;
                w->rfree = 0;
                w->reclaimed = 1;
                w->reclaimed_ms = w->now;
            }
        } else if (ev < 97)
            w->contended = rnd(w) % 3 == 0;
        else if (ev < 99)
            w->down = rnd(w) % 2 == 0;
        else {
            /* A reconnect: the op on its way gets no usable reply (it may
             * have run). */
            if (w->inflight) deliver(w, rnd(w) % 2 == 0, 0, 0);
            w->epoch++;
        }
        check_world(w);
    }
    /* Quiesce: Redis back, every call ended, the table closing; then
     * every record is settled and the lease is dropped. */
    w->down = 0;
    w->contended = 0;
    while (w->ncalls > 0 && !run_failed)
        end_call(w, 0);
    for (s = 0; s < 200 && !run_failed && !leasecore_finished(c); s++) {
        if (w->inflight) deliver(w, 1, 1, 0);
        check_world(w);
        tick(w, 1);
        flush(w);
        check_world(w);
        w->now += 100;
    }
    WCHECK(leasecore_finished(c));
    WCHECK(leasecore_unsent(c) == 0 && !w->inflight);
    /* Every ended call's charge counted exactly once: answered charged and
     * charged once, answered not charged and never charged, or answered
     * with the charge to come and charged once (at most once when an
     * unusable answer lost records). */
    for (int i = 0; i < w->nrecs && !run_failed; i++) {
        const rrec *r = &w->recs[i];
        WCHECK(r->state != R_WAITING);
        if (r->state == R_CHARGED) WCHECK(r->redis == 1);
        if (r->state == R_NOTCHARGED) WCHECK(r->redis == 0);
        if (r->state == R_LATER) WCHECK(w->unusable_seen ? r->redis <= 1 : r->redis == 1);
    }
    if (run_failed) {
        fprintf(stderr, "random run failed: LEASECORE_SEED=%" PRIu64 " (%d checks)\n", seed,
                run_failed);
        failures += run_failed;
    }
    free(w);
}

static void test_random(void)
{
    const char *one = getenv("LEASECORE_SEED");
    if (one && *one) {
        run_one(strtoull(one, NULL, 10));
        return;
    }
    for (uint64_t seed = 1; seed <= RUNS; seed++)
        run_one(seed);
}

int main(void)
{
    test_scenarios();
    test_size();
    test_random();
    if (failures) fprintf(stderr, "%d checks failed\n", failures);
    return failures ? 1 : 0;
}
