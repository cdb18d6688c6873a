/* archive.c: the charges table's life cycle (see archive.h). */
#include "billing/archive.h"

#include "billing/ledger.h"
#include "common/log.h"
#include "billing/periods.h"
#include "billing/webhooks.h"
#include "billing/workers.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

/* One archive pass at a time across billing processes (key pair: migrate.c's
 * first key, 12). Session-level: held across the pass's transactions. */
#define ARCHIVE_TRY_LOCK "SELECT pg_try_advisory_lock(74616, 12)"
#define ARCHIVE_UNLOCK "SELECT pg_advisory_unlock(74616, 12)"
/* A pass exports this many partitions at most (the rest: the next pass,
 * which comes at once when this one was full). */
#define ARCHIVE_MAX_PER_PASS 32
/* DETACH and DROP give up after 2 s (schema/011 sets lock_timeout on the
 * functions that run them): the next pass tries again, rather than keep
 * settlement queued behind the lock they wait for. */

/* Runs SQL; 1 in *OUT if its single value is true. -1 after logging. */
static int archive_bool(PGconn *pg, const char *sql, int n, const char *const *p, int *out)
{
    PGresult *r = ledger_query(pg, sql, n, p);
    if (!r) return -1;
    *out = PQntuples(r) == 1 && PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    return 0;
}

/* 1 if NAME is one schema/011 makes: the only names spliced (quoted) into
 * the COPY statement, which takes no parameters. */
static int archive_valid_name(const char *name)
{
    if (strcmp(name, "charges_legacy") == 0) return 1;
    if (strlen(name) != 17 || strncmp(name, "charges_p", 9) != 0) return 0;
    for (int i = 9; i < 17; i++)
        if (name[i] < '0' || name[i] > '9') return 0;
    return 1;
}

/* Reads the rest of a COPY OUT stream and its results, so that CONN can
 * run the next statement after a failure mid-copy. */
static void archive_copy_drain(PGconn *pg)
{
    char *buf;
    PGresult *r;
    while (PQgetCopyData(pg, &buf, 0) >= 0)
        PQfreemem(buf);
    while ((r = PQgetResult(pg)) != NULL)
        PQclear(r);
}

/* Writes detached partition NAME to PATH as CSV with a header row, gzip'd,
 * and flushes it to disk; *ROWS gets how many rows it holds (checked
 * against COPY's own count). 0, or -1 after logging. */
static int archive_export(PGconn *pg, const char *name, const char *path, int64_t *rows,
                          billing_metrics *m)
{
    char *ident = NULL, *sql = NULL, *buf;
    int fd = -1, gfd, rc = -1, failed = 0, len;
    gzFile gz = NULL;
    PGresult *r = NULL;
    int64_t n = 0;

    ident = PQescapeIdentifier(pg, name, strlen(name));
    if (!ident || asprintf(&sql, "COPY %s TO STDOUT WITH (FORMAT csv, HEADER true)", ident) < 0) {
        sql = NULL;
        log_error("archive: out of memory");
        goto out;
    }
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    if (fd < 0) {
        log_error("archive: %s: %s", path, strerror(errno));
        goto out;
    }
    /* gzclose closes the descriptor it was given: a copy, so that the file
     * can still be flushed to disk after it. */
    gfd = dup(fd);
    if (gfd < 0 || !(gz = gzdopen(gfd, "wb6"))) {
        if (gfd >= 0) close(gfd);
        log_error("archive: %s: cannot start gzip", path);
        goto out;
    }
    r = PQexec(pg, sql);
    if (PQresultStatus(r) != PGRES_COPY_OUT) {
        log_error("archive: COPY %s: %s", name, PQerrorMessage(pg));
        goto out;
    }
    PQclear(r);
    r = NULL;
    /* One buffer per row (the header row first). */
    while ((len = PQgetCopyData(pg, &buf, 0)) > 0) {
        if (!failed && gzwrite(gz, buf, (unsigned)len) != len) failed = 1;
        PQfreemem(buf);
        /* A day of a busy gateway is hundreds of millions of rows: the
         * thread is alive while it copies them (/healthz). */
        if (++n % 65536 == 0) bm_beat(m, BM_BEAT_ARCHIVE);
    }
    r = PQgetResult(pg);
    if (len != -1 || PQresultStatus(r) != PGRES_COMMAND_OK) {
        log_error("archive: COPY %s: %s", name, PQerrorMessage(pg));
        archive_copy_drain(pg);
        goto out;
    }
    if (failed || n < 1 || strtoll(PQcmdTuples(r), NULL, 10) != n - 1) {
        log_error("archive: %s: writing %s failed (%" PRId64 " rows read)", name, path, n);
        archive_copy_drain(pg);
        goto out;
    }
    archive_copy_drain(pg);
    if (gzclose(gz) != Z_OK) {
        gz = NULL;
        log_error("archive: %s: gzip failed", path);
        goto out;
    }
    gz = NULL;
    if (fsync(fd) != 0) {
        log_error("archive: %s: %s", path, strerror(errno));
        goto out;
    }
    *rows = n - 1;
    rc = 0;
out:
    if (gz) gzclose(gz);
    if (fd >= 0) close(fd);
    PQclear(r);
    PQfreemem(ident);
    free(sql);
    return rc;
}

