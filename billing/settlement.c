/* settlement.c: moves settled calls from the Redis outbox into Postgres.
 *
 * Reads the outbox stream through the consumer group "settle" (each entry
 * carries the calls of one settle.lua batch) and applies them with
 * ledger_settle_batch (one statement, one transaction, about SETTLE_BATCH
 * calls), then acknowledges and deletes the entries. Exactly once: Postgres deduplicates by
 * reservation id, so an entry redelivered after a crash between commit and
 * acknowledge changes nothing. A worker's consumer name is stable across
 * restarts (host + index), so a restarted worker first finishes its own
 * pending entries; entries left pending by a worker that never came back are
 * claimed by the others after SETTLE_CLAIM_IDLE_MS (XAUTOCLAIM).
 *
 * Calls Postgres refuses as data (any SQLSTATE of class 22 or 23, 42804,
 * 54000: a value out of range, an unknown outcome, an account it does not
 * know, a numeric overflow...) are isolated by halving the batch until the
 * refused calls stand alone, and those are moved to the stream
 * pg:outbox:dead with the reason; the rest of the batch is applied. So a bad
 * call costs about 2 log2(batch) statements and never stalls settlement;
 * connection and transient errors (deadlock, shutdown) retry the whole batch
 * with backoff. An entry settle.lua cannot have written is copied there
 * whole. Holds whose route starts with '_' are not calls (a negative
 * adjustment's guard) and are acknowledged without a charge row.
 *
 * Entries leave the stream through outbox_ack.lua, which deletes and
 * acknowledges them and lowers pg:backlog (the records not yet in Postgres,
 * which the gateway bounds with OUTBOX_MAX_BACKLOG) by the records of the
 * entries it deleted, in one atomic step.
 *
 * Redis losing its data: every read of entries (XREADGROUP, XAUTOCLAIM)
 * and their commit to Postgres happen while the worker's Postgres session
 * holds CONTROL_PASS_LOCK shared (control.h), taken before the read and
 * released right after the commit, on every path. A repair pass takes it
 * exclusively for its account phase, so it reads Postgres spent either
 * before such a batch was read or after it was committed; after a loss the
 * first is impossible for a batch read from the lost stream, so a hash
 * rebuilt from Postgres always counts every batch read before the loss
 * (entries the loss took before they were read are lost charges:
 * under-billing). A session that fails in between loses the lock with it:
 * the entries stay pending and are read again (XREADGROUP from 0) under a
 * new lock, and an entry the loss took meanwhile comes back without its
 * fields and is only acknowledged. Cost: two small statements per read; a
 * pass waits for at most one read's BLOCK (SETTLE_BLOCK_MS) plus the
 * batch in flight. */
#include "billing/control.h"
#include "common/env.h"
#include "billing/hot.h"
#include "common/hotkeys.h"
#include "billing/ledger.h"
#include "common/log.h"
#include "billing/workers.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SETTLE_DEAD_STREAM HOT_OUTBOX ":dead"
/* How long a read waits for new entries, holding the pass lock shared: a
 * repair pass waits for that long at most, plus the batch in flight. */
#define SETTLE_BLOCK_MS 500

/* An entry of the batch: its stream id and the records it carries (what
 * settle.lua or lease.lua added to pg:backlog when appending it). */
typedef struct settle_id {
    char id[48];
    char records[16];
} settle_id;

typedef struct settle_state {
    const billing_config *cfg;
    atomic_int *stop;
    hot_conn *hot;
    PGconn *pg;
    char consumer[128];
    ledger_charge *charges; /* charges_cap slots, grown for a large entry */
    int charges_cap;
    settle_id *ids; /* the entries of the batch */
    int ids_cap;
    char ack_sha[41];   /* outbox_ack.lua, once loaded; "" before */
    int lock_pid;       /* backend of the session holding the pass lock; 0: none */
    int reread;         /* a commit failed: read our pending entries again, under a new lock */
    int64_t pause_ms;   /* SETTLE_TEST_PAUSE_MS: tests only (see settlement_run) */
    billing_metrics *m; /* NULL: not counted */
    int beat;           /* this worker's heartbeat slot */
} settle_state;

