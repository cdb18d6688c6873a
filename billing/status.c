/* status.c: the status report (see status.h).
 *
 * Reconcile: for the first STATUS_MAX_ACCOUNTS accounts by id, Postgres'
 * credited must equal Redis', and Redis spent minus Postgres spent must
 * equal the amounts of that account's records still in pg:outbox (charged
 * in Redis, on their way to Postgres). Races, and how they are closed:
 *  - spent: the whole comparison runs with this session holding the pass
 *    lock (control.h) exclusively, as a repair pass does. Settlement reads,
 *    commits and acknowledges entries only under it (shared), so meanwhile
 *    Postgres spent does not move and no entry leaves the outbox; gateways
 *    still settle, but settle.lua and lease.lua raise Redis spent and append
 *    the record in one atomic step, so each chunk of accounts is read in one
 *    script together with the outbox entries appended since the last read
 *    (the sum is then exact for every account of the chunk at that
 *    instant). Cost: settlement pauses for the length of the report (one
 *    Redis round trip per 200 accounts, about a second for 10,000); the lock
 *    waits at most 5 s (lock_timeout), else the reconcile reports an error.
 *    Not closed: an entry committed by a settlement that died before
 *    acknowledging it is in both until a worker reads it again (at its
 *    restart, or claimed after SETTLE_CLAIM_IDLE_MS): it shows as a
 *    negative difference meanwhile.
 *  - credited: a top-up commits in Postgres, then pushes to Redis, without
 *    the lock. Redis is read first, so Postgres is at least as new; an
 *    account whose figures differ is read again (Postgres, then Redis) and
 *    listed only if they still differ: a push in flight has landed by then,
 *    a lost one (the repair pass fixes it) has not.
 * Holds: a hold's value carries its deadline, not its start (the route's
 * timeout is the gateway's), so the report gives the earliest deadline
 * ("earliest_deadline_in_seconds", negative when past: the sweeper releases
 * it) and "oldest_age_seconds" is null rather than a guess. */
#include "billing/status.h"

#include "billing/config.h"
#include "billing/control.h"
#include "common/hotkeys.h"
#include "billing/archive.h"
#include "billing/ledger.h"
#include "common/log.h"
#include "billing/workers.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define STATUS_CHUNK 200
#define STATUS_XRANGE_COUNT 1000

/* Per account of the reconcile. */
typedef struct status_acct {
    int64_t id, pg_credited, pg_spent, pg_seq;
    int found;
    int64_t r_credited, r_spent, outbox;
} status_acct;

/* The outbox sums by account (only accounts in the checked range). */
typedef struct status_sums {
    status_acct *a;
    int n;
    char last[48]; /* last entry id read; "" none */
    int64_t records;
    int over; /* more than STATUS_MAX_OUTBOX_RECORDS: spent not checked */
} status_sums;

static int64_t status_int(const redisReply *r)
{
    if (!r) return 0;
    if (r->type == REDIS_REPLY_INTEGER) return r->integer;
    if (r->type == REDIS_REPLY_STRING) return strtoll(r->str, NULL, 10);
    return 0;
}

