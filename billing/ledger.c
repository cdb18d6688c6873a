/* ledger.c: the Postgres ledger (see ledger.h).
 *
 * Credits serialise per account on the account row (SELECT ... FOR UPDATE):
 * that is what makes a reference idempotent under concurrent duplicates (the
 * second transaction waits, then finds the first one's entry) and gives each
 * entry a gap-free credit_seq. Settlement takes no explicit lock: its single
 * statement deduplicates by reservation id and bumps totals with relative
 * updates, so concurrent workers are safe (a deadlock between two is retried
 * by the caller). */
#include "billing/ledger.h"

#include "billing/events.h"
#include "common/buf.h"
#include "common/log.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ACCOUNT_COLS                                                                               \
    "id, name, credited, spent, credit_seq, to_char(created_at AT TIME ZONE 'UTC', "               \
    "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

int ledger_valid_text(const char *s, size_t max_chars)
{
    size_t chars = 0;
    if (!s || !*s) return 0;
    for (; *s; s++) {
        unsigned char b = (unsigned char)*s;
        if (b < 0x20 || b == 0x7f) return 0;
        if ((b & 0xC0) != 0x80) chars++; /* not a continuation byte */
    }
    return chars <= max_chars;
}

PGconn *ledger_connect(const char *url)
{
    PGconn *conn = PQconnectdb(url);
    if (PQstatus(conn) != CONNECTION_OK) {
        log_error("postgres: %s", PQerrorMessage(conn));
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

int ledger_check(PGconn *conn)
{
    if (PQstatus(conn) == CONNECTION_OK) return 0;
    PQreset(conn);
    return PQstatus(conn) == CONNECTION_OK ? 0 : -1;
}

static int64_t ledger_i64(const PGresult *r, int row, int col)
{
    return (int64_t)strtoll(PQgetvalue(r, row, col), NULL, 10);
}

static void ledger_copy(char *dst, size_t n, const PGresult *r, int row, int col)
{
    snprintf(dst, n, "%s", PQgetvalue(r, row, col));
}

/* Executes a statement. A connection that died between two calls (Postgres
 * restarted) is reset and the statement sent once more, but only when it was
 * not inside a transaction of ours: then it is either a read, a statement
 * that is idempotent (settlement batches, revokes), or a BEGIN, and the
 * transaction that follows runs whole on the new connection. The residual
 * risk, a server dying after committing an autocommit insert but before
 * answering, can only duplicate an account or key creation, never money. */
static PGresult *ledger_run(PGconn *conn, const char *sql, int n, const char *const *params)
{
    int idle = PQtransactionStatus(conn) == PQTRANS_IDLE;
    PGresult *r = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
    if (idle && PQstatus(conn) == CONNECTION_BAD) {
        PQclear(r);
        PQreset(conn);
        if (PQstatus(conn) != CONNECTION_OK) return NULL;
        log_info("postgres: reconnected");
        r = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
    }
    return r;
}

/* Runs a parameterised statement; NULL (after logging) unless it succeeded. */
PGresult *ledger_query(PGconn *conn, const char *sql, int n, const char *const *params)
{
    PGresult *r = ledger_run(conn, sql, n, params);
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) return r;
    log_error("postgres: %s", PQerrorMessage(conn));
    PQclear(r);
    return NULL;
}

/* Classifies a statement's result: integrity/check violations are the
 * caller's input, everything else is the database's trouble. Takes R. */
static int ledger_result(PGconn *conn, PGresult *r, PGresult **out)
{
    ExecStatusType st = PQresultStatus(r);
    const char *state;
    int rc;
    *out = NULL;
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK) {
        *out = r;
        return LEDGER_OK;
    }
    state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    if (state && strcmp(state, "23503") == 0)
        rc = LEDGER_NOT_FOUND; /* foreign key */
    else if (state && strcmp(state, "23514") == 0)
        rc = LEDGER_LIMIT; /* check */
    else if (state && strncmp(state, "23", 2) == 0)
        rc = LEDGER_CONFLICT;
    else
        rc = LEDGER_ERROR;
    if (rc == LEDGER_ERROR) log_error("postgres: %s", PQerrorMessage(conn));
    PQclear(r);
    return rc;
}

