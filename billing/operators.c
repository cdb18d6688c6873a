/* operators.c: named operators (see operators.h). */
#include "billing/operators.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define OPERATOR_COLS                                                                              \
    "id, name, role, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "   \
    "revoked_at IS NOT NULL"

static void operators_fill(operator_info *o, const PGresult *r, int row)
{
    o->id = strtoll(PQgetvalue(r, row, 0), NULL, 10);
    snprintf(o->name, sizeof o->name, "%s", PQgetvalue(r, row, 1));
    snprintf(o->role, sizeof o->role, "%s", PQgetvalue(r, row, 2));
    snprintf(o->created_at, sizeof o->created_at, "%s", PQgetvalue(r, row, 3));
    o->revoked = PQgetvalue(r, row, 4)[0] == 't';
}

int operators_valid_name(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > 64) return -1;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                 (i > 0 && (c == '.' || c == '_' || c == '-'));
        if (!ok) return -1;
    }
    return 0;
}

int operators_add(PGconn *pg, const apikey_pepper *pepper, const char *name, const char *role,
                  char token[APIKEY_LEN + 1])
{
    char hash[APIKEY_HASH_HEX + 1];
    const char *p[3] = {name, role, hash};
    PGresult *r;
    int rc = LEDGER_OK;
    if (apikey_token(OPERATOR_PREFIX, token) != 0) return LEDGER_ERROR;
    apikey_hash_secret(pepper, token, strlen(token), hash);
    /* ON CONFLICT makes "name taken" an answer, not a logged error. */
    r = ledger_query(pg,
                     "INSERT INTO operators (name, role, token_hash) VALUES ($1, $2, $3) "
                     "ON CONFLICT (name) DO NOTHING RETURNING id",
                     3, p);
    if (!r) return LEDGER_ERROR;
    if (PQntuples(r) != 1) rc = LEDGER_CONFLICT;
    PQclear(r);
    return rc;
}

int operators_revoke(PGconn *pg, const char *name)
{
    const char *p[1] = {name};
    PGresult *r = ledger_query(
        pg,
        "UPDATE operators SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL "
        "RETURNING id",
        1, p);
    int rc;
    if (!r) return LEDGER_ERROR;
    rc = PQntuples(r) == 1 ? LEDGER_OK : LEDGER_NOT_FOUND;
    PQclear(r);
    return rc;
}

int operators_authenticate(PGconn *pg, const apikey_pepper *pepper, const char *token,
                           operator_info *out)
{
    char hash[APIKEY_HASH_HEX + 1];
    const char *p[1] = {hash};
    PGresult *r;
    int rc = LEDGER_NOT_FOUND;
    /* Looked up by keyed hash: the lookup's timing depends on the MAC, which
     * an attacker cannot steer towards a real token. */
    apikey_hash_secret(pepper, token, strlen(token), hash);
    r = ledger_query(
        pg, "SELECT " OPERATOR_COLS " FROM operators WHERE token_hash = $1 AND revoked_at IS NULL",
        1, p);
    if (!r) return LEDGER_ERROR;
    if (PQntuples(r) == 1) {
        operators_fill(out, r, 0);
        rc = LEDGER_OK;
    }
    PQclear(r);
    return rc;
}

int operators_list(PGconn *pg, operator_info **out, int *n)
{
    PGresult *r = ledger_query(pg, "SELECT " OPERATOR_COLS " FROM operators ORDER BY id", 0, NULL);
    if (!r) return LEDGER_ERROR;
    *n = PQntuples(r);
    *out = calloc((size_t)*n + 1, sizeof **out);
    if (!*out) {
        PQclear(r);
        return LEDGER_ERROR;
    }
    for (int i = 0; i < *n; i++)
        operators_fill(&(*out)[i], r, i);
    PQclear(r);
    return LEDGER_OK;
}
