/* migrate.h: applying the numbered schema migrations (schema/NNN_name.sql,
 * embedded at build time). Owns the schema_migrations table and the advisory
 * lock that makes concurrent `billing migrate` runs safe; does not own the
 * SQL itself. */
#ifndef POINTGATE_MIGRATE_H
#define POINTGATE_MIGRATE_H

#include <libpq-fe.h>

struct migration {
    int version;
    const char *name;
    const char *sql;
};

extern const struct migration migrations[];
extern const int migrations_count;

/* Applies every pending migration up to version UPTO (INT_MAX: all), each
 * in its own transaction, under a session advisory lock. *applied gets how
 * many ran now. 0 on success. */
int migrate_apply(PGconn *conn, int upto, int *applied);

#endif