static int ledger_failure(PGconn *conn, const char *sql, int n, const char *const *params,
                          PGresult **out)
{
    return ledger_result(conn, ledger_run(conn, sql, n, params), out);
}

static int ledger_exec(PGconn *conn, const char *sql)
{
    PGresult *r = ledger_query(conn, sql, 0, NULL);
    if (!r) return LEDGER_ERROR;
    PQclear(r);
    return LEDGER_OK;
}

static void ledger_fill_account_row(ledger_account *a, const PGresult *r, int row)
{
    a->id = ledger_i64(r, row, 0);
    ledger_copy(a->name, sizeof a->name, r, row, 1);
    a->credited = ledger_i64(r, row, 2);
    a->spent = ledger_i64(r, row, 3);
    a->credit_seq = ledger_i64(r, row, 4);
    ledger_copy(a->created_at, sizeof a->created_at, r, row, 5);
}

static void ledger_fill_account(ledger_account *a, const PGresult *r)
{
    ledger_fill_account_row(a, r, 0);
}

void ledger_fill_entry(ledger_entry *e, const PGresult *r, int row)
{
    e->id = ledger_i64(r, row, 0);
    e->account_id = ledger_i64(r, row, 1);
    ledger_copy(e->kind, sizeof e->kind, r, row, 2);
    e->amount = ledger_i64(r, row, 3);
    ledger_copy(e->reference, sizeof e->reference, r, row, 4);
    ledger_copy(e->reason, sizeof e->reason, r, row, 5);
    e->credit_seq = ledger_i64(r, row, 6);
    e->credited_after = ledger_i64(r, row, 7);
    ledger_copy(e->operator_name, sizeof e->operator_name, r, row, 8);
    ledger_copy(e->created_at, sizeof e->created_at, r, row, 9);
}

int ledger_account_create(PGconn *conn, const char *name, ledger_account *out)
{
    const char *p[1] = {name};
    PGresult *r = NULL;
    int rc = ledger_failure(conn, "INSERT INTO accounts (name) VALUES ($1) RETURNING " ACCOUNT_COLS,
                            1, p, &r);
    if (rc != LEDGER_OK) return rc;
    ledger_fill_account(out, r);
    PQclear(r);
    return LEDGER_OK;
}

int ledger_account_get(PGconn *conn, int64_t id, ledger_account *out)
{
    char ids[24];
    const char *p[1] = {ids};
    PGresult *r;
    int rc = LEDGER_NOT_FOUND;
    snprintf(ids, sizeof ids, "%" PRId64, id);
    r = ledger_query(conn, "SELECT " ACCOUNT_COLS " FROM accounts WHERE id = $1", 1, p);
    if (!r) return LEDGER_ERROR;
    if (PQntuples(r) == 1) {
        ledger_fill_account(out, r);
        rc = LEDGER_OK;
    }
    PQclear(r);
    return rc;
}

int ledger_accounts(PGconn *conn, int64_t after, int max, ledger_account *out, int *n)
{
    char afters[24], maxs[16];
    const char *p[2] = {afters, maxs};
    PGresult *r;
    snprintf(afters, sizeof afters, "%" PRId64, after);
    snprintf(maxs, sizeof maxs, "%d", max);
    r = ledger_query(
        conn, "SELECT " ACCOUNT_COLS " FROM accounts WHERE id > $1 ORDER BY id LIMIT $2", 2, p);
    if (!r) return LEDGER_ERROR;
    *n = PQntuples(r);
    for (int i = 0; i < *n; i++)
        ledger_fill_account_row(&out[i], r, i);
    PQclear(r);
    return LEDGER_OK;
}

int ledger_entry_by_reference(PGconn *conn, int64_t account_id, const char *reference,
                              ledger_entry *out)
{
    char ids[24];
    const char *p[2] = {ids, reference};
    PGresult *r;
    int rc = LEDGER_NOT_FOUND;
    snprintf(ids, sizeof ids, "%" PRId64, account_id);
    r = ledger_query(conn,
                     "SELECT " LEDGER_ENTRY_COLS
                     " FROM ledger_entries WHERE account_id = $1 AND reference = $2",
                     2, p);
    if (!r) return LEDGER_ERROR;
    if (PQntuples(r) == 1) {
        ledger_fill_entry(out, r, 0);
        rc = LEDGER_OK;
    }
    PQclear(r);
    return rc;
}

