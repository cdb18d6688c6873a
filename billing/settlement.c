/* settlement.c: moves settled calls from the Redis outbox into Postgres.
 *
 * Reads the outbox stream through the consumer group "settle" and applies
 * each batch with ledger_settle_batch (one statement, one transaction), then
 * acknowledges and deletes the entries. Exactly once: Postgres deduplicates by
 * reservation id, so an entry redelivered after a crash between commit and
 * acknowledge changes nothing. A worker's consumer name is stable across
 * restarts (host + index), so a restarted worker first finishes its own
 * pending entries; entries left pending by a worker that never came back are
 * claimed by the others after SETTLE_CLAIM_IDLE_MS (XAUTOCLAIM).
 *
 * Entries Postgres refuses (integrity) are retried one by one and the
 * offenders moved to the stream pg:outbox:dead, so one bad entry cannot stall
 * settlement. Holds whose route starts with '_' are not calls (a negative
 * adjustment's guard) and are acknowledged without a charge row. */
#include "billing/env.h"
#include "billing/hot.h"
#include "billing/hotkeys.h"
#include "billing/ledger.h"
#include "billing/log.h"
#include "billing/workers.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SETTLE_DEAD_STREAM HOT_OUTBOX ":dead"

typedef struct settle_state {
    const billing_config *cfg;
    atomic_int *stop;
    hot_conn *hot;
    PGconn *pg;
    char consumer[128];
    ledger_charge *charges; /* cfg->settle_batch slots */
    char (*ids)[48];        /* stream ids of every entry of the batch */
} settle_state;

static const char *settle_field(const redisReply *fields, const char *name)
{
    for (size_t i = 0; i + 1 < fields->elements; i += 2)
        if (fields->element[i]->type == REDIS_REPLY_STRING &&
            strcmp(fields->element[i]->str, name) == 0 &&
            fields->element[i + 1]->type == REDIS_REPLY_STRING)
            return fields->element[i + 1]->str;
    return NULL;
}

/* Parses one entry's fields; -1 if malformed. */
static int settle_parse(const redisReply *fields, ledger_charge *c)
{
    const char *rid, *acct, *route, *amount, *hold, *outcome, *status, *ts;
    if (!fields || fields->type != REDIS_REPLY_ARRAY) return -1;
    rid = settle_field(fields, "rid");
    acct = settle_field(fields, "acct");
    route = settle_field(fields, "route");
    amount = settle_field(fields, "amount");
    hold = settle_field(fields, "hold");
    outcome = settle_field(fields, "outcome");
    status = settle_field(fields, "status");
    ts = settle_field(fields, "ts");
    if (!rid || !acct || !route || !amount || !hold || !outcome || !status || !ts) return -1;
    if (strlen(rid) >= sizeof c->rid || strlen(route) >= sizeof c->route ||
        strlen(outcome) >= sizeof c->outcome)
        return -1;
    snprintf(c->rid, sizeof c->rid, "%s", rid);
    snprintf(c->route, sizeof c->route, "%s", route);
    snprintf(c->outcome, sizeof c->outcome, "%s", outcome);
    c->account_id = strtoll(acct, NULL, 10);
    c->amount = strtoll(amount, NULL, 10);
    c->hold = strtoll(hold, NULL, 10);
    c->status = (int)strtol(status, NULL, 10);
    c->ts_ms = strtoll(ts, NULL, 10);
    return c->account_id > 0 && c->amount >= 0 ? 0 : -1;
}

/* XDEL + XACK of N stream ids: acknowledged entries leave the stream, so its
 * length is the settlement backlog. Delete first: a crash between the two
 * then leaves ids pending without an entry, which the next read of our own
 * pending ids ("0") or XAUTOCLAIM returns without fields and acknowledges.
 * The other order would leave acknowledged entries in the stream for ever
 * (never redelivered, so never deleted): a backlog that never drains. */
static int settle_ack(settle_state *s, int n)
{
    const char **argv;
    int rc = -1;
    redisReply *r;
    if (n == 0) return 0;
    argv = calloc((size_t)n + 3, sizeof *argv);
    if (!argv) return -1;
    argv[1] = "XDEL";
    argv[2] = HOT_OUTBOX;
    for (int i = 0; i < n; i++)
        argv[3 + i] = s->ids[i];
    r = hot_command_argv(s->hot, n + 2, argv + 1, NULL);
    if (r) {
        freeReplyObject(r);
        argv[0] = "XACK";
        argv[1] = HOT_OUTBOX;
        argv[2] = HOT_OUTBOX_GROUP;
        r = hot_command_argv(s->hot, n + 3, argv, NULL);
        if (r) {
            freeReplyObject(r);
            rc = 0;
        }
    }
    free(argv);
    return rc;
}