/* The SHA-256 (hex) and size of file PATH. */
static int archive_sha256(const char *path, char hex[65], int64_t *bytes)
{
    unsigned char buf[65536], h[crypto_hash_sha256_BYTES];
    crypto_hash_sha256_state st;
    FILE *f = fopen(path, "rb");
    size_t n;
    int rc = -1;
    if (!f) {
        log_error("archive: %s: %s", path, strerror(errno));
        return -1;
    }
    *bytes = 0;
    crypto_hash_sha256_init(&st);
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
        crypto_hash_sha256_update(&st, buf, n);
        *bytes += (int64_t)n;
    }
    if (!ferror(f)) {
        crypto_hash_sha256_final(&st, h);
        sodium_bin2hex(hex, 65, h, sizeof h);
        rc = 0;
    }
    fclose(f);
    return rc;
}

/* Flushes directory DIR's entries (the rename) to disk. */
static int archive_sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC), rc;
    if (fd < 0) return -1;
    rc = fsync(fd);
    close(fd);
    return rc;
}

/* 1 if DIR is a directory this process can create files in. */
static int archive_writable_dir(const char *dir)
{
    struct stat st;
    return stat(dir, &st) == 0 && S_ISDIR(st.st_mode) && access(dir, W_OK | X_OK) == 0;
}

/* Detaches (if STATE is attached), exports and drops partition NAME: 1
 * when it was dropped now, 0 when another pass had moved it, -1 on failure
 * (logged; the day stays, attached or detached, for the next pass). */