int ledger_same_terms(const ledger_entry *e, const char *kind, int64_t amount)
{
    return e->amount == amount && strcmp(e->kind, kind) == 0;
}

/* The credit's event (topup.created or adjustment.created) and the
 * account's thresholds against its new balance, in the credit's
 * transaction: the event exists iff the credit committed, and the row lock
 * the credit holds makes the crossing check exact (a credit re-arms, a
 * debit may fire). */
static int ledger_credit_event(PGconn *conn, const ledger_entry *e, int64_t spent)
{
    int rc;
    json_t *data = json_pack(
        "{s:I, s:I, s:s, s:I, s:s?, s:s?, s:I, s:I, s:s}", "entry_id", (json_int_t)e->id,
        "account_id", (json_int_t)e->account_id, "kind", e->kind, "amount", (json_int_t)e->amount,
        "reference", e->reference[0] ? e->reference : NULL, "reason",
        e->reason[0] ? e->reason : NULL, "credited_after", (json_int_t)e->credited_after, "balance",
        (json_int_t)(e->credited_after - spent), "created_at", e->created_at);
    if (!data) return LEDGER_ERROR;
    rc = events_add(conn, e->account_id,
                    strcmp(e->kind, "topup") == 0 ? "topup.created" : "adjustment.created", data);
    json_decref(data);
    if (rc != LEDGER_OK) return rc;
    return events_check_balance(conn, e->account_id, NULL, NULL);
}

/* The body of ledger_credit, inside its transaction. */
static int ledger_credit_tx(PGconn *conn, int64_t account_id, const char *ids, const char *kind,
                            int64_t amount, const char *reference, const char *reason,
                            const char *operator_name, ledger_entry *out, int *created,
                            int64_t *spent_out)
{
    char amounts[24];
    PGresult *r;
    int64_t credited, spent;
    int rc;

    {
        const char *p[1] = {ids};
        r = ledger_query(conn, "SELECT credited, spent FROM accounts WHERE id = $1 FOR UPDATE", 1,
                         p);
        if (!r) return LEDGER_ERROR;
        if (PQntuples(r) != 1) {
            PQclear(r);
            return LEDGER_NOT_FOUND;
        }
        credited = ledger_i64(r, 0, 0);
        spent = ledger_i64(r, 0, 1);
        *spent_out = spent;
        PQclear(r);
    }
    if (reference) {
        rc = ledger_entry_by_reference(conn, account_id, reference, out);
        if (rc == LEDGER_OK) {
            *created = 0;
            return ledger_same_terms(out, kind, amount) ? LEDGER_OK : LEDGER_CONFLICT;
        }
        if (rc != LEDGER_NOT_FOUND) return rc;
    }
    if (amount < 0 && credited + amount < spent) return LEDGER_INSUFFICIENT;
    snprintf(amounts, sizeof amounts, "%" PRId64, amount);
    {
        const char *p[6] = {ids, kind, amounts, reference, reason, operator_name};
        rc = ledger_failure(
            conn,
            "WITH a AS (UPDATE accounts SET credited = credited + $3::bigint, "
            "  credit_seq = credit_seq + 1 WHERE id = $1 RETURNING credited, credit_seq) "
            "INSERT INTO ledger_entries (account_id, kind, amount, reference, reason, credit_seq, "
            "  credited_after, operator) "
            "SELECT $1, $2, $3, $4, $5, a.credit_seq, a.credited, $6 FROM a "
            "RETURNING " LEDGER_ENTRY_COLS,
            6, p, &r);
    }
    if (rc != LEDGER_OK) return rc;
    ledger_fill_entry(out, r, 0);
    PQclear(r);
    *created = 1;
    return ledger_credit_event(conn, out, spent);
}

