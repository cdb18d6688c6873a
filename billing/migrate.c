/* migrate.c: schema migrations (see migrate.h).
 *
 * Two processes migrating at once serialise on a session advisory lock; the
 * second then finds every version recorded and applies nothing. Each
 * migration and its schema_migrations row commit together, so a crash leaves
 * either both or neither. */
#include "billing/migrate.h"

#include "common/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIGRATE_LOCK_KEY "7461626c65" /* arbitrary, fixed: "table" in hex */

static int migrate_exec(PGconn *conn, const char *sql)
{
    PGresult *r = PQexec(conn, sql);
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
    if (!ok) log_error("migrate: %s", PQerrorMessage(conn));
    PQclear(r);
    return ok ? 0 : -1;
}

static int migrate_is_applied(PGconn *conn, int version, int *applied)
{
    char v[16];
    const char *params[1] = {v};
    PGresult *r;
    snprintf(v, sizeof v, "%d", version);
    r = PQexecParams(conn, "SELECT 1 FROM schema_migrations WHERE version = $1", 1, NULL, params,
                     NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        log_error("migrate: %s", PQerrorMessage(conn));
        PQclear(r);
        return -1;
    }
    *applied = PQntuples(r) > 0;
    PQclear(r);
    return 0;
}

static int migrate_one(PGconn *conn, const struct migration *m)
{
    char v[16];
    const char *params[2] = {v, m->name};
    PGresult *r;
    int rc = -1;

    if (migrate_exec(conn, "BEGIN") != 0) return -1;
    if (migrate_exec(conn, m->sql) != 0) goto out;
    snprintf(v, sizeof v, "%d", m->version);
    r = PQexecParams(conn, "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", 2, NULL,
                     params, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        log_error("migrate: recording %s: %s", m->name, PQerrorMessage(conn));
        PQclear(r);
        goto out;
    }
    PQclear(r);
    if (migrate_exec(conn, "COMMIT") != 0) return -1;
    rc = 0;
out:
    if (rc != 0) migrate_exec(conn, "ROLLBACK");
    return rc;
}

int migrate_apply(PGconn *conn, int upto, int *applied)
{
    int rc = -1;
    *applied = 0;
    if (migrate_exec(conn, "SET client_min_messages = warning") != 0) return -1;
    if (migrate_exec(conn, "SELECT pg_advisory_lock(x'" MIGRATE_LOCK_KEY "'::bigint)") != 0)
        return -1;
    if (migrate_exec(conn, "CREATE TABLE IF NOT EXISTS schema_migrations ("
                           " version integer PRIMARY KEY, name text NOT NULL,"
                           " applied_at timestamptz NOT NULL DEFAULT now())") != 0)
        goto out;
    for (int i = 0; i < migrations_count; i++) {
        int done = 0;
        if (migrate_is_applied(conn, migrations[i].version, &done) != 0) goto out;
        if (done || migrations[i].version > upto) continue;
        if (migrate_one(conn, &migrations[i]) != 0) {
            log_error("migrate: %s failed; nothing of it was applied", migrations[i].name);
            goto out;
        }
        log_info("migrate: applied %s", migrations[i].name);
        (*applied)++;
    }
    rc = 0;
out:
    migrate_exec(conn, "SELECT pg_advisory_unlock(x'" MIGRATE_LOCK_KEY "'::bigint)");
    return rc;
}
