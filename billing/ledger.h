/* ledger.h: the Postgres ledger (libpq, synchronous).
 * Owns accounts, credit entries (top-ups, adjustments),
 * settled charges and the daily usage rollup. Does not touch Redis: keeping
 * the hot balances in step is control.c's job (and the workers').
 * Every query is parameterised; no value is ever spliced into SQL text. */
#ifndef POINTGATE_LEDGER_H
#define POINTGATE_LEDGER_H

#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>

#define LEDGER_MAX_AMOUNT 1000000000000LL /* 10^12 per entry */

enum ledger_status {
    LEDGER_OK = 0,
    LEDGER_ERROR = -1,        /* database unreachable or failed: retry later */
    LEDGER_NOT_FOUND = -2,    /* no such account or key */
    LEDGER_CONFLICT = -3,     /* reference reused with other terms */
    LEDGER_INSUFFICIENT = -4, /* would take the balance below zero */
    LEDGER_LIMIT = -5,        /* would exceed the credited ceiling (2^53-1) */
};

typedef struct ledger_account {
    int64_t id;
    char name[801]; /* 200 characters of UTF-8 */
    int64_t credited;
    int64_t spent;
    int64_t credit_seq;
    char created_at[40];
} ledger_account;

typedef struct ledger_entry {
    int64_t id;
    int64_t account_id;
    char kind[16];
    int64_t amount;
    char reference[801]; /* "" when none; 200 characters of UTF-8 */
    char reason[2001];   /* "" when none; 500 characters of UTF-8 */
    int64_t credit_seq;
    int64_t credited_after;
    char operator_name[65];
    char created_at[40];
} ledger_entry;

/* One settled call as read from the outbox. */
typedef struct ledger_charge {
    char rid[65];
    int64_t account_id;
    char route[129];
    int64_t amount;
    int64_t hold;
    char outcome[16];
    int status;
    int64_t ts_ms;
} ledger_charge;

/* The columns ledger_fill_entry reads, in order (for SELECT lists). */
#define LEDGER_ENTRY_COLS                                                                          \
    "id, account_id, kind, amount, coalesce(reference, ''), coalesce(reason, ''), credit_seq, "    \
    "credited_after, operator, to_char(created_at AT TIME ZONE 'UTC', "                            \
    "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

/* Fills E from ROW of a result selecting LEDGER_ENTRY_COLS. */
void ledger_fill_entry(ledger_entry *e, const PGresult *r, int row);

/* Runs a parameterised statement (text params, NULL = SQL NULL); the result,
 * or NULL after logging when it failed. Shared by the modules that query the
 * ledger (reports, operators). */
PGresult *ledger_query(PGconn *conn, const char *sql, int n, const char *const *params);

/* 1 if S is 1..MAX_CHARS characters of UTF-8 (counted as Postgres counts
 * them) with no control characters: the rule for names, references, reasons. */
int ledger_valid_text(const char *s, size_t max_chars);

/* Connects (NULL and a log line on failure). */
PGconn *ledger_connect(const char *url);
/* Makes sure CONN is usable, resetting a broken connection. 0 if usable. */
int ledger_check(PGconn *conn);

int ledger_account_create(PGconn *conn, const char *name, ledger_account *out);
int ledger_account_get(PGconn *conn, int64_t id, ledger_account *out);
/* Up to MAX accounts with id > AFTER, by id (cursor paging). */
int ledger_accounts(PGconn *conn, int64_t after, int max, ledger_account *out, int *n);

/* Adds a credit entry: kind "topup" (amount > 0, reference required) or
 * "adjustment" (signed, reason required, reference optional). With a
 * reference already used on the account, returns that entry and *created = 0
 * when the terms match, LEDGER_CONFLICT when they don't. A negative amount
 * that would take credited below spent is LEDGER_INSUFFICIENT. *spent_out
 * gets the account's spent at the time, for a first push to Redis. */
int ledger_credit(PGconn *conn, int64_t account_id, const char *kind, int64_t amount,
                  const char *reference, const char *reason, const char *operator_name,
                  ledger_entry *out, int *created, int64_t *spent_out);

/* The entry an account made with REFERENCE; LEDGER_NOT_FOUND if none. */
int ledger_entry_by_reference(PGconn *conn, int64_t account_id, const char *reference,
                              ledger_entry *out);
/* 1 if entry E was made with these terms (a replay), 0 if they differ. */
int ledger_same_terms(const ledger_entry *e, const char *kind, int64_t amount);

/* Up to MAX entries of an account, newest first, with id < BEFORE (0: no bound). */
int ledger_entries(PGconn *conn, int64_t account_id, int64_t before, int max, ledger_entry *out,
                   int *n);

/* Applies settled calls in one statement: charge rows (deduplicated by
 * reservation id), accounts' spent and the daily rollup, atomically; late
 * settles (outcome "late") after them, in two more idempotent statements
 * that insert their row or upgrade an (expire, 0) row once (ledger.c).
 * *applied gets the number of new or upgraded rows. LEDGER_CONFLICT means
 * the batch holds a row Postgres refuses as data (SQLSTATE class 22 or 23,
 * 42804, 54000; "<SQLSTATE> <message>" in WHY, WHYLEN bytes): the same rows
 * fail on every retry, so the caller isolates them. Every statement is
 * idempotent: after any failure the whole batch may be sent again.
 * LEDGER_ERROR: the database's trouble, retry later. */
int ledger_settle_batch(PGconn *conn, const ledger_charge *c, int n, int *applied, char *why,
                        size_t whylen);

/* The partition key of a charge row, from its reservation id alone, in ms
 * since 1970: the 48-bit time a gateway id starts with (32 lowercase hex
 * digits), if it is in 2000..2099; else 0 (charges_legacy). The same function as schema/011's
 * charges_reserved_at, computed here because it costs settlement's insert
 * a few microseconds per row there (a regex); tests hold the two equal. */
int64_t ledger_reserved_ms(const char *rid);

/* Makes the daily partitions of charges from yesterday to LEDGER_DAYS_AHEAD
 * days ahead that were never made (schema/011; a day once archived is not
 * made again). *MADE (may be NULL) gets how many. Settlement calls it when
 * a record finds no partition, the archive pass every ARCHIVE_INTERVAL_S. */
#define LEDGER_DAYS_AHEAD "14"
int ledger_ensure_partitions(PGconn *conn, int *made);

/* Calls FN for every account's credit state, for repair passes (keys: keys.h). */
typedef int (*ledger_account_fn)(void *arg, int64_t id, int64_t credit_seq, int64_t credited,
                                 int64_t spent);
int ledger_each_account(PGconn *conn, ledger_account_fn fn, void *arg);

#endif