static int archive_one(PGconn *pg, const char *dir, const char *name, const char *state,
                       int64_t *rows, billing_metrics *m)
{
    char path[PATH_MAX], tmp[PATH_MAX], hex[65], rs[24], bs[24];
    const char *p[5] = {name, rs, bs, path, hex};
    int64_t bytes = 0;
    int ok = 0;

    if (!archive_valid_name(name)) {
        log_error("archive: unexpected partition name %s: left alone", name);
        return -1;
    }
    if ((size_t)snprintf(path, sizeof path, "%s/%s.csv.gz", dir, name) >= sizeof path ||
        (size_t)snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid()) >= sizeof tmp) {
        log_error("archive: ARCHIVE_DIR is too long");
        return -1;
    }
    if (strcmp(state, "attached") == 0) {
        if (archive_bool(pg, "SELECT charges_detach_partition($1)", 1, p, &ok) != 0) return -1;
        if (!ok) return 0; /* another pass moved it meanwhile */
        log_info("archive: %s detached", name);
    }
    if (archive_export(pg, name, tmp, rows, m) != 0 || archive_sha256(tmp, hex, &bytes) != 0) {
        unlink(tmp);
        return -1;
    }
    if (rename(tmp, path) != 0 || archive_sync_dir(dir) != 0) {
        log_error("archive: %s: %s", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    snprintf(rs, sizeof rs, "%" PRId64, *rows);
    snprintf(bs, sizeof bs, "%" PRId64, bytes);
    if (archive_bool(pg, "SELECT charges_drop_partition($1, $2, $3, $4, $5)", 5, p, &ok) != 0)
        return -1;
    if (!ok) return 0;
    log_info("archive: %s: %" PRId64 " rows exported to %s (%" PRId64 " bytes), dropped", name,
             *rows, path, bytes);
    return 1;
}

/* The partitions due, oldest first; under the pass lock. */
static int archive_due(PGconn *pg, const billing_config *cfg, archive_result *res,
                       billing_metrics *m, int backend)
{
    char days[24], max[16];
    const char *p[2] = {days, max};
    PGresult *r;
    int rc = 0;
    snprintf(days, sizeof days, "%" PRId64, cfg->charge_retention_days);
    snprintf(max, sizeof max, "%d", ARCHIVE_MAX_PER_PASS);
    /* charges_legacy (ids without a time, rows migrated without one) is
     * never archived by itself: its rows have no day to age by. */
    r = ledger_query(pg,
                     "SELECT name, state FROM charge_partitions"
                     " WHERE state IN ('attached', 'detached') AND name <> 'charges_legacy'"
                     "   AND day_to <= (now() AT TIME ZONE 'UTC')::date - $1::int"
                     " ORDER BY day_from LIMIT $2::int",
                     2, p);
    if (!r) return -1;
    /* Before anything is detached: a day taken out of charges for a
     * directory it cannot be written to would only be out of reach. */
    if (PQntuples(r) > 0 && !archive_writable_dir(cfg->archive_dir)) {
        log_error("archive: ARCHIVE_DIR %s is not a writable directory: %d day(s) past retention "
                  "stay",
                  cfg->archive_dir, PQntuples(r));
        rc = -1;
    }
    for (int i = 0; i < PQntuples(r) && rc == 0; i++) {
        int64_t rows = 0;
        int done;
        /* The pass lock is the session's: a connection that was reset
         * (ledger_run reconnects on its own) no longer holds it, and
         * another process may be exporting the same day now. */
        if (PQbackendPID(pg) != backend) {
            log_warn("archive: the connection to Postgres was reset: the pass stops here");
            rc = -1;
            break;
        }
        done =
            archive_one(pg, cfg->archive_dir, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), &rows, m);
        if (done < 0) rc = -1;
        if (done > 0) {
            res->archived++;
            res->rows += rows;
        }
    }
    PQclear(r);
    return rc;
}

int archive_pass(PGconn *pg, const billing_config *cfg, billing_metrics *m, archive_result *res)
{
    int got = 0, rc = -1;
    memset(res, 0, sizeof *res);
    if (ledger_ensure_partitions(pg, &res->made) != LEDGER_OK) return -1;
    if (cfg->statement_close_days > 0 &&
        periods_auto_close(pg, cfg->statement_close_days, &res->closed) != LEDGER_OK)
        return -1;
    if (!cfg->archive_dir) return 0;
    if (archive_bool(pg, ARCHIVE_TRY_LOCK, 0, NULL, &got) != 0) return -1;
    if (!got) {
        res->busy = 1;
        return 0;
    }
    rc = archive_due(pg, cfg, res, m, PQbackendPID(pg));
    archive_bool(pg, ARCHIVE_UNLOCK, 0, NULL, &(int){0});
    return rc;
}