static redisReply *status_cmd(hot_conn *hot, int argc, const char **argv)
{
    redisReply *r = hot_command_argv(hot, argc, argv, NULL);
    if (r && r->type == REDIS_REPLY_ERROR) {
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

static status_acct *status_find(status_sums *s, int64_t id)
{
    int lo = 0, hi = s->n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (s->a[mid].id == id) return &s->a[mid];
        if (s->a[mid].id < id)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return NULL;
}

/* Adds the records of the entries of an XRANGE reply to the sums; returns
 * how many entries it had. */
static size_t status_add_entries(status_sums *s, const redisReply *list)
{
    if (!list || list->type != REDIS_REPLY_ARRAY) return 0;
    for (size_t i = 0; i < list->elements; i++) {
        const redisReply *e = list->element[i], *f;
        int64_t ts;
        if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
            e->element[0]->type != REDIS_REPLY_STRING)
            continue;
        snprintf(s->last, sizeof s->last, "%s", e->element[0]->str);
        f = e->element[1];
        if (f->type != REDIS_REPLY_ARRAY || f->elements < 2 ||
            f->element[1]->type != REDIS_REPLY_STRING)
            continue;
        ts = strtoll(f->element[1]->str, NULL, 10);
        for (size_t k = 3; k < f->elements; k += 2) {
            ledger_charge c;
            status_acct *a;
            if (f->element[k]->type != REDIS_REPLY_STRING) continue;
            s->records++;
            /* A record settlement would dead-letter as malformed charged
             * nothing in Redis either (settle.lua writes them well formed). */
            if (settle_parse(f->element[k]->str, ts, &c) != 0) continue;
            a = status_find(s, c.account_id);
            if (a) a->outbox += c.amount;
        }
    }
    if (s->records > STATUS_MAX_OUTBOX_RECORDS) s->over = 1;
    return list->elements;
}

/* The exclusive start after the last entry read ("-" at first). */
static void status_after(const status_sums *s, char *out, size_t cap)
{
    snprintf(out, cap, "%s%s", s->last[0] ? "(" : "", s->last[0] ? s->last : "-");
}

/* Reads the outbox up to now (entries since the last read), in pages. */
static int status_catch_up(hot_conn *hot, status_sums *s)
{
    char start[64], count[16];
    snprintf(count, sizeof count, "%d", STATUS_XRANGE_COUNT);
    for (;;) {
        const char *argv[6] = {"XRANGE", HOT_OUTBOX, start, "+", "COUNT", count};
        redisReply *r;
        size_t n;
        status_after(s, start, sizeof start);
        if (!(r = status_cmd(hot, 6, argv))) return -1;
        n = status_add_entries(s, r);
        freeReplyObject(r);
        if (n < STATUS_XRANGE_COUNT || s->over) return 0;
    }
}

/* One chunk [LO, HI) of accounts: their hashes and the outbox entries since
 * the last read, in one atomic script (see the top). */
static const char status_chunk_lua[] =
    "local out = {redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])}\n"
    "for i = 2, #KEYS do\n"
    "  out[#out + 1] = redis.call('HMGET', KEYS[i], 'credited', 'spent', 'seq')\n"
    "end\n"
    "return out\n";

static int status_chunk(hot_conn *hot, status_sums *s, int lo, int hi)
{
    const char **argv = calloc((size_t)(hi - lo) + 7, sizeof *argv);
    hot_keys *keys = calloc((size_t)(hi - lo), sizeof *keys);
    char nkeys[16], start[64], count[16];
    int rc = -1;
    if (!argv || !keys) goto out;
    for (int again = 1; again;) {
        int argc = 0;
        redisReply *r;
        again = 0;
        if (status_catch_up(hot, s) != 0) goto out;
        if (s->over) {
            rc = 0;
            goto out;
        }
        status_after(s, start, sizeof start);
        snprintf(nkeys, sizeof nkeys, "%d", hi - lo + 1);
        snprintf(count, sizeof count, "%d", STATUS_XRANGE_COUNT);
        argv[argc++] = "EVAL";
        argv[argc++] = status_chunk_lua;
        argv[argc++] = nkeys;
        argv[argc++] = HOT_OUTBOX;
        for (int i = lo; i < hi; i++) {
            hot_keys_for(&keys[i - lo], s->a[i].id);
            argv[argc++] = keys[i - lo].acct;
        }
        argv[argc++] = start;
        argv[argc++] = count;
        r = status_cmd(hot, argc, argv);
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != (size_t)(hi - lo + 1)) {
            if (r) freeReplyObject(r);
            goto out;
        }
        /* A full page: more entries came meanwhile; take them and read the
         * chunk again so its hashes and the sums are of one instant. */
        if (status_add_entries(s, r->element[0]) == STATUS_XRANGE_COUNT) {
            again = 1;
        } else {
            for (int i = lo; i < hi; i++) {
                const redisReply *h = r->element[i - lo + 1];
                status_acct *a = &s->a[i];
                a->found = h->type == REDIS_REPLY_ARRAY && h->elements == 3 &&
                           h->element[0]->type == REDIS_REPLY_STRING;
                a->r_credited = a->found ? status_int(h->element[0]) : 0;
                a->r_spent = a->found ? status_int(h->element[1]) : 0;
            }
        }
        freeReplyObject(r);
    }
    rc = 0;
out:
    free(argv);
    free(keys);
    return rc;
}