int ledger_credit(PGconn *conn, int64_t account_id, const char *kind, int64_t amount,
                  const char *reference, const char *reason, const char *operator_name,
                  ledger_entry *out, int *created, int64_t *spent_out)
{
    char ids[24];
    int rc;
    *created = 0;
    if (amount == 0 || amount > LEDGER_MAX_AMOUNT || amount < -LEDGER_MAX_AMOUNT)
        return LEDGER_LIMIT;
    snprintf(ids, sizeof ids, "%" PRId64, account_id);
    if (ledger_exec(conn, "BEGIN") != LEDGER_OK) return LEDGER_ERROR;
    rc = ledger_credit_tx(conn, account_id, ids, kind, amount, reference, reason, operator_name,
                          out, created, spent_out);
    if (rc == LEDGER_OK && *created) {
        if (ledger_exec(conn, "COMMIT") != LEDGER_OK) {
            *created = 0;
            return LEDGER_ERROR;
        }
        return LEDGER_OK;
    }
    /* Nothing written (replay, refusal or failure): roll back either way. */
    ledger_exec(conn, "ROLLBACK");
    return rc;
}

int ledger_entries(PGconn *conn, int64_t account_id, int64_t before, int max, ledger_entry *out,
                   int *n)
{
    char ids[24], befores[24], maxs[16];
    const char *p[3] = {ids, befores, maxs};
    PGresult *r;
    snprintf(ids, sizeof ids, "%" PRId64, account_id);
    snprintf(befores, sizeof befores, "%" PRId64, before > 0 ? before : INT64_MAX);
    snprintf(maxs, sizeof maxs, "%d", max);
    r = ledger_query(conn,
                     "SELECT " LEDGER_ENTRY_COLS
                     " FROM ledger_entries WHERE account_id = $1 AND id < $2 "
                     "ORDER BY id DESC LIMIT $3",
                     3, p);
    if (!r) return LEDGER_ERROR;
    *n = PQntuples(r);
    for (int i = 0; i < *n; i++)
        ledger_fill_entry(&out[i], r, i);
    PQclear(r);
    return LEDGER_OK;
}

/* Text of an array literal, NUL-terminated (a statement's parameter). No
 * bound of its own: a batch is bounded by the caller. An out-of-memory is
 * recorded in oom and checked once, when the literal is complete. */
typedef struct ledger_buf {
    struct buf b;
    int oom;
} ledger_buf;

static void ledger_bufs_init(ledger_buf *cols, int n)
{
    for (int j = 0; j < n; j++) {
        buf_init(&cols[j].b, SIZE_MAX);
        cols[j].oom = 0;
    }
}

static void ledger_bufs_free(ledger_buf *cols, int n)
{
    for (int j = 0; j < n; j++) {
        buf_free(&cols[j].b);
        cols[j].oom = 0;
    }
}

static void ledger_buf_put(ledger_buf *b, const char *s, size_t n)
{
    if (b->oom) return;
    /* Room for the NUL too, so that the literal grows once, not twice. */
    if (buf_reserve(&b->b, n + 1) != BUF_OK || buf_append(&b->b, s, n) != BUF_OK ||
        buf_terminate(&b->b) != BUF_OK)
        b->oom = 1;
}

/* Appends one quoted element of a Postgres array literal. */
static void ledger_buf_elem(ledger_buf *b, int first, const char *s)
{
    ledger_buf_put(b, first ? "{\"" : ",\"", 2);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') ledger_buf_put(b, "\\", 1);
        ledger_buf_put(b, s, 1);
    }
    ledger_buf_put(b, "\"", 1);
}

/* The settlement statements' parameters: one array per column. */
#define LEDGER_SETTLE_COLS 9

int64_t ledger_reserved_ms(const char *rid)
{
    int64_t ms = 0;
    size_t n = strlen(rid);
    if (n != 32) return 0;
    for (size_t i = 0; i < n; i++) {
        int d = rid[i] >= '0' && rid[i] <= '9'   ? rid[i] - '0'
                : rid[i] >= 'a' && rid[i] <= 'f' ? rid[i] - 'a' + 10
                                                 : -1;
        if (d < 0) return 0;
        if (i < 12) ms = ms * 16 + d;
    }
    /* 2000-01-01 to 2099-12-31: no gateway made the others. */
    return ms >= 946684800000LL && ms <= 4102444799999LL ? ms : 0;
}

/* The period rule (schema/011): a call of a closed month (ledger_periods)
 * is booked on the day it is settled, its occurred_at kept, so an issued
 * statement never changes; any other on its own UTC day. OPEN_FROM is the
 * first day of the first open month. Reading ledger_periods here also
 * takes the lock that makes a close wait for the statements in flight
 * (billing/archive.c). */