/* Copies the next '|'-separated part of *P into OUT (at most CAP-1 chars);
 * -1 when it is missing or too long. */
static int settle_part(const char **p, char *out, size_t cap, int last)
{
    const char *end = last ? *p + strlen(*p) : strchr(*p, '|');
    size_t len;
    if (!end || (last && strchr(*p, '|'))) return -1;
    len = (size_t)(end - *p);
    if (len == 0 || len >= cap) return -1;
    memcpy(out, *p, len);
    out[len] = '\0';
    *p = last ? end : end + 1;
    return 0;
}

/* A decimal int64 part, whole and as settle.lua writes it: -1 otherwise.
 * strtoll alone would also take " 5", "+5" and "05" (found by
 * tests/fuzz/fuzz_settle.c): a record must read one way only. */
static int settle_int(const char *text, int64_t *out)
{
    char *end;
    long long v;
    const char *d = text[0] == '-' ? text + 1 : text;
    if (d[0] < '0' || d[0] > '9' || (d[0] == '0' && (d[1] || d != text))) return -1;
    errno = 0;
    v = strtoll(text, &end, 10);
    if (end == text || *end || errno) return -1;
    *out = (int64_t)v;
    return 0;
}

/* Parses one outbox record "rid|acct|route|amount|hold|outcome|status"
 * (settle.lua's format) stamped TS_MS; -1 if malformed. Not static: the
 * fuzz harness (tests/fuzz/fuzz_settle.c) calls it. */
int settle_parse(const char *rec, int64_t ts_ms, ledger_charge *c)
{
    char acct[24], amount[24], hold[24], status[16];
    int64_t st;
    if (settle_part(&rec, c->rid, sizeof c->rid, 0) || settle_part(&rec, acct, sizeof acct, 0) ||
        settle_part(&rec, c->route, sizeof c->route, 0) ||
        settle_part(&rec, amount, sizeof amount, 0) || settle_part(&rec, hold, sizeof hold, 0) ||
        settle_part(&rec, c->outcome, sizeof c->outcome, 0) ||
        settle_part(&rec, status, sizeof status, 1))
        return -1;
    if (settle_int(acct, &c->account_id) || settle_int(amount, &c->amount) ||
        settle_int(hold, &c->hold) || settle_int(status, &st))
        return -1;
    c->status = (int)st;
    c->ts_ms = ts_ms;
    return c->account_id > 0 && c->amount >= 0 && c->hold >= 0 && st >= 0 && st < 1000 ? 0 : -1;
}

/* The records an entry's writer counted into pg:backlog: the fields after
 * "ts" (settle.lua and lease.lua write "ts" first); 0 for an entry without
 * it, which neither wrote. */
static int settle_records(const redisReply *fields)
{
    if (fields->elements < 2 || fields->elements % 2 != 0 ||
        fields->element[0]->type != REDIS_REPLY_STRING ||
        strcmp(fields->element[0]->str, "ts") != 0)
        return 0;
    return (int)(fields->elements / 2 - 1);
}

/* How many records an entry's FIELDS carry ("ts" then "c" fields), with its
 * timestamp in *TS_MS; -1 if the entry is malformed. */
static int settle_count(const redisReply *fields, int64_t *ts_ms)
{
    int n = 0;
    if (!fields || fields->type != REDIS_REPLY_ARRAY || fields->elements < 4 ||
        fields->elements % 2 != 0)
        return -1;
    for (size_t i = 0; i < fields->elements; i++)
        if (fields->element[i]->type != REDIS_REPLY_STRING) return -1;
    if (strcmp(fields->element[0]->str, "ts") != 0 || settle_int(fields->element[1]->str, ts_ms))
        return -1;
    for (size_t i = 2; i < fields->elements; i += 2) {
        if (strcmp(fields->element[i]->str, "c") != 0) return -1;
        n++;
    }
    return n;
}