static int status_pg_accounts(PGconn *pg, status_sums *s, int *truncated)
{
    char lim[16];
    const char *params[1] = {lim};
    PGresult *r;
    snprintf(lim, sizeof lim, "%d", STATUS_MAX_ACCOUNTS + 1);
    r = ledger_query(
        pg, "SELECT id, credited, spent, credit_seq FROM accounts ORDER BY id LIMIT $1", 1, params);
    if (!r) return -1;
    s->n = PQntuples(r);
    *truncated = s->n > STATUS_MAX_ACCOUNTS;
    if (*truncated) s->n = STATUS_MAX_ACCOUNTS;
    s->a = calloc((size_t)(s->n ? s->n : 1), sizeof *s->a);
    if (!s->a) {
        PQclear(r);
        return -1;
    }
    for (int i = 0; i < s->n; i++) {
        s->a[i].id = strtoll(PQgetvalue(r, i, 0), NULL, 10);
        s->a[i].pg_credited = strtoll(PQgetvalue(r, i, 1), NULL, 10);
        s->a[i].pg_spent = strtoll(PQgetvalue(r, i, 2), NULL, 10);
        s->a[i].pg_seq = strtoll(PQgetvalue(r, i, 3), NULL, 10);
    }
    PQclear(r);
    return 0;
}

/* Reads one account again (Postgres, then Redis): a credit push in flight
 * when it was first read has landed by now. */
static void status_recheck(PGconn *pg, hot_conn *hot, status_acct *a)
{
    ledger_account la;
    int found;
    int64_t credited, spent, held;
    if (ledger_account_get(pg, a->id, &la) != LEDGER_OK) return;
    if (hot_account(hot, a->id, &found, &credited, &spent, &held) != 0) return;
    a->pg_credited = la.credited;
    a->found = found;
    if (found) a->r_credited = credited;
}

static json_t *status_reconcile(PGconn *pg, hot_conn *hot, int *mismatches)
{
    status_sums s;
    json_t *out = json_object(), *list = json_array();
    int truncated = 0, locked = 0, count = 0;
    const char *err = NULL;
    PGresult *r;
    memset(&s, 0, sizeof s);
    *mismatches = 0;
    if (!out || !list) goto fail;
    /* Bounded wait for the lock: a repair pass holds it for its account
     * phase; settlement only for one read and commit. */
    r = PQexec(pg, "SET lock_timeout = '5s'");
    PQclear(r);
    if (control_pass_lock(pg, 1) != 0) {
        err = "could not take the pass lock (a repair pass running?); retry";
        goto done;
    }
    locked = 1;
    if (status_pg_accounts(pg, &s, &truncated) != 0) {
        err = "postgres: reading accounts failed";
        goto done;
    }
    for (int lo = 0; lo < s.n && !s.over; lo += STATUS_CHUNK) {
        int hi = lo + STATUS_CHUNK < s.n ? lo + STATUS_CHUNK : s.n;
        if (status_chunk(hot, &s, lo, hi) != 0) {
            err = "redis: reading accounts failed";
            goto done;
        }
    }
    if (control_pass_lock(pg, 0) != 0) PQreset(pg); /* never left held */
    locked = 0;
    for (int i = 0; i < s.n; i++) {
        status_acct *a = &s.a[i];
        int64_t diff, cdiff;
        if (a->found && a->r_credited != a->pg_credited) status_recheck(pg, hot, a);
        diff = s.over ? 0 : (a->r_spent - a->pg_spent) - a->outbox;
        cdiff = a->r_credited - a->pg_credited;
        if (a->found && diff == 0 && cdiff == 0) continue;
        count++;
        if (count > STATUS_MAX_LISTED) continue;
        json_t *m = json_object();
        json_object_set_new(m, "account_id", json_integer(a->id));
        json_object_set_new(m, "redis_credited",
                            a->found ? json_integer(a->r_credited) : json_null());
        json_object_set_new(m, "pg_credited", json_integer(a->pg_credited));
        json_object_set_new(m, "redis_spent", a->found ? json_integer(a->r_spent) : json_null());
        json_object_set_new(m, "pg_spent", json_integer(a->pg_spent));
        json_object_set_new(m, "outbox_pending", json_integer(a->outbox));
        json_object_set_new(m, "difference", a->found ? json_integer(diff) : json_null());
        json_object_set_new(m, "credited_difference", a->found ? json_integer(cdiff) : json_null());
        json_object_set_new(m, "problem",
                            json_string(!a->found ? "missing_in_redis"
                                        : cdiff   ? (diff ? "credited_and_spent" : "credited")
                                                  : "spent"));
        json_array_append_new(list, m);
    }
done:
    if (locked && control_pass_lock(pg, 0) != 0) PQreset(pg);
    r = PQexec(pg, "RESET lock_timeout");
    PQclear(r);
    *mismatches = count;
    json_object_set_new(out, "accounts_checked", json_integer(err ? 0 : s.n));
    json_object_set_new(out, "mismatches", list);
    json_object_set_new(out, "mismatch_count", json_integer(count));
    json_object_set_new(out, "truncated", json_boolean(truncated || count > STATUS_MAX_LISTED));
    json_object_set_new(out, "spent_checked", json_boolean(!s.over && !err));
    json_object_set_new(out, "outbox_records_read", json_integer(s.records));
    json_object_set_new(out, "error", err ? json_string(err) : json_null());
    free(s.a);
    return out;
fail:
    json_decref(out);
    json_decref(list);
    free(s.a);
    return NULL;
}