#define LEDGER_OPEN_FROM                                                                           \
    " p AS (SELECT coalesce((max(month) + interval '1 month')::date, '-infinity'::date)"           \
    "   AS open_from, (now() AT TIME ZONE 'UTC')::date AS today FROM ledger_periods),"
/* The settlement day, or the first open day if later: the statement's
 * transaction may have started (now()) just before a close it then saw. */
#define LEDGER_BOOKED_ON(T)                                                                        \
    "CASE WHEN (" T " AT TIME ZONE 'UTC')::date < p.open_from"                                     \
    " THEN greatest(p.today, p.open_from) END"
#define LEDGER_DAY "coalesce(booked_on, (occurred_at AT TIME ZONE 'UTC')::date) AS day"

/* One round trip, one implicit transaction: the new charge rows (those whose
 * reservation id was not seen before) drive both the accounts' spent and the
 * rollup, so a redelivered entry changes nothing. The partition key is a
 * function of the reservation id (schema/011), so a redelivered record
 * meets its row in the same partition. */
#define LEDGER_SETTLE_SQL                                                                          \
    "WITH input AS ("                                                                              \
    "  SELECT *, to_timestamp(ts_ms::float8 / 1000) AS o, to_timestamp(rms / 1000.0) AS ra"        \
    "  FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::text[],"  \
    "    $7::int[], $8::bigint[], $9::bigint[])"                                                   \
    "    AS t(rid, account_id, route, amount, hold, outcome, status, ts_ms, "                      \
    "rms))," LEDGER_OPEN_FROM " ins AS ("                                                          \
    "  INSERT INTO charges (reservation_id, account_id, route, amount, hold, outcome, status,"     \
    "    occurred_at, reserved_at, booked_on)"                                                     \
    "  SELECT rid, account_id, route, amount, hold, outcome, status, o,"                           \
    "    ra, " LEDGER_BOOKED_ON(                                                                   \
        "o") " FROM input, p"                                                                      \
             "  ON CONFLICT (reservation_id, reserved_at) DO NOTHING"                              \
             "  RETURNING account_id, route, amount, outcome, " LEDGER_DAY "),"                    \
             " acc AS ("                                                                           \
             "  UPDATE accounts a SET spent = a.spent + s.total"                                   \
             "  FROM (SELECT account_id, sum(amount) AS total FROM ins GROUP BY account_id) s"     \
             "  WHERE a.id = s.account_id AND s.total > 0 RETURNING a.id),"                        \
             " roll AS ("                                                                          \
             "  INSERT INTO usage_daily AS u (account_id, day, route, calls, points, "             \
             "failed_calls)"                                                                       \
             "  SELECT account_id, day, route, count(*),"                                          \
             "    sum(amount), count(*) FILTER (WHERE outcome <> 'commit')"                        \
             "  FROM ins GROUP BY 1, 2, 3"                                                         \
             "  ON CONFLICT (account_id, day, route) DO UPDATE SET calls = u.calls + "             \
             "EXCLUDED.calls,"                                                                     \
             "    points = u.points + EXCLUDED.points,"                                            \
             "    failed_calls = u.failed_calls + EXCLUDED.failed_calls RETURNING 1)"              \
             " SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM acc), (SELECT count(*) "   \
             "FROM "                                                                               \
             "roll)"

/* A late settle (settle.lua outcome "late", a spilled settle replayed after
 * the sweeper had released its hold) in two statements, each its own
 * transaction and each idempotent, so a crash between them or a redelivery
 * changes nothing: first a late record whose reservation id has no row yet
 * inserts it (the expire record may still be on its way: it then finds the
 * row and changes nothing); then a late record whose row is (expire, 0)
 * upgrades it to (late, amount), moving the account's spent and the row's
 * own rollup day and route by the difference (points up, one failed call
 * less: the call was billable after all; calls unchanged). A row with any
 * other outcome is left alone. Two statements, not one: in one, the update
 * would not see an expire row that another settlement worker committed
 * while the insert waited on it, and the late charge would be lost. An
 * upgrade of a row booked in a closed month books its points on the day
 * it is settled instead, and leaves the closed month's failed call counted
 * (its statement is issued). */