static void settle_dead_letter(settle_state *s, const ledger_charge *c, const char *why)
{
    char acct[24], amount[24];
    const char *argv[11] = {"XADD", SETTLE_DEAD_STREAM, "*",    "rid", c->rid, "acct",
                            acct,   "amount",           amount, "why", why};
    snprintf(acct, sizeof acct, "%" PRId64, c->account_id);
    snprintf(amount, sizeof amount, "%" PRId64, c->amount);
    redisReply *r = hot_command_argv(s->hot, 11, argv, NULL);
    if (r) freeReplyObject(r);
    log_error("settlement: entry %s of account %" PRId64 " refused by postgres (%s); moved to %s",
              c->rid, c->account_id, why, SETTLE_DEAD_STREAM);
}

/* An entry settle.lua cannot have written (a bug or a foreign writer): kept
 * in the dead-letter stream by id for a human, never silently dropped. */
static void settle_dead_entry(settle_state *s, const char *id)
{
    const char *argv[7] = {"XADD", SETTLE_DEAD_STREAM, "*", "entry", id, "why", "malformed"};
    redisReply *r = hot_command_argv(s->hot, 7, argv, NULL);
    if (r) freeReplyObject(r);
    log_error("settlement: malformed outbox entry %s moved to %s", id, SETTLE_DEAD_STREAM);
}

/* Writes the charges to Postgres until it works or we are told to stop.
 * Returns 0 when every charge is durable (or dead-lettered). */
static int settle_write(settle_state *s, int n)
{
    int applied = 0, rc;
    long backoff = 100;
    while (!atomic_load(s->stop)) {
        if (!s->pg) s->pg = ledger_connect(s->cfg->database_url);
        if (s->pg && ledger_check(s->pg) == 0) {
            rc = ledger_settle_batch(s->pg, s->charges, n, &applied);
            if (rc == LEDGER_OK) {
                log_debug("settlement: %d entries, %d new", n, applied);
                return 0;
            }
            if (rc == LEDGER_CONFLICT) {
                for (int i = 0; i < n; i++) {
                    rc = ledger_settle_batch(s->pg, &s->charges[i], 1, &applied);
                    if (rc == LEDGER_CONFLICT)
                        settle_dead_letter(s, &s->charges[i], "integrity");
                    else if (rc != LEDGER_OK)
                        break;
                }
                if (rc == LEDGER_OK || rc == LEDGER_CONFLICT) return 0;
            }
        }
        log_warn("settlement: postgres unavailable; retrying %d entries in %ld ms", n, backoff);
        worker_sleep(s->stop, backoff);
        backoff = backoff < 5000 ? backoff * 2 : 5000;
    }
    return -1;
}

/* Applies the entries of an XREADGROUP/XAUTOCLAIM entry list. Returns how
 * many entries it handled, or -1 when they must be retried later. */
static int settle_entries(settle_state *s, const redisReply *list)
{
    int n = 0, nc = 0;
    if (!list || list->type != REDIS_REPLY_ARRAY) return 0;
    for (size_t i = 0; i < list->elements && n < s->cfg->settle_batch; i++) {
        const redisReply *e = list->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 1 ||
            e->element[0]->type != REDIS_REPLY_STRING)
            continue;
        snprintf(s->ids[n], sizeof s->ids[n], "%s", e->element[0]->str);
        if (e->elements == 2 && settle_parse(e->element[1], &s->charges[nc]) == 0) {
            if (s->charges[nc].route[0] != '_') nc++; /* '_': a guard hold, not a call */
        } else if (e->elements == 2 && e->element[1]->type == REDIS_REPLY_ARRAY) {
            settle_dead_entry(s, s->ids[n]);
        }
        n++;
    }
    if (nc > 0 && settle_write(s, nc) != 0) return -1;
    if (settle_ack(s, n) != 0) return -1; /* redelivered later: a no-op then */
    return n;
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