/* Holds and leases: every pg:{A}:holds hash (SCAN + HGETALL), bounded. */
static void status_holds(hot_conn *hot, int64_t now, json_t *report)
{
    char cursor[32] = "0";
    int64_t holds = 0, leases = 0, lease_points = 0, expired = 0, accounts = 0;
    int64_t earliest = INT64_MAX, earliest_acct = 0;
    int truncated = 0, failed = 0;
    do {
        const char *argv[6] = {"SCAN", cursor, "MATCH", "pg:{*}:holds", "COUNT", "1000"};
        redisReply *r = status_cmd(hot, 6, argv);
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
            if (r) freeReplyObject(r);
            failed = 1;
            break;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        for (size_t i = 0; i < r->element[1]->elements && !truncated; i++) {
            const char *key = r->element[1]->element[i]->str;
            const char *hargv[2] = {"HGETALL", key};
            const char *open = strchr(key, '{');
            int64_t acct = open ? strtoll(open + 1, NULL, 10) : 0;
            int any = 0;
            redisReply *h = status_cmd(hot, 2, hargv);
            if (!h) continue;
            for (size_t k = 1; h->type == REDIS_REPLY_ARRAY && k < h->elements; k += 2) {
                const char *v = h->element[k]->str, *bar;
                int64_t amount, dl;
                if (!v) continue;
                amount = strtoll(v, NULL, 10);
                if (strstr(v, "|~lease|")) {
                    leases++;
                    lease_points += amount;
                    continue;
                }
                bar = strrchr(v, '|');
                dl = bar ? strtoll(bar + 1, NULL, 10) : 0;
                holds++;
                any = 1;
                if (dl && dl <= now) expired++;
                if (dl && dl < earliest) {
                    earliest = dl;
                    earliest_acct = acct;
                }
            }
            accounts += any;
            freeReplyObject(h);
            if (holds + leases >= STATUS_MAX_HOLDS) truncated = 1;
        }
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0 && !truncated);
    json_object_set_new(
        report, "holds",
        json_pack("{s:I, s:n, s:o, s:o, s:I, s:I, s:b, s:b}", "open", (json_int_t)holds,
                  "oldest_age_seconds", "earliest_deadline_in_seconds",
                  earliest == INT64_MAX ? json_null()
                                        : json_real((double)(earliest - now) / 1000.0),
                  "earliest_deadline_account",
                  earliest == INT64_MAX ? json_null() : json_integer(earliest_acct),
                  "accounts_with_holds", (json_int_t)accounts, "expired", (json_int_t)expired,
                  "truncated", truncated, "complete", !failed && !truncated));
    json_object_set_new(
        report, "leases",
        json_pack("{s:I, s:I}", "count", (json_int_t)leases, "points", (json_int_t)lease_points));
}