/* Loads outbox_ack.lua; 0 when its SHA is known. */
static int settle_ack_load(settle_state *s)
{
    const char *argv[3] = {"SCRIPT", "LOAD", hot_lua_outbox_ack};
    redisReply *r = hot_command_argv(s->hot, 3, argv, NULL);
    int rc = -1;
    if (r && r->type == REDIS_REPLY_STRING && r->len == 40) {
        memcpy(s->ack_sha, r->str, 41);
        rc = 0;
    }
    if (r) freeReplyObject(r);
    return rc;
}

/* Deletes and acknowledges the first N entries of the batch and lowers
 * pg:backlog by the records of those it deleted, in one step
 * (outbox_ack.lua): a crash or a second delivery can neither leave an
 * acknowledged entry in the stream (a backlog that never drains) nor
 * uncount an entry twice. */
static int settle_ack(settle_state *s, int n)
{
    const char **argv;
    int rc = -1;
    redisReply *r = NULL;
    if (n == 0) return 0;
    argv = calloc(2 * (size_t)n + 6, sizeof *argv);
    if (!argv) return -1;
    argv[0] = "EVALSHA";
    argv[2] = "2";
    argv[3] = HOT_OUTBOX;
    argv[4] = HOT_BACKLOG;
    argv[5] = HOT_OUTBOX_GROUP;
    for (int i = 0; i < n; i++) {
        argv[6 + 2 * i] = s->ids[i].id;
        argv[7 + 2 * i] = s->ids[i].records;
    }
    for (int attempt = 0; attempt < 2; attempt++) {
        if (!s->ack_sha[0] && settle_ack_load(s) != 0) break;
        argv[1] = s->ack_sha;
        r = hot_command_argv(s->hot, 2 * n + 6, argv, NULL);
        if (!r) break;
        if (r->type != REDIS_REPLY_ERROR) {
            rc = 0;
            break;
        }
        if (strncmp(r->str, "NOSCRIPT", 8) != 0) {
            log_error("settlement: acknowledging %d entries: %s", n, r->str);
            break;
        }
        s->ack_sha[0] = '\0'; /* Redis restarted or SCRIPT FLUSH: load it again */
        freeReplyObject(r);
        r = NULL;
    }
    if (r) freeReplyObject(r);
    free(argv);
    return rc;
}

/* Copies a call Postgres refused into the dead-letter stream with every
 * part of it (a human can replay it). -1 if Redis did not take it: the
 * entry must then stay pending, or the call would exist nowhere. */
static int settle_dead_letter(settle_state *s, const ledger_charge *c, const char *error)
{
    char acct[24], amount[24], hold[24], status[16], ts[24];
    /* "integrity" (class 23: an account Postgres does not know, a check) or
     * "data" (anything else the data is at fault for), then Postgres' own
     * SQLSTATE and message. */
    const char *why = strncmp(error, "23", 2) == 0 ? "integrity" : "data";
    const char *argv[23] = {"XADD",     SETTLE_DEAD_STREAM,
                            "*",        "rid",
                            c->rid,     "acct",
                            acct,       "route",
                            c->route,   "amount",
                            amount,     "hold",
                            hold,       "outcome",
                            c->outcome, "status",
                            status,     "ts",
                            ts,         "why",
                            why,        "error",
                            error};
    redisReply *r;
    int rc = -1;
    snprintf(acct, sizeof acct, "%" PRId64, c->account_id);
    snprintf(amount, sizeof amount, "%" PRId64, c->amount);
    snprintf(hold, sizeof hold, "%" PRId64, c->hold);
    snprintf(status, sizeof status, "%d", c->status);
    snprintf(ts, sizeof ts, "%" PRId64, c->ts_ms);
    r = hot_command_argv(s->hot, 23, argv, NULL);
    if (r && r->type != REDIS_REPLY_ERROR) rc = 0;
    if (r) freeReplyObject(r);
    if (rc == 0) bm_dead_letter(s->m);
    if (rc == 0)
        log_error("settlement: call %s of account %" PRId64
                  " refused by postgres (%s); moved to %s",
                  c->rid, c->account_id, error, SETTLE_DEAD_STREAM);
    else
        log_error("settlement: call %s refused by postgres (%s) and not copied to %s; kept pending",
                  c->rid, error, SETTLE_DEAD_STREAM);
    return rc;
}