json_t *archive_list(PGconn *pg, const billing_config *cfg)
{
    PGresult *r =
        ledger_query(pg,
                     "SELECT day_from::text, day_to::text, name, state, rows, bytes, file, sha256,"
                     " to_char(archived_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
                     " FROM charge_partitions ORDER BY day_from",
                     0, NULL);
    json_t *arr, *out;
    if (!r) return NULL;
    arr = json_array();
    for (int i = 0; i < PQntuples(r); i++) {
        json_t *row = json_pack("{s:s, s:s, s:s, s:s}", "from", PQgetvalue(r, i, 0), "to",
                                PQgetvalue(r, i, 1), "name", PQgetvalue(r, i, 2), "state",
                                PQgetvalue(r, i, 3));
        if (!PQgetisnull(r, i, 6)) {
            json_object_set_new(row, "rows", json_integer(strtoll(PQgetvalue(r, i, 4), NULL, 10)));
            json_object_set_new(row, "bytes", json_integer(strtoll(PQgetvalue(r, i, 5), NULL, 10)));
            json_object_set_new(row, "file", json_string(PQgetvalue(r, i, 6)));
            json_object_set_new(row, "sha256", json_string(PQgetvalue(r, i, 7)));
            json_object_set_new(row, "archived_at", json_string(PQgetvalue(r, i, 8)));
        }
        json_array_append_new(arr, row);
    }
    PQclear(r);
    out = json_pack("{s:I, s:o, s:o}", "retention_days", (json_int_t)cfg->charge_retention_days,
                    "archive_dir", cfg->archive_dir ? json_string(cfg->archive_dir) : json_null(),
                    "partitions", arr);
    return out;
}

int archive_api_charge(PGconn *pg, const char *rid, size_t len, json_t **out)
{
    char id[65];
    const char *p[1] = {id};
    PGresult *r;
    json_t *j;
    *out = NULL;
    if (len == 0 || len >= sizeof id || !ledger_valid_text(rid, sizeof id - 1) ||
        memchr(rid, '\0', len))
        return webhooks_refuse(400, "bad_request", "a request id is 1 to 64 characters", out);
    memcpy(id, rid, len);
    id[len] = '\0';
    /* The partition key from the id: the lookup reads one partition. */
    r = ledger_query(
        pg,
        "SELECT account_id, route, amount, hold, outcome, status,"
        " to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),"
        " to_char(settled_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),"
        " to_char(reserved_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),"
        " coalesce(booked_on, (occurred_at AT TIME ZONE 'UTC')::date)::text"
        " FROM charges WHERE reservation_id = $1 AND reserved_at = charges_reserved_at($1)",
        1, p);
    if (!r) return webhooks_failure(LEDGER_ERROR, "", out);
    if (PQntuples(r) == 1) {
        j = json_pack("{s:s, s:I, s:s, s:I, s:I, s:s, s:i, s:s, s:s, s:s, s:s}", "request_id", id,
                      "account_id", (json_int_t)strtoll(PQgetvalue(r, 0, 0), NULL, 10), "route",
                      PQgetvalue(r, 0, 1), "amount",
                      (json_int_t)strtoll(PQgetvalue(r, 0, 2), NULL, 10), "hold",
                      (json_int_t)strtoll(PQgetvalue(r, 0, 3), NULL, 10), "outcome",
                      PQgetvalue(r, 0, 4), "status", atoi(PQgetvalue(r, 0, 5)), "occurred_at",
                      PQgetvalue(r, 0, 6), "settled_at", PQgetvalue(r, 0, 7), "reserved_at",
                      PQgetvalue(r, 0, 8), "booked_on", PQgetvalue(r, 0, 9));
        PQclear(r);
        *out = j;
        return j ? 200 : webhooks_failure(LEDGER_ERROR, "", out);
    }
    PQclear(r);
    /* Not in the table: its day may have been archived. */
    r = ledger_query(pg,
                     "SELECT name, file, state = 'archived' FROM charge_partitions"
                     " WHERE day_from <= (charges_reserved_at($1) AT TIME ZONE 'UTC')::date"
                     "   AND day_to > (charges_reserved_at($1) AT TIME ZONE 'UTC')::date"
                     "   AND state <> 'attached'",
                     1, p);
    if (!r) return webhooks_failure(LEDGER_ERROR, "", out);
    if (PQntuples(r) == 1) {
        int archived = PQgetvalue(r, 0, 2)[0] == 't';
        *out = json_pack("{s:s, s:s, s:s, s:o}", "error", archived ? "archived" : "archiving",
                         "message",
                         archived ? "the charges of this request's day were exported and dropped "
                                    "(CHARGE_RETENTION_DAYS): look it up in the archive file"
                                  : "the charges of this request's day are being exported "
                                    "(CHARGE_RETENTION_DAYS); ask again once billing archive "
                                    "list shows the day archived",
                         "partition", PQgetvalue(r, 0, 0), "file",
                         PQgetisnull(r, 0, 1) ? json_null() : json_string(PQgetvalue(r, 0, 1)));
        PQclear(r);
        return 404;
    }
    PQclear(r);
    return webhooks_refuse(404, "not_found",
                           "no charge with this request id (not settled yet, or never made)", out);
}