static json_t *status_store(int ok, const char *error)
{
    return json_pack("{s:b, s:o}", "reachable", ok, "error",
                     ok || !error ? json_null() : json_string(error));
}

/* The charges table's life cycle (archive.c) into REPORT's "ledger": 0
 * when it needs attention (partitions for fewer than 2 days ahead: the
 * archive pass is not running, and settlement soon dead-letters). */
static int status_ledger(PGconn *pg, json_t *report)
{
    archive_state st;
    if (archive_state_read(pg, &st) != 0) {
        json_object_set_new(report, "ledger", json_null());
        return 1;
    }
    json_object_set_new(report, "ledger",
                        json_pack("{s:I, s:I, s:I, s:I, s:s, s:s}", "days_ahead",
                                  (json_int_t)st.days_ahead, "partitions", (json_int_t)st.attached,
                                  "detached", (json_int_t)st.detached, "archived",
                                  (json_int_t)st.archived, "oldest_day", st.oldest_day,
                                  "closed_through", st.closed_through));
    return st.days_ahead >= 2;
}

json_t *status_build(PGconn *pg, const char *pg_error, hot_conn *hot, int *verdict)
{
    json_t *rep = json_object();
    const char *ping[1] = {"PING"}, *tm[1] = {"TIME"};
    redisReply *r;
    int pg_ok = 0, redis_ok = 0, mismatches = 0, ledger_ok = 1;
    int64_t now = 0, dead = 0;
    char pgerr[256] = "";
    if (!rep) return NULL;
    if (pg && PQstatus(pg) == CONNECTION_OK) {
        PGresult *q = PQexec(pg, "SELECT 1");
        pg_ok = PQresultStatus(q) == PGRES_TUPLES_OK;
        PQclear(q);
    }
    if (!pg_ok)
        snprintf(pgerr, sizeof pgerr, "%s",
                 pg_error ? pg_error
                 : pg     ? PQerrorMessage(pg)
                          : "not connected");
    pgerr[strcspn(pgerr, "\n")] = '\0';
    r = status_cmd(hot, 1, ping);
    redis_ok = r != NULL;
    if (r) freeReplyObject(r);
    json_object_set_new(rep, "redis", status_store(redis_ok, hot_error(hot)));
    json_object_set_new(rep, "postgres", status_store(pg_ok, pgerr));
    if (redis_ok && (r = status_cmd(hot, 1, tm)) != NULL) {
        if (r->type == REDIS_REPLY_ARRAY && r->elements == 2)
            now = strtoll(r->element[0]->str, NULL, 10) * 1000 +
                  strtoll(r->element[1]->str, NULL, 10) / 1000;
        freeReplyObject(r);
    }
    if (redis_ok) {
        const char *bl[2] = {"GET", HOT_BACKLOG}, *len[2] = {"XLEN", HOT_OUTBOX};
        const char *first[6] = {"XRANGE", HOT_OUTBOX, "-", "+", "COUNT", "1"};
        const char *pend[3] = {"XPENDING", HOT_OUTBOX, HOT_OUTBOX_GROUP};
        const char *dl[2] = {"XLEN", HOT_OUTBOX ":dead"};
        int64_t backlog = 0, entries = 0, pending = 0;
        double age = 0;
        if ((r = status_cmd(hot, 2, bl))) backlog = status_int(r), freeReplyObject(r);
        if ((r = status_cmd(hot, 2, len))) entries = status_int(r), freeReplyObject(r);
        if ((r = status_cmd(hot, 6, first))) {
            if (r->type == REDIS_REPLY_ARRAY && r->elements == 1 &&
                r->element[0]->type == REDIS_REPLY_ARRAY && r->element[0]->elements >= 1) {
                int64_t id_ms = strtoll(r->element[0]->element[0]->str, NULL, 10);
                age = now > id_ms ? (double)(now - id_ms) / 1000.0 : 0;
            }
            freeReplyObject(r);
        }
        /* NOGROUP (no settlement ever ran): nothing claimed. */
        if ((r = status_cmd(hot, 3, pend))) {
            if (r->type == REDIS_REPLY_ARRAY && r->elements >= 1)
                pending = status_int(r->element[0]);
            freeReplyObject(r);
        }
        if ((r = status_cmd(hot, 2, dl))) dead = status_int(r), freeReplyObject(r);
        json_object_set_new(rep, "outbox",
                            json_pack("{s:I, s:I, s:f, s:I}", "backlog_records",
                                      (json_int_t)backlog, "entries", (json_int_t)entries,
                                      "oldest_age_seconds", age, "pending_claims",
                                      (json_int_t)pending));
        json_object_set_new(rep, "dead_letters", json_integer(dead));
        status_holds(hot, now, rep);
    } else {
        json_object_set_new(rep, "outbox", json_null());
        json_object_set_new(rep, "dead_letters", json_null());
        json_object_set_new(rep, "holds", json_null());
        json_object_set_new(rep, "leases", json_null());
    }
    if (pg_ok) {
        ledger_ok = status_ledger(pg, rep);
    } else {
        json_object_set_new(rep, "ledger", json_null());
    }
    if (pg_ok && redis_ok) {
        json_t *rec = status_reconcile(pg, hot, &mismatches);
        json_object_set_new(rep, "reconcile", rec ? rec : json_null());
    } else {
        json_object_set_new(rep, "reconcile",
                            json_pack("{s:i, s:[], s:b, s:s}", "accounts_checked", 0, "mismatches",
                                      "truncated", 0, "error", "a store is unreachable"));
    }
    *verdict = !pg_ok || !redis_ok                        ? STATUS_UNREACHABLE
               : mismatches > 0 || dead > 0 || !ledger_ok ? STATUS_MISMATCH
                                                          : STATUS_OK;
    json_object_set_new(rep, "verdict",
                        json_string(*verdict == STATUS_OK            ? "healthy"
                                    : *verdict == STATUS_UNREACHABLE ? "unreachable"
                                                                     : "attention"));
    return rep;
}