/* An entry settle.lua cannot have written (a bug or a foreign writer): copied
 * whole (its id, then its own fields) into the dead-letter stream for a
 * human, never silently dropped; the caller then deletes it from the outbox.
 * Returns -1 if Redis did not take the copy (the entry must then stay). */
static int settle_dead_entry(settle_state *s, const char *id, const redisReply *fields)
{
    size_t nf = fields && fields->type == REDIS_REPLY_ARRAY ? fields->elements : 0;
    const char **argv = calloc(7 + nf, sizeof *argv);
    redisReply *r;
    int argc = 0, rc = -1;
    if (!argv) return -1;
    argv[argc++] = "XADD";
    argv[argc++] = SETTLE_DEAD_STREAM;
    argv[argc++] = "*";
    argv[argc++] = "entry";
    argv[argc++] = id;
    argv[argc++] = "why";
    argv[argc++] = "malformed";
    for (size_t i = 0; i + 1 < nf; i += 2) {
        if (fields->element[i]->type != REDIS_REPLY_STRING ||
            fields->element[i + 1]->type != REDIS_REPLY_STRING)
            continue;
        argv[argc++] = fields->element[i]->str;
        argv[argc++] = fields->element[i + 1]->str;
    }
    r = hot_command_argv(s->hot, argc, argv, NULL);
    if (r && r->type != REDIS_REPLY_ERROR) rc = 0;
    if (r) freeReplyObject(r);
    free(argv);
    if (rc == 0) {
        bm_dead_letter(s->m);
        log_error("settlement: malformed outbox entry %s moved to %s", id, SETTLE_DEAD_STREAM);
    }
    return rc;
}

/* Applies charges [LO, LO + N) once: 0 when every one is durable or
 * dead-lettered, -1 when the database failed (the caller retries the whole
 * batch: every statement is idempotent), -2 when a refused call could not be
 * copied to the dead-letter stream (its entries must stay pending). A batch
 * Postgres refuses as data is halved until the refused calls stand alone. */
static int settle_apply(settle_state *s, int lo, int n)
{
    char why[256];
    int applied, rc, half;
    rc = ledger_settle_batch(s->pg, &s->charges[lo], n, &applied, why, sizeof why);
    if (rc == LEDGER_OK) {
        log_debug("settlement: %d charges, %d new", n, applied);
        for (int i = 0; i < n; i++)
            bm_settled(s->m, s->charges[lo + i].outcome);
        return 0;
    }
    if (rc != LEDGER_CONFLICT) return -1;
    if (n == 1) return settle_dead_letter(s, &s->charges[lo], why) == 0 ? 0 : -2;
    half = n / 2;
    rc = settle_apply(s, lo, half);
    return rc != 0 ? rc : settle_apply(s, lo + half, n - half);
}

/* Takes the pass lock shared on the worker's session (connecting first if
 * needed), before entries are read; 0 when held. */
static int settle_lock(settle_state *s)
{
    if (!s->pg) s->pg = ledger_connect(s->cfg->database_url);
    if (!s->pg || ledger_check(s->pg) != 0) return -1;
    if (control_pass_lock_shared(s->pg, 1) != 0) {
        PQreset(s->pg); /* a broken session: a lock, if granted, goes with it */
        return -1;
    }
    s->lock_pid = PQbackendPID(s->pg);
    return 0;
}

/* Releases it, right after the commit (or the failure). A session that
 * failed, or that ledger.c reconnected meanwhile, no longer holds it. */
static void settle_unlock(settle_state *s)
{
    if (s->lock_pid == 0) return;
    if (PQstatus(s->pg) == CONNECTION_OK && PQbackendPID(s->pg) == s->lock_pid &&
        control_pass_lock_shared(s->pg, 0) != 0)
        PQreset(s->pg); /* never left held: it would stop every repair pass */
    s->lock_pid = 0;
}