int archive_state_read(PGconn *pg, archive_state *out)
{
    PGresult *r = ledger_query(
        pg,
        "SELECT coalesce(max(day_to) FILTER (WHERE state = 'attached')"
        "   - (now() AT TIME ZONE 'UTC')::date - 1, -1),"
        " count(*) FILTER (WHERE state = 'attached'), count(*) FILTER (WHERE state = 'detached'),"
        " count(*) FILTER (WHERE state = 'archived'),"
        " coalesce(min(day_from) FILTER (WHERE state = 'attached' AND name <> 'charges_legacy')"
        "   ::text, ''),"
        " coalesce((SELECT to_char(max(month), 'YYYY-MM') FROM ledger_periods), '')"
        " FROM charge_partitions",
        0, NULL);
    if (!r) return -1;
    out->days_ahead = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
    out->attached = strtoll(PQgetvalue(r, 0, 1), NULL, 10);
    out->detached = strtoll(PQgetvalue(r, 0, 2), NULL, 10);
    out->archived = strtoll(PQgetvalue(r, 0, 3), NULL, 10);
    snprintf(out->oldest_day, sizeof out->oldest_day, "%s", PQgetvalue(r, 0, 4));
    snprintf(out->closed_through, sizeof out->closed_through, "%s", PQgetvalue(r, 0, 5));
    PQclear(r);
    return 0;
}

/* The gauges of the charges table's state (metrics.h). */
static void archive_gauges(PGconn *pg, billing_metrics *m)
{
    archive_state st;
    if (!m || archive_state_read(pg, &st) != 0) return;
    metric_set(&m->charge_days_ahead, st.days_ahead);
    metric_set(&m->charge_detached, st.detached);
}

void *archive_run(void *arg)
{
    const worker_args *wa = arg;
    const billing_config *cfg = wa->cfg;
    PGconn *pg = NULL;
    while (!atomic_load(wa->stop)) {
        archive_result res;
        long rest = (long)cfg->archive_interval_s * 1000;
        bm_beat(wa->metrics, BM_BEAT_ARCHIVE);
        if (!pg) pg = ledger_connect(cfg->database_url);
        if (!pg || ledger_check(pg) != 0) {
            worker_rest(wa->stop, 1000, wa->metrics, BM_BEAT_ARCHIVE);
            continue;
        }
        if (archive_pass(pg, cfg, wa->metrics, &res) != 0) {
            rest = rest < 60000 ? rest : 60000; /* again soon: the next try may pass */
        } else {
            if (res.made || res.closed || res.archived)
                log_info("archive: %d partition(s) made, %d month(s) closed, %d partition(s) "
                         "archived (%" PRId64 " rows)",
                         res.made, res.closed, res.archived, res.rows);
            if (res.archived == ARCHIVE_MAX_PER_PASS) rest = 0;
        }
        archive_gauges(pg, wa->metrics);
        worker_rest(wa->stop, rest, wa->metrics, BM_BEAT_ARCHIVE);
    }
    if (pg) PQfinish(pg);
    return NULL;
}