#define LEDGER_LATE_INPUT                                                                          \
    "WITH input AS ("                                                                              \
    "  SELECT DISTINCT ON (rid) *, to_timestamp(ts_ms::float8 / 1000) AS o,"                       \
    "    to_timestamp(rms / 1000.0) AS ra FROM unnest($1::text[], $2::bigint[], $3::text[],"       \
    "    $4::bigint[], $5::bigint[], $6::text[], $7::int[], $8::bigint[], $9::bigint[])"           \
    "    AS t(rid, account_id, route, amount, hold, outcome, status, ts_ms, rms) ORDER BY "        \
    "rid)," LEDGER_OPEN_FROM
#define LEDGER_LATE_MOVE(SRC)                                                                      \
    " acc AS ("                                                                                    \
    "  UPDATE accounts a SET spent = a.spent + s.total"                                            \
    "  FROM (SELECT account_id, sum(amount) AS total FROM " SRC " GROUP BY account_id) s"          \
    "  WHERE a.id = s.account_id AND s.total > 0 RETURNING a.id),"                                 \
    " roll AS ("                                                                                   \
    "  INSERT INTO usage_daily AS u (account_id, day, route, calls, points, failed_calls)"         \
    "  SELECT account_id, day, route, sum(calls),"                                                 \
    "    sum(amount), sum(failed) FROM " SRC " GROUP BY 1, 2, 3"                                   \
    "  ON CONFLICT (account_id, day, route) DO UPDATE SET calls = u.calls + EXCLUDED.calls,"       \
    "    points = u.points + EXCLUDED.points,"                                                     \
    "    failed_calls = u.failed_calls + EXCLUDED.failed_calls RETURNING 1)"                       \
    " SELECT (SELECT count(*) FROM " SRC "), (SELECT count(*) FROM acc), (SELECT count(*) FROM "   \
    "roll)"
#define LEDGER_LATE_INSERT_SQL                                                                     \
    LEDGER_LATE_INPUT                                                                              \
    " ins AS ("                                                                                    \
    "  INSERT INTO charges (reservation_id, account_id, route, amount, hold, outcome, status,"     \
    "    occurred_at, reserved_at, booked_on)"                                                     \
    "  SELECT rid, account_id, route, amount, hold, 'late', status, o,"                            \
    "    ra, " LEDGER_BOOKED_ON("o") " FROM input, p"                                              \
                                     "  ON CONFLICT (reservation_id, reserved_at) DO NOTHING"      \
                                     "  RETURNING account_id, route, amount, " LEDGER_DAY          \
                                     ", 1 AS calls, 0 AS "                                         \
                                     "failed)," LEDGER_LATE_MOVE("ins")
#define LEDGER_LATE_UPGRADE_SQL                                                                    \
    LEDGER_LATE_INPUT                                                                              \
    " cur AS ("                                                                                    \
    "  SELECT c.reservation_id AS rid, c.reserved_at,"                                             \
    "    coalesce(c.booked_on, (c.occurred_at AT TIME ZONE 'UTC')::date) < p.open_from AS moved"   \
    "  FROM charges c JOIN input i ON c.reservation_id = i.rid"                                    \
    "    AND c.reserved_at = i.ra, p),"                                                            \
    " up AS ("                                                                                     \
    "  UPDATE charges c SET amount = i.amount, outcome = 'late', status = i.status,"               \
    "    booked_on = CASE WHEN cur.moved THEN greatest(p.today, p.open_from)"                      \
    "      ELSE c.booked_on END"                                                                   \
    "  FROM input i, cur, p"                                                                       \
    "  WHERE c.reservation_id = i.rid AND cur.rid = i.rid AND c.reserved_at = cur.reserved_at"     \
    "    AND c.account_id = i.account_id"                                                          \
    "    AND c.outcome = 'expire' AND c.amount = 0 AND i.amount > 0"                               \
    "  RETURNING c.account_id, c.route, c.amount, " LEDGER_DAY ", 0 AS calls,"                     \
    "    CASE WHEN cur.moved THEN 0 ELSE -1 END AS failed)," LEDGER_LATE_MOVE("up")

/* Runs the settlement statement as a prepared statement (planned once per
 * connection): a connection that does not know it yet (new, or reset after
 * Postgres restarted) answers 26000, and gets it prepared. Returns the
 * result (NULL when the connection could not be made again). */