/* Writes the charges to Postgres, once, under the pass lock the read took.
 * Returns 0 when every charge is durable (or dead-lettered); -1 otherwise,
 * the entries then stay pending: after a database failure they are read
 * again under a new lock (s->reread), never committed on a session that
 * lost the lock after they were read. */
static int settle_write(settle_state *s, int n)
{
    int rc;
    int64_t started;
    /* Tests only: a slow commit, with the lock held (the loss window). */
    if (s->pause_ms > 0) worker_rest(s->stop, (long)s->pause_ms, s->m, s->beat);
    if (atomic_load(s->stop) || PQstatus(s->pg) != CONNECTION_OK ||
        PQbackendPID(s->pg) != s->lock_pid) {
        s->reread = 1;
        return -1;
    }
    started = bm_mono_us();
    rc = settle_apply(s, 0, n);
    /* One observation per transaction asked for, however often a refused
     * call made it split: the size and time of what settlement wrote. */
    if (rc == 0) bm_batch(s->m, n, bm_mono_us() - started);
    if (rc == 0 && PQbackendPID(s->pg) != s->lock_pid)
        /* ledger.c resent the batch on a new session (the old one died
         * before it ran): committed without the lock. Only a Redis loss
         * at that very moment could make a rebuild miss it; the catch-up
         * passes (credit.lua's rebuilt window) then raise spent. */
        log_warn("settlement: %d charges committed after postgres reconnected", n);
    if (rc == -1) {
        log_warn("settlement: postgres unavailable; %d charges stay pending", n);
        s->reread = 1;
    }
    return rc == 0 ? 0 : -1; /* -2: kept pending, retried when claimed again */
}

/* Makes room for N more charges after the NC taken. */
static int settle_reserve_room(settle_state *s, int nc, int n)
{
    ledger_charge *c;
    if (nc + n <= s->charges_cap) return 0;
    c = realloc(s->charges, (size_t)(nc + n) * sizeof *c);
    if (!c) return -1;
    s->charges = c;
    s->charges_cap = nc + n;
    return 0;
}

/* Commits the NC charges taken from the first N entries of the list, then
 * acknowledges those entries. */
static int settle_flush(settle_state *s, int n, int nc)
{
    if (nc > 0 && settle_write(s, nc) != 0) return -1;
    return settle_ack(s, n); /* on failure: redelivered later, a no-op then */
}

/* Applies the entries of an XREADGROUP/XAUTOCLAIM entry list (at most
 * ids_cap of them: the COUNT of the read), in transactions of about
 * SETTLE_BATCH charges (an entry's charges always go in one). Returns how
 * many entries it handled (with the charges among them in *CHARGES), or -1
 * when the rest must be retried later. */
static int settle_entries(settle_state *s, const redisReply *list, int *charges)
{
    int n = 0, nc = 0, entries = 0;
    *charges = 0;
    if (!list || list->type != REDIS_REPLY_ARRAY) return 0;
    for (size_t i = 0; i < list->elements; i++) {
        const redisReply *e = list->element[i];
        const redisReply *fields;
        int64_t ts;
        int count, taken = 0;
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 1 ||
            e->element[0]->type != REDIS_REPLY_STRING)
            continue;
        fields = e->elements == 2 ? e->element[1] : NULL;
        /* No fields: an id still pending whose entry was deleted (a crash
         * between XDEL and XACK): only acknowledged. */
        count = fields && fields->type == REDIS_REPLY_ARRAY ? settle_count(fields, &ts) : 0;
        if (n == s->ids_cap || (count > 0 && nc > 0 && nc + count > s->cfg->settle_batch)) {
            if (settle_flush(s, n, nc) != 0) return -1;
            *charges += nc;
            entries += n;
            n = nc = 0;
        }
        if (count > 0 && settle_reserve_room(s, nc, count) != 0) return -1;
        for (size_t f = 3; count > 0 && f < fields->elements; f += 2) {
            if (settle_parse(fields->element[f]->str, ts, &s->charges[nc + taken]) != 0) {
                count = -1;
                break;
            }
            /* A negative adjustment's guard hold (route "_adjustment",
             * always released at 0): not a call. Route ids of calls cannot
             * start with '_' (routes.c). */
            if (s->charges[nc + taken].route[0] != '_' || s->charges[nc + taken].amount != 0)
                taken++;
        }
        if (count < 0) {
            /* None of its records taken; if the copy failed, leave it pending. */
            if (settle_dead_entry(s, e->element[0]->str, fields) != 0) continue;
        } else {
            nc += taken;
        }
        snprintf(s->ids[n].id, sizeof s->ids[n].id, "%s", e->element[0]->str);
        /* What its writer added to pg:backlog: one per field after "ts". */
        snprintf(s->ids[n].records, sizeof s->ids[n].records, "%d",
                 fields && fields->type == REDIS_REPLY_ARRAY ? settle_records(fields) : 0);
        n++;
    }
    if (settle_flush(s, n, nc) != 0) return -1;
    *charges += nc;
    return entries + n;
}