static const char *status_s(const json_t *o, const char *k)
{
    const json_t *v = json_object_get(o, k);
    return json_is_string(v) ? json_string_value(v) : "-";
}

static long long status_i(const json_t *o, const char *k)
{
    return (long long)json_integer_value(json_object_get(o, k));
}

void status_print(FILE *f, const json_t *rep)
{
    const json_t *red = json_object_get(rep, "redis"), *pg = json_object_get(rep, "postgres");
    const json_t *ob = json_object_get(rep, "outbox"), *h = json_object_get(rep, "holds");
    const json_t *l = json_object_get(rep, "leases"), *rec = json_object_get(rep, "reconcile");
    const json_t *mm = json_object_get(rec, "mismatches"), *m;
    size_t i;
    fprintf(f, "STORE     REACHABLE  ERROR\n");
    fprintf(f, "redis     %-9s  %s\n",
            json_is_true(json_object_get(red, "reachable")) ? "yes" : "NO", status_s(red, "error"));
    fprintf(f, "postgres  %-9s  %s\n",
            json_is_true(json_object_get(pg, "reachable")) ? "yes" : "NO", status_s(pg, "error"));
    if (json_is_object(ob)) {
        fprintf(f, "\nOUTBOX    BACKLOG  ENTRIES  LAG_S     PENDING  DEAD_LETTERS\n");
        fprintf(f, "          %-7lld  %-7lld  %-8.3f  %-7lld  %lld\n",
                status_i(ob, "backlog_records"), status_i(ob, "entries"),
                json_number_value(json_object_get(ob, "oldest_age_seconds")),
                status_i(ob, "pending_claims"), status_i(rep, "dead_letters"));
    }
    if (json_is_object(h)) {
        const json_t *dl = json_object_get(h, "earliest_deadline_in_seconds");
        fprintf(f,
                "\nHOLDS     OPEN     ACCOUNTS  EXPIRED  EARLIEST_DEADLINE_S  ACCOUNT  LEASES  "
                "LEASED_POINTS%s\n",
                json_is_true(json_object_get(h, "truncated")) ? "  (truncated)" : "");
        fprintf(f, "          %-7lld  %-8lld  %-7lld  ", status_i(h, "open"),
                status_i(h, "accounts_with_holds"), status_i(h, "expired"));
        if (json_is_number(dl))
            fprintf(f, "%-19.3f  %-7lld  ", json_number_value(dl),
                    status_i(h, "earliest_deadline_account"));
        else
            fprintf(f, "%-19s  %-7s  ", "-", "-");
        fprintf(f, "%-6lld  %lld\n", status_i(l, "count"), status_i(l, "points"));
    }
    if (json_is_object(json_object_get(rep, "ledger"))) {
        const json_t *lg = json_object_get(rep, "ledger");
        fprintf(
            f,
            "\nLEDGER    DAYS_AHEAD  PARTITIONS  DETACHED  ARCHIVED  OLDEST_DAY  CLOSED_THROUGH\n");
        fprintf(f, "          %-10lld  %-10lld  %-8lld  %-8lld  %-10s  %s\n",
                status_i(lg, "days_ahead"), status_i(lg, "partitions"), status_i(lg, "detached"),
                status_i(lg, "archived"), status_s(lg, "oldest_day"),
                status_s(lg, "closed_through"));
    }
    fprintf(f, "\nRECONCILE %lld accounts checked, %lld mismatch(es)%s%s%s\n",
            status_i(rec, "accounts_checked"), status_i(rec, "mismatch_count"),
            json_is_true(json_object_get(rec, "truncated")) ? " (truncated)" : "",
            json_is_string(json_object_get(rec, "error")) ? ": " : "",
            json_is_string(json_object_get(rec, "error")) ? status_s(rec, "error") : "");
    if (json_array_size(mm) > 0)
        fprintf(f, "ACCOUNT   REDIS_CREDITED  PG_CREDITED  REDIS_SPENT  PG_SPENT  OUTBOX  "
                   "DIFFERENCE  PROBLEM\n");
    json_array_foreach(mm, i, m)
    {
        fprintf(f, "%-8lld  %-14lld  %-11lld  %-11lld  %-8lld  %-6lld  %-10lld  %s\n",
                status_i(m, "account_id"), status_i(m, "redis_credited"),
                status_i(m, "pg_credited"), status_i(m, "redis_spent"), status_i(m, "pg_spent"),
                status_i(m, "outbox_pending"), status_i(m, "difference"), status_s(m, "problem"));
    }
    fprintf(f, "\n%s\n", status_s(rep, "verdict"));
}