static PGresult *ledger_settle_exec(PGconn *conn, const char *const *p)
{
    PGresult *r = PQexecPrepared(conn, "settle_batch", LEDGER_SETTLE_COLS, p, NULL, NULL, 0);
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    if (state && strcmp(state, "26000") == 0) {
        PQclear(r);
        r = PQprepare(conn, "settle_batch", LEDGER_SETTLE_SQL, LEDGER_SETTLE_COLS, NULL);
        if (PQresultStatus(r) != PGRES_COMMAND_OK) return r;
        PQclear(r);
        r = PQexecPrepared(conn, "settle_batch", LEDGER_SETTLE_COLS, p, NULL, NULL, 0);
    } else if (PQstatus(conn) == CONNECTION_BAD) {
        /* Postgres restarted: ledger_run reconnects and sends it unprepared
         * (the statement is idempotent); the next batch prepares again. */
        PQclear(r);
        return ledger_run(conn, LEDGER_SETTLE_SQL, LEDGER_SETTLE_COLS, p);
    }
    return r;
}

/* 1 if SQLSTATE says the statement's data is at fault (a value out of
 * range, malformed text, an integrity or check violation, a datatype
 * mismatch, a value too large to index): the same rows fail again on every
 * retry, so the caller isolates them. Anything else (connection, deadlock,
 * serialization, shutdown, resources) is the database's trouble: retried. */
static int ledger_data_error(const char *state)
{
    if (!state || strlen(state) != 5) return 0;
    return strncmp(state, "22", 2) == 0 || strncmp(state, "23", 2) == 0 ||
           strcmp(state, "42804") == 0 || strcmp(state, "54000") == 0;
}

/* Classifies a settlement statement's result R (taken): LEDGER_OK with the
 * new rows in *APPLIED, LEDGER_CONFLICT for a data error (SQLSTATE and
 * message in WHY), LEDGER_ERROR (logged) otherwise. */
static int ledger_settle_result(PGconn *conn, PGresult *r, int *applied, char *why, size_t whylen)
{
    ExecStatusType st = PQresultStatus(r);
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    int rc = LEDGER_ERROR;
    if (r && st == PGRES_TUPLES_OK && PQntuples(r) == 1) {
        *applied += (int)ledger_i64(r, 0, 0);
        rc = LEDGER_OK;
    } else if (r && ledger_data_error(state)) {
        const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
        snprintf(why, whylen, "%s %s", state, msg ? msg : "");
        rc = LEDGER_CONFLICT;
    } else {
        log_error("postgres: %s", PQerrorMessage(conn));
    }
    PQclear(r);
    return rc;
}

/* The LEDGER_SETTLE_COLS array parameters of the charges among C[0..N) whose outcome is
 * late (LATE = 1) or not (0); *TAKEN gets how many. -1 when out of memory. */
static int ledger_settle_arrays(ledger_buf cols[LEDGER_SETTLE_COLS], const ledger_charge *c, int n,
                                int late, int *taken)
{
    char num[32];
    int k = 0;
    for (int i = 0; i < n; i++) {
        if ((strcmp(c[i].outcome, "late") == 0) != late) continue;
        ledger_buf_elem(&cols[0], k == 0, c[i].rid);
        snprintf(num, sizeof num, "%" PRId64, c[i].account_id);
        ledger_buf_elem(&cols[1], k == 0, num);
        ledger_buf_elem(&cols[2], k == 0, c[i].route);
        snprintf(num, sizeof num, "%" PRId64, c[i].amount);
        ledger_buf_elem(&cols[3], k == 0, num);
        snprintf(num, sizeof num, "%" PRId64, c[i].hold);
        ledger_buf_elem(&cols[4], k == 0, num);
        ledger_buf_elem(&cols[5], k == 0, c[i].outcome);
        snprintf(num, sizeof num, "%d", c[i].status);
        ledger_buf_elem(&cols[6], k == 0, num);
        snprintf(num, sizeof num, "%" PRId64, c[i].ts_ms);
        ledger_buf_elem(&cols[7], k == 0, num);
        snprintf(num, sizeof num, "%" PRId64, ledger_reserved_ms(c[i].rid));
        ledger_buf_elem(&cols[8], k == 0, num);
        k++;
    }
    *taken = k;
    for (int j = 0; j < LEDGER_SETTLE_COLS && k > 0; j++) {
        ledger_buf_put(&cols[j], "}", 1);
        if (cols[j].oom) return -1;
    }
    return 0;
}