static int settle_group_create(settle_state *s)
{
    /* From id 0: entries appended before the group existed are settled too. */
    const char *argv[6] = {"XGROUP", "CREATE", HOT_OUTBOX, HOT_OUTBOX_GROUP, "0", "MKSTREAM"};
    redisReply *r = hot_command_argv(s->hot, 6, argv, NULL);
    int rc = -1;
    if (!r) return -1;
    if (r->type != REDIS_REPLY_ERROR || strncmp(r->str, "BUSYGROUP", 9) == 0)
        rc = 0;
    else
        log_error("settlement: XGROUP CREATE: %s", r->str);
    freeReplyObject(r);
    return rc;
}

/* Reads entries: START "0" = our own pending ones, ">" = new ones. Returns
 * the entries handled (charges among them in *CHARGES) or -1. */
static int settle_read(settle_state *s, const char *start, int block_ms, int *charges)
{
    char count[16], block[16];
    const char *argv[10] = {"XREADGROUP", "GROUP", HOT_OUTBOX_GROUP, s->consumer, "COUNT", count,
                            "BLOCK",      block,   "STREAMS",        HOT_OUTBOX};
    const char *full[11];
    redisReply *r;
    int n = 0;
    *charges = 0;
    snprintf(count, sizeof count, "%d", s->ids_cap);
    snprintf(block, sizeof block, "%d", block_ms);
    memcpy(full, argv, sizeof argv);
    full[10] = start;
    /* No entry is read that could not be committed under the same lock. */
    if (settle_lock(s) != 0) {
        if (strcmp(start, "0") == 0) s->reread = 1; /* nothing read: still to do */
        return -1;
    }
    r = hot_command_argv(s->hot, 11, full, NULL);
    if (!r) {
        n = -1;
        if (strcmp(start, "0") == 0) s->reread = 1;
    } else if (r->type == REDIS_REPLY_ERROR) {
        /* NOGROUP: the stream or group vanished (Redis restarted empty). */
        n = settle_group_create(s) == 0 ? 0 : -1;
    } else if (r->type == REDIS_REPLY_ARRAY && r->elements == 1 && r->element[0]->elements == 2) {
        n = settle_entries(s, r->element[0]->element[1], charges);
    }
    settle_unlock(s);
    if (r) freeReplyObject(r);
    return n;
}

/* Takes over entries pending for too long on consumers that died. */
static int settle_claim(settle_state *s)
{
    char idle[24], count[16];
    const char *argv[8] = {"XAUTOCLAIM", HOT_OUTBOX, HOT_OUTBOX_GROUP, s->consumer,
                           idle,         "0-0",      "COUNT",          count};
    redisReply *r;
    int n = 0, charges;
    snprintf(idle, sizeof idle, "%lld", (long long)s->cfg->settle_claim_idle_ms);
    snprintf(count, sizeof count, "%d", s->ids_cap);
    if (settle_lock(s) != 0) return -1;
    r = hot_command_argv(s->hot, 8, argv, NULL);
    if (!r)
        n = -1;
    else if (r->type == REDIS_REPLY_ARRAY && r->elements >= 2)
        n = settle_entries(s, r->element[1], &charges);
    settle_unlock(s);
    if (n > 0) log_info("settlement: claimed %d entries from a stalled consumer", n);
    if (r) freeReplyObject(r);
    return n;
}

