/* archive.h: the charges table's life cycle (schema/011). Owns the archive
 * pass that billing serve runs every ARCHIVE_INTERVAL_S and `billing archive
 * run` runs by hand: daily partitions made two weeks ahead
 * (ledger_ensure_partitions), months closed STATEMENT_CLOSE_DAYS after their
 * end (periods.c), and the partitions whose days are all past
 * CHARGE_RETENTION_DAYS detached, exported with COPY to a gzip'd CSV file
 * in ARCHIVE_DIR, then dropped. Does not own the charges themselves
 * (ledger.c) nor the statements (reports.c): usage_daily, the ledger
 * entries and the periods are kept forever, so a statement adds up after
 * its month's rows are gone.
 *
 * Without ARCHIVE_DIR nothing is ever dropped: per-call rows are exported
 * before they go, or they stay. An export is written to NAME.csv.gz.tmp,
 * flushed to disk and renamed; the partition is dropped in the transaction
 * that records the file, its size, its row count and its SHA-256. A crash
 * at any step leaves the partition attached, or detached and exported again
 * by the next pass: never dropped unexported. One pass at a time across
 * billing processes (a session advisory lock; a pass whose connection was
 * reset stops, since the lock went with it). charges_legacy (rows without
 * a time in their id) is never archived by the pass. */
#ifndef POINTGATE_ARCHIVE_H
#define POINTGATE_ARCHIVE_H

#include "billing/config.h"
#include "billing/metrics.h"

#include <jansson.h>
#include <libpq-fe.h>
#include <stdint.h>

/* What one pass did. */
typedef struct archive_result {
    int made;     /* partitions created */
    int closed;   /* months closed */
    int archived; /* partitions exported and dropped */
    int64_t rows; /* rows they held */
    int busy;     /* another process runs the pass: this one did nothing */
} archive_result;

/* One pass (see above), stamping M's archive heartbeat as it goes (NULL:
 * none). 0, or -1 after logging (what was done stays done; the next pass
 * goes on from there). */
int archive_pass(PGconn *pg, const billing_config *cfg, billing_metrics *m, archive_result *res);

/* Every partition, oldest first, with its state and, once archived, its
 * file: {"retention_days":N, "archive_dir":..., "partitions":[...]}.
 * NULL after logging when Postgres fails. */
json_t *archive_list(PGconn *pg, const billing_config *cfg);

/* Where the charges table stands: days of partitions made past today (-1
 * none), partitions attached / detached / archived, the oldest day kept
 * ("" none) and the last closed month ("" none). -1 after logging. */
typedef struct archive_state {
    int64_t days_ahead, attached, detached, archived;
    char oldest_day[16], closed_through[8];
} archive_state;
int archive_state_read(PGconn *pg, archive_state *out);

/* GET /v1/charges/{request_id} (finance and admin; `billing charge`): the
 * charge row of a call, found in its day's partition; 404 not_found, or
 * 404 archived naming the file that holds its day. The HTTP status, *OUT
 * the JSON body (webhooks.h conventions). */
int archive_api_charge(PGconn *pg, const char *rid, size_t len, json_t **out);

#endif
