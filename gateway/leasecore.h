/* leasecore.h: the accounting and decisions of one point lease (lease.h),
 * without I/O. Owns a lease's figures (the points Redis holds for it, those
 * promised to calls in flight, the charges not yet applied), the numbering
 * of its ops and what each carries (charge, resize: growth or give-back,
 * close), the fence on promises, and when an op is due (records, more
 * points, renewal, idle or contended give-back). Every function is given
 * the time (now_ms) and whatever it needs to know of the world (the Redis
 * connection's epoch, whether hotclient refuses): no clock, no libevent, no
 * hotclient, no allocation, so tests/unit/test_leasecore.c drives it with
 * tables and random sequences.
 * Does not own the records themselves (their text, their callbacks), the
 * lease table, the timers, the sending, nor the spill: lease.c. lease.c
 * keeps the core's record counts (queued, op_n) equal to its queues' by
 * telling it every move (leasecore_queued, leasecore_op_build,
 * leasecore_answer_done). Single-threaded, as lease.c. */
#ifndef GATEWAY_LEASECORE_H
#define GATEWAY_LEASECORE_H

#include <stdint.h>

#define LEASE_PROBE_MS 250 /* an op at least this often: renewal, contention news */
/* No promise from a lease whose last confirmed op was sent longer ago than
 * this: lease.lua's soft deadline (3000 ms after the op ran, which is after
 * it was sent) lets the sweeper give the lease's free points back, so that
 * a worker cut off from Redis, or dead, does not keep them from callers
 * elsewhere. The margin covers Redis's clock against ours. */
#define LEASE_FENCE_MS 1500

/* A lease's points, as this worker sees them:
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
 * per-call settles are when Redis is away.
 *
 * Fields are read by lease.c (and the tests) and written only here. */
typedef struct leasecore {
    int64_t amount, used, pending;
    int64_t want; /* free points it tries to keep */
    int64_t seq;  /* of the last op built */
    int refs;     /* calls promised from it, not yet ended */
    int queued;   /* records waiting for the next op (lease.c holds them) */
    int closing;  /* takes no more; gives its free points back */
    int deleted;  /* Redis no longer has it: no more ops */
    int orphan;   /* Redis released it while records answered with the charge
                     to come waited: only late ops carrying them (lease.lua
                     charges them against its swept mark), nothing else */
    int want_op;  /* an op is due (records, more points, renewal, give-back) */
    uint64_t last_take_ms, last_op_ms;
    uint64_t confirmed_ms; /* when the last op answered was sent */
    unsigned epoch;        /* hotclient connection it was answered on; 0: none yet */
    /* the op on its way (op_sent) or failed (op_failed) */
    uint64_t op_sent_ms;
    unsigned op_epoch;
    int op_n; /* its records */
    int64_t op_seq, op_charge, op_resize, op_busy;
    int op_sent, op_failed;
    int op_close; /* closing, nothing promised: an op that empties it drops it */
} leasecore;

/* The free points of a lease size WANT for calls of PRICE, when an account
 * that has AVAILABLE points after a per-call hold should get one (CALLS:
 * the lease's size in calls; 0 turns leases off); else 0. */
int64_t leasecore_size(int64_t calls, int64_t price, int64_t available);

/* A new lease keeping WANT free points: its first op (seq 1, which creates
 * it in Redis) is due. */
void leasecore_init(leasecore *c, int64_t want, uint64_t now_ms);

int64_t leasecore_free(const leasecore *c);

typedef enum leasecore_take_result {
    LEASECORE_TAKEN = 0,  /* PRICE promised: the call must end with leasecore_end */
    LEASECORE_CLOSED = 1, /* closing, op failed or lease gone: no op due for this */
    LEASECORE_FENCED = 2, /* no recent answer on this connection: an op is due */
    LEASECORE_SHORT = 3,  /* not enough free points: an op (asking for more) is due */
} leasecore_take_result;
/* Promises PRICE at NOW_MS on the Redis connection EPOCH (hotclient_epoch). */
leasecore_take_result leasecore_take(leasecore *c, int64_t price, uint64_t now_ms, unsigned epoch);

/* A call promised PRICE ended: it is no longer promised. Returns its charge
 * as its record carries it: CHARGE bounded to [0, PRICE], 0 unless COMMIT.
 * The caller then either queues its record (leasecore_queued) or answers
 * the call itself (lease gone, or no record). */
int64_t leasecore_end(leasecore *c, int64_t price, int64_t charge, int commit);
/* A record charging CHARGE was queued for the next op: it counts as
 * pending until an answer says it is in, or gone. An op is due. */
void leasecore_queued(leasecore *c, int64_t charge);

typedef enum leasecore_send_what {
    LEASECORE_SEND_NONE = 0,   /* one on its way, gone, or an orphan with nothing to carry */
    LEASECORE_SEND_RESEND = 1, /* the failed op again, unchanged (same seq) */
    LEASECORE_SEND_NEW = 2,    /* build the next op: leasecore_op_build */
} leasecore_send_what;
leasecore_send_what leasecore_send_what_now(const leasecore *c);