int status_cli(int argc, char **argv)
{
    billing_config cfg;
    const char *keys[3] = {"dbname", "connect_timeout", NULL};
    const char *vals[3] = {NULL, "2", NULL};
    int json = 0, verdict = STATUS_UNREACHABLE;
    PGconn *pg;
    hot_conn *hot;
    json_t *rep;
    char err[512] = "";
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf("usage: billing status [--json]\n\n"
                   "Redis and Postgres reachability, outbox backlog and lag, dead letters,\n"
                   "holds and leases, and accounts whose Redis and Postgres figures differ\n"
                   "beyond what the outbox explains. Exit 0 healthy, 1 a store unreachable,\n"
                   "5 mismatches or dead letters.\n");
            return 0;
        } else {
            fprintf(stderr, "billing: status: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (config_load(&cfg, 1, 0, 0) != 0) return 2;
    vals[0] = cfg.database_url;
    pg = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(pg) != CONNECTION_OK) snprintf(err, sizeof err, "%s", PQerrorMessage(pg));
    hot = hot_open(cfg.redis_url);
    if (!hot) {
        PQfinish(pg);
        return 2;
    }
    rep = status_build(pg, err[0] ? err : NULL, hot, &verdict);
    if (!rep) {
        fprintf(stderr, "billing: status: out of memory\n");
        verdict = 1;
    } else if (json) {
        char *text = json_dumps(rep, JSON_INDENT(2));
        if (text) printf("%s\n", text);
        free(text);
    } else {
        status_print(stdout, rep);
    }
    json_decref(rep);
    PQfinish(pg);
    hot_close(hot);
    return verdict;
}