/* Reads entries: START "0" = our own pending ones, ">" = new ones. */
static int settle_read(settle_state *s, const char *start, int block_ms)
{
    char count[16], block[16];
    const char *argv[10] = {"XREADGROUP", "GROUP", HOT_OUTBOX_GROUP, s->consumer, "COUNT", count,
                            "BLOCK",      block,   "STREAMS",        HOT_OUTBOX};
    const char *full[11];
    redisReply *r;
    int n = 0;
    snprintf(count, sizeof count, "%lld", (long long)s->cfg->settle_batch);
    snprintf(block, sizeof block, "%d", block_ms);
    memcpy(full, argv, sizeof argv);
    full[10] = start;
    r = hot_command_argv(s->hot, 11, full, NULL);
    if (!r) return -1;
    if (r->type == REDIS_REPLY_ERROR) {
        /* NOGROUP: the stream or group vanished (Redis restarted empty). */
        freeReplyObject(r);
        return settle_group_create(s) == 0 ? 0 : -1;
    }
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 1 && r->element[0]->elements == 2)
        n = settle_entries(s, r->element[0]->element[1]);
    freeReplyObject(r);
    return n;
}

/* Takes over entries pending for too long on consumers that died. */
static int settle_claim(settle_state *s)
{
    char idle[24], count[16];
    const char *argv[8] = {"XAUTOCLAIM", HOT_OUTBOX, HOT_OUTBOX_GROUP, s->consumer,
                           idle,         "0-0",      "COUNT",          count};
    redisReply *r;
    int n = 0;
    snprintf(idle, sizeof idle, "%lld", (long long)s->cfg->settle_claim_idle_ms);
    snprintf(count, sizeof count, "%lld", (long long)s->cfg->settle_batch);
    r = hot_command_argv(s->hot, 8, argv, NULL);
    if (!r) return -1;
    if (r->type == REDIS_REPLY_ARRAY && r->elements >= 2) n = settle_entries(s, r->element[1]);
    if (n > 0) log_info("settlement: claimed %d entries from a stalled consumer", n);
    freeReplyObject(r);
    return n;
}

void *settlement_run(void *arg)
{
    worker_args *w = arg;
    settle_state s;
    char host[64] = "host";
    struct timespec last_claim = {0, 0};

    memset(&s, 0, sizeof s);
    s.cfg = w->cfg;
    s.stop = w->stop;
    /* Stable across restarts, so a restarted worker resumes its own pending
     * entries; SETTLE_CONSUMER tells apart several serve processes on one
     * host (sharing a name is safe, only redundant: Postgres deduplicates). */
    gethostname(host, sizeof host - 1);
    snprintf(s.consumer, sizeof s.consumer, "%s-%d", env_str("SETTLE_CONSUMER", host), w->index);
    s.hot = hot_open(w->cfg->redis_url);
    s.charges = calloc((size_t)w->cfg->settle_batch, sizeof *s.charges);
    s.ids = calloc((size_t)w->cfg->settle_batch, sizeof *s.ids);
    if (!s.hot || !s.charges || !s.ids) {
        log_error("settlement: out of memory");
        goto out;
    }
    while (!atomic_load(s.stop) && settle_group_create(&s) != 0)
        worker_sleep(s.stop, 1000);
    /* Our own pending entries first: we may have died after committing. */
    while (!atomic_load(s.stop) && settle_read(&s, "0", 1) > 0) {
    }
    while (!atomic_load(s.stop)) {
        struct timespec now;
        int n;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - last_claim.tv_sec) * 1000 >= s.cfg->settle_claim_idle_ms / 2) {
            last_claim = now;
            while (!atomic_load(s.stop) && settle_claim(&s) > 0) {
            }
        }
        n = settle_read(&s, ">", 500);
        if (n < 0) worker_sleep(s.stop, 500);
        /* A small batch means we are keeping up: linger so that the next
         * transaction carries more rows. Postgres pays per transaction far
         * more than per row, so this trades a few ms of settlement lag for
         * most of the database's CPU under load. */
        else if (n > 0 && n < s.cfg->settle_batch / 4)
            worker_sleep(s.stop, (long)s.cfg->settle_linger_ms);
    }
out:
    free(s.charges);
    free(s.ids);
    if (s.pg) PQfinish(s.pg);
    hot_close(s.hot);
    return NULL;
}