void *settlement_run(void *arg)
{
    worker_args *w = arg;
    settle_state s;
    char host[64] = "host";
    struct timespec last_claim = {0, 0};
    int charges;
    long backoff = 100;

    memset(&s, 0, sizeof s);
    s.cfg = w->cfg;
    s.stop = w->stop;
    s.m = w->metrics;
    s.beat = BM_BEAT_SETTLE0 + w->index;
    /* Stable across restarts, so a restarted worker resumes its own pending
     * entries; SETTLE_CONSUMER tells apart several serve processes on one
     * host (sharing a name is safe, only redundant: Postgres deduplicates). */
    gethostname(host, sizeof host - 1);
    snprintf(s.consumer, sizeof s.consumer, "%s-%d", env_str("SETTLE_CONSUMER", host), w->index);
    s.hot = hot_open(w->cfg->redis_url);
    /* Tests only (tests/e2e/test_redis_loss.py): sleep this long between
     * reading entries and committing them, holding the pass lock, to make
     * the window a Redis loss can fall into deterministic. Never set it in
     * production: it caps settlement at one batch per pause. */
    if (env_int64("SETTLE_TEST_PAUSE_MS", 0, 0, 600000, &s.pause_ms) != 0)
        s.pause_ms = 0; /* logged; a test knob never stops settlement */
    if (s.pause_ms > 0)
        log_warn("settlement: SETTLE_TEST_PAUSE_MS=%lld (tests only)", (long long)s.pause_ms);
    /* Entries per read: a gateway's entry carries up to HOT_BATCH_MAX calls
     * (one per call when traffic is light), so reading SETTLE_BATCH / 8
     * entries keeps a read's reply within a few MiB after a long backlog
     * while a transaction under load still gets SETTLE_BATCH charges. */
    s.ids_cap = w->cfg->settle_batch >= 8 ? (int)(w->cfg->settle_batch / 8) : 1;
    s.charges_cap = (int)w->cfg->settle_batch;
    s.charges = calloc((size_t)s.charges_cap, sizeof *s.charges);
    s.ids = calloc((size_t)s.ids_cap, sizeof *s.ids);
    if (!s.hot || !s.charges || !s.ids) {
        log_error("settlement: out of memory");
        goto out;
    }
    while (!atomic_load(s.stop) && settle_group_create(&s) != 0)
        worker_rest(s.stop, 1000, s.m, s.beat);
    /* Our own pending entries first: we may have died after committing. */
    s.reread = 1;
    while (!atomic_load(s.stop)) {
        struct timespec now;
        int n;
        bm_beat(s.m, s.beat);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - last_claim.tv_sec) * 1000 >= s.cfg->settle_claim_idle_ms / 2) {
            last_claim = now;
            while (!atomic_load(s.stop) && settle_claim(&s) > 0)
                bm_beat(s.m, s.beat);
        }
        if (s.reread) {
            /* Entries delivered to us and not committed (a failed commit,
             * or a restart): read again from 0, under a new lock, until
             * none is left. */
            s.reread = 0;
            n = settle_read(&s, "0", 1, &charges);
            if (n > 0) s.reread = 1;
        } else {
            n = settle_read(&s, ">", SETTLE_BLOCK_MS, &charges);
        }
        if (n < 0) {
            worker_rest(s.stop, backoff, s.m, s.beat);
            backoff = backoff < 5000 ? backoff * 2 : 5000;
            continue;
        }
        backoff = 100;
        /* A small batch means we are keeping up: linger so that the next
         * transaction carries more rows. Postgres pays per transaction far
         * more than per row, so this trades a few ms of settlement lag for
         * most of the database's CPU under load. */
        if (charges > 0 && charges < s.cfg->settle_batch / 4)
            worker_rest(s.stop, (long)s.cfg->settle_linger_ms, s.m, s.beat);
    }
out:
    free(s.charges);
    free(s.ids);
    if (s.pg) PQfinish(s.pg);
    hot_close(s.hot);
    return NULL;
}