int ledger_ensure_partitions(PGconn *conn, int *made)
{
    /* From the day after the newest partition (days missed while billing
     * was down longer than LEDGER_DAYS_AHEAD) or yesterday, whichever is
     * earlier; archived days are never made again. */
    PGresult *r = ledger_query(
        conn,
        "SELECT charges_ensure_partitions(least(coalesce((SELECT max(day_to) FROM"
        " charge_partitions WHERE name <> 'charges_legacy'), (now() AT TIME ZONE 'UTC')::date),"
        " (now() AT TIME ZONE 'UTC')::date - 1),"
        " (now() AT TIME ZONE 'UTC')::date + " LEDGER_DAYS_AHEAD ")",
        0, NULL);
    if (!r) return LEDGER_ERROR;
    if (made) *made = (int)ledger_i64(r, 0, 0);
    PQclear(r);
    return LEDGER_OK;
}

/* 1 if a settlement statement failed (WHY, ledger_settle_result's) because
 * a record's day has no partition: not made yet (billing was down for
 * longer than LEDGER_DAYS_AHEAD), or made, archived and dropped. */
static int ledger_no_partition(const char *why)
{
    return strncmp(why, "23514", 5) == 0 && strstr(why, "no partition") != NULL;
}

int ledger_settle_batch(PGconn *conn, const ledger_charge *c, int n, int *applied, char *why,
                        size_t whylen)
{
    ledger_buf cols[LEDGER_SETTLE_COLS];
    const char *p[LEDGER_SETTLE_COLS];
    int rc = LEDGER_ERROR, k;

    ledger_bufs_init(cols, LEDGER_SETTLE_COLS);
    *applied = 0;
    if (why && whylen) why[0] = '\0';
    if (n <= 0) return LEDGER_OK;
    /* The calls settled in the usual way (commit, release, expire): one
     * prepared statement, the hot path. */
    if (ledger_settle_arrays(cols, c, n, 0, &k) != 0) goto out;
    if (k > 0) {
        for (int j = 0; j < LEDGER_SETTLE_COLS; j++)
            p[j] = cols[j].b.p;
        rc = ledger_settle_result(conn, ledger_settle_exec(conn, p), applied, why, whylen);
        if (rc == LEDGER_CONFLICT && ledger_no_partition(why) &&
            ledger_ensure_partitions(conn, NULL) == LEDGER_OK)
            rc = ledger_settle_result(conn, ledger_settle_exec(conn, p), applied, why, whylen);
        if (rc != LEDGER_OK) goto out;
    }
    ledger_bufs_free(cols, LEDGER_SETTLE_COLS);
    /* Late settles, rare: after the others, so that an expire record of the
     * same batch is a row the upgrade finds. */
    rc = LEDGER_ERROR;
    if (ledger_settle_arrays(cols, c, n, 1, &k) != 0) goto out;
    rc = LEDGER_OK;
    if (k > 0) {
        for (int j = 0; j < LEDGER_SETTLE_COLS; j++)
            p[j] = cols[j].b.p;
        rc = ledger_settle_result(conn,
                                  ledger_run(conn, LEDGER_LATE_INSERT_SQL, LEDGER_SETTLE_COLS, p),
                                  applied, why, whylen);
        if (rc == LEDGER_OK)
            rc = ledger_settle_result(
                conn, ledger_run(conn, LEDGER_LATE_UPGRADE_SQL, LEDGER_SETTLE_COLS, p), applied,
                why, whylen);
    }
out:
    ledger_bufs_free(cols, LEDGER_SETTLE_COLS);
    return rc;
}

int ledger_each_account(PGconn *conn, ledger_account_fn fn, void *arg)
{
    PGresult *r =
        ledger_query(conn, "SELECT id, credit_seq, credited, spent FROM accounts", 0, NULL);
    int rc = LEDGER_OK;
    if (!r) return LEDGER_ERROR;
    for (int i = 0; i < PQntuples(r) && rc == LEDGER_OK; i++)
        if (fn(arg, ledger_i64(r, i, 0), ledger_i64(r, i, 1), ledger_i64(r, i, 2),
               ledger_i64(r, i, 3)) != 0)
            rc = LEDGER_ERROR;
    PQclear(r);
    return rc;
}