/* The records for a new op could not be moved (out of memory): nothing
 * moved, the op stays due (the next tick or call sends it). */
void leasecore_op_defer(leasecore *c);
/* Builds the next op, carrying the first N queued records (N <=
 * leasecore.queued) whose charges sum to CHARGE: the next seq, what calls
 * still promised keep busy, and the resize: all free points back while
 * closing, growth to WANT once below half of it unless REFUSING (hotclient
 * past its backlog bound). Only when leasecore_send_what_now said NEW. */
void leasecore_op_build(leasecore *c, int n, int64_t charge, uint64_t now_ms, int refusing);

typedef enum leasecore_op_mode {
    LEASECORE_OP_NORMAL = 0,
    LEASECORE_OP_CLOSE = 1, /* lease.lua's close '1': an op that empties it drops it */
    LEASECORE_OP_LATE = 2,  /* lease.lua's 'late': charged even after a sweep */
} leasecore_op_mode;
/* How the op built (or failed) goes to lease.lua. */
leasecore_op_mode leasecore_op_mode_of(const leasecore *c);

/* The op was handed to hotclient on connection EPOCH: an answer will come. */
void leasecore_op_sent(leasecore *c, unsigned epoch);
/* The op could not be sent (Redis away): it is kept for a resend. Returns 1
 * when it had not failed before (worth a log line). */
int leasecore_op_unsent(leasecore *c);

/* lease.lua's answer to the op (hot_lease_reply without `available`, which
 * only the calls' answers need). */
typedef struct leasecore_reply {
    int64_t status, amount, contended, charged;
} leasecore_reply;

typedef enum leasecore_answer_kind {
    LEASECORE_ANSWER_FAILED = 0,  /* no usable reply: kept, resent (same seq) */
    LEASECORE_ANSWER_APPLIED = 1, /* status 1 or 2 */
    LEASECORE_ANSWER_GONE = 2,    /* status 0 (no such lease) or < 0 (unusable) */
} leasecore_answer_kind;

/* What an answer decided, for lease.c to carry out: leasecore_answer fills
 * it before the op's calls are answered, leasecore_answer_done after (their
 * callbacks may take from or end calls of the lease, which the second part
 * must see). */
typedef struct leasecore_answer {
    leasecore_answer_kind kind;
    leasecore_reply reply;
    int first_failure; /* FAILED, and the op had not failed before: log it */
    int charged;       /* APPLIED: the op's records [0, charged) were charged,
                          the rest were not (an op short of points) */
    /* set by leasecore_answer_done: */
    int contended; /* it starts giving back because contended: log it */
    int unlist;    /* out of the table: lease_take finds it no more */
    int lost;      /* GONE for good: the caller answers the queued records
                      not charged, then calls leasecore_queue_dropped */
    int schedule;  /* an op is due */
} leasecore_answer;

/* The op's answer at NOW_MS: RC != 0 (or REPLY NULL) is no usable reply.
 * FAILED: the caller answers the calls waiting (the op's and the queued
 * ones) with the charge to come, and is done (no leasecore_answer_done). */
void leasecore_answer_begin(leasecore *c, int rc, const leasecore_reply *reply, uint64_t now_ms,
                            leasecore_answer *out);
/* After the op's calls were answered (APPLIED or GONE): the rest of the
 * answer's decisions (give-back when contended or spent out, dropped when
 * Redis dropped it, orphan or lost when gone), the op's records done. */
void leasecore_answer_done(leasecore *c, leasecore_answer *a);
/* After a lost answer, once the caller answered and dropped its queued
 * records. Until then the lease counts them, so that it is not finished
 * (and freed by a tick) while their callbacks run. */
void leasecore_queue_dropped(leasecore *c);

enum {
    LEASECORE_TICK_RESEND = 1,   /* resend the failed op if Redis is up */
    LEASECORE_TICK_SCHEDULE = 2, /* an op is due */
    LEASECORE_TICK_UNLIST = 4,   /* it starts closing: out of the table */
};
/* The periodic look at a lease at NOW_MS: idle past IDLE_MS or the table
 * CLOSING gives it back; a closing lease with free points (or empty, to be
 * dropped) sends an op; any lease one at least every LEASE_PROBE_MS.
 * Returns LEASECORE_TICK_* flags. */
int leasecore_tick(leasecore *c, uint64_t now_ms, int64_t idle_ms, int closing);

/* Nothing refers to it and nothing is left to send: it may be freed. */
int leasecore_finished(const leasecore *c);
/* Records not known to be in Redis (0 once the lease is gone). */
int leasecore_unsent(const leasecore *c);
/* Points held in Redis not yet promised or charged (the metrics' gauge):
 * 1 with *POINTS when it holds any, else 0. */
int leasecore_held(const leasecore *c, int64_t *points);

#endif
