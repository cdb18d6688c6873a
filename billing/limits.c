/* limits.c: rate limit and spending cap settings (limits.h). */
#include "billing/limits.h"

#include "billing/hot.h"
#include "billing/ledger.h"
#include "common/log.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LIMITS_CAP_MAX 9007199254740991LL /* 2^53 - 1: the scripts' exact range */

/* An integer field of O in [MIN, MAX], or null / absent (0). */
static int limits_int(json_t *o, const char *name, int64_t min, int64_t max, int64_t *out)
{
    json_t *v = json_object_get(o, name);
    *out = 0;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max)
        return -1;
    *out = (int64_t)json_integer_value(v);
    return 0;
}

const char *limits_parse(json_t *body, limits_spec *out)
{
    const char *k;
    json_t *v, *rate;
    memset(out, 0, sizeof *out);
    if (!json_is_object(body)) return "the body must be a JSON object";
    json_object_foreach(body, k, v)
    {
        if (strcmp(k, "rate") != 0 && strcmp(k, "daily_cap") != 0 && strcmp(k, "monthly_cap") != 0)
            return "unknown field: the settings are rate, daily_cap and monthly_cap";
    }
    rate = json_object_get(body, "rate");
    if (rate && !json_is_null(rate)) {
        if (!json_is_object(rate) || json_object_size(rate) != 2 ||
            limits_int(rate, "quota", 1, 1000000, &out->rate_quota) != 0 ||
            limits_int(rate, "window_s", 1, 86400, &out->rate_window_s) != 0 || !out->rate_quota ||
            !out->rate_window_s)
            return "rate must be {\"quota\": 1..1000000, \"window_s\": 1..86400} or null";
    }
    if (limits_int(body, "daily_cap", 1, LIMITS_CAP_MAX, &out->daily_cap) != 0)
        return "daily_cap must be a positive integer of points, or null";
    if (limits_int(body, "monthly_cap", 1, LIMITS_CAP_MAX, &out->monthly_cap) != 0)
        return "monthly_cap must be a positive integer of points, or null";
    return NULL;
}

json_t *limits_json(const limits_spec *s)
{
    json_t *j = json_object();
    if (!j) return NULL;
    json_object_set_new(j, "rate",
                        s->rate_quota ? json_pack("{s:I, s:I}", "quota", (json_int_t)s->rate_quota,
                                                  "window_s", (json_int_t)s->rate_window_s)
                                      : json_null());
    json_object_set_new(j, "daily_cap",
                        s->daily_cap ? json_integer((json_int_t)s->daily_cap) : json_null());
    json_object_set_new(j, "monthly_cap",
                        s->monthly_cap ? json_integer((json_int_t)s->monthly_cap) : json_null());
    return j;
}

static void limits_param(char *buf, size_t cap, int64_t v, const char **p)
{
    snprintf(buf, cap, "%" PRId64, v);
    *p = v ? buf : NULL; /* 0: SQL NULL */
}

static int64_t limits_col(const PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? 0 : strtoll(PQgetvalue(r, row, col), NULL, 10);
}

/* The statements of limits_set, inside its transaction. */
static int limits_set_tx(PGconn *pg, enum limits_scope scope, const char *ids, const limits_spec *s,
                         int64_t *account)
{
    char acct[24], q[24], w[24], d[24], m[24];
    const char *p[6];
    int none = !s->rate_quota && !s->daily_cap && !s->monthly_cap;
    PGresult *r;
    p[0] = ids;
    r = ledger_query(pg,
                     scope == LIMITS_ACCOUNT
                         ? "SELECT id FROM accounts WHERE id = $1 FOR UPDATE"
                         : "SELECT k.account_id FROM api_keys k JOIN accounts a ON a.id = "
                           "k.account_id WHERE k.id = $1 AND k.revoked_at IS NULL FOR UPDATE OF a",
                     1, p);
    if (!r) return LEDGER_ERROR;
    if (PQntuples(r) != 1) {
        PQclear(r);
        return LEDGER_NOT_FOUND;
    }
    *account = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
    snprintf(acct, sizeof acct, "%" PRId64, *account);
    limits_param(q, sizeof q, s->rate_quota, &p[1]);
    limits_param(w, sizeof w, s->rate_window_s, &p[2]);
    limits_param(d, sizeof d, s->daily_cap, &p[3]);
    limits_param(m, sizeof m, s->monthly_cap, &p[4]);
    p[5] = acct;
    if (none)
        r = ledger_query(pg,
                         scope == LIMITS_ACCOUNT
                             ? "DELETE FROM account_limits WHERE account_id = $1"
                             : "DELETE FROM key_limits WHERE key_id = $1",
                         1, p);
    else if (scope == LIMITS_ACCOUNT)
        r = ledger_query(pg,
                         "INSERT INTO account_limits (account_id, rate_quota, rate_window_s, "
                         "daily_cap, monthly_cap) VALUES ($1, $2, $3, $4, $5) ON CONFLICT "
                         "(account_id) DO UPDATE SET rate_quota = $2, rate_window_s = $3, "
                         "daily_cap = $4, monthly_cap = $5, updated_at = now()",
                         5, p);
    else
        r = ledger_query(pg,
                         "INSERT INTO key_limits (key_id, rate_quota, rate_window_s, daily_cap, "
                         "monthly_cap, account_id) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT "
                         "(key_id) DO UPDATE SET rate_quota = $2, rate_window_s = $3, "
                         "daily_cap = $4, monthly_cap = $5, updated_at = now()",
                         6, p);
    if (!r) return LEDGER_ERROR;
    PQclear(r);
    p[0] = acct;
    r = ledger_query(pg, "UPDATE accounts SET limits_seq = limits_seq + 1 WHERE id = $1", 1, p);
    if (!r) return LEDGER_ERROR;
    PQclear(r);
    return LEDGER_OK;
}

int limits_set(control_ctx *c, enum limits_scope scope, int64_t id, const limits_spec *spec,
               int64_t *account, int *pushed)
{
    char ids[24];
    PGresult *r;
    int rc;
    *pushed = 0;
    snprintf(ids, sizeof ids, "%" PRId64, id);
    r = ledger_query(c->pg, "BEGIN", 0, NULL);
    if (!r) return LEDGER_ERROR;
    PQclear(r);
    rc = limits_set_tx(c->pg, scope, ids, spec, account);
    r = ledger_query(c->pg, rc == LEDGER_OK ? "COMMIT" : "ROLLBACK", 0, NULL);
    if (!r) return LEDGER_ERROR;
    PQclear(r);
    if (rc != LEDGER_OK) return rc;
    /* After the commit: the snapshot read now is this change or a newer
     * one, and limits.lua keeps the newest. */
    *pushed = limits_push(c->pg, c->hot, *account) == 0;
    if (!*pushed)
        log_warn("limits of account %" PRId64 ": not in redis yet; the repair pass will push them",
                 *account);
    return LEDGER_OK;
}

int limits_get(PGconn *pg, enum limits_scope scope, int64_t id, limits_spec *out, int64_t *account)
{
    char ids[24];
    const char *p[1] = {ids};
    PGresult *r;
    memset(out, 0, sizeof *out);
    snprintf(ids, sizeof ids, "%" PRId64, id);
    r = ledger_query(
        pg,
        scope == LIMITS_ACCOUNT
            ? "SELECT a.id, l.rate_quota, l.rate_window_s, l.daily_cap, l.monthly_cap FROM "
              "accounts a LEFT JOIN account_limits l ON l.account_id = a.id WHERE a.id = $1"
            : "SELECT k.account_id, l.rate_quota, l.rate_window_s, l.daily_cap, l.monthly_cap "
              "FROM api_keys k LEFT JOIN key_limits l ON l.key_id = k.id WHERE k.id = $1",
        1, p);
    if (!r) return LEDGER_ERROR;
    if (PQntuples(r) != 1) {
        PQclear(r);
        return LEDGER_NOT_FOUND;
    }
    *account = limits_col(r, 0, 0);
    out->rate_quota = limits_col(r, 0, 1);
    out->rate_window_s = limits_col(r, 0, 2);
    out->daily_cap = limits_col(r, 0, 3);
    out->monthly_cap = limits_col(r, 0, 4);
    PQclear(r);
    return LEDGER_OK;
}

/* Appends one scope's settings to the snapshot's name, value pairs. */
static int limits_pairs(char ***pairs, int *n, int *cap, const char *prefix, const PGresult *r,
                        int row)
{
    static const char *const names[4] = {"rq", "rw", "cd", "cm"};
    for (int i = 0; i < 4; i++) {
        int64_t v = limits_col(r, row, 2 + i);
        char nm[48], val[24];
        if (!v) continue;
        if (i == 1) v *= 1000; /* window: seconds in Postgres, ms in Redis */
        if (*n + 2 > *cap) {
            int nc = *cap ? *cap * 2 : 16;
            char **np = realloc(*pairs, (size_t)nc * sizeof *np);
            if (!np) return -1;
            *pairs = np;
            *cap = nc;
        }
        snprintf(nm, sizeof nm, "%s%s", prefix, names[i]);
        snprintf(val, sizeof val, "%" PRId64, v);
        (*pairs)[*n] = strdup(nm);
        (*pairs)[*n + 1] = strdup(val);
        if (!(*pairs)[*n] || !(*pairs)[*n + 1]) {
            free((*pairs)[*n]);
            free((*pairs)[*n + 1]);
            return -1;
        }
        *n += 2;
    }
    return 0;
}

int limits_push(PGconn *pg, hot_conn *hot, int64_t account)
{
    char ids[24];
    const char *p[1] = {ids};
    char **pairs = NULL;
    int n = 0, cap = 0, rc = -1, result;
    int64_t seq;
    PGresult *r;
    snprintf(ids, sizeof ids, "%" PRId64, account);
    /* One statement: the seq and the rows it numbers, from one snapshot. */
    r = ledger_query(
        pg,
        "SELECT a.limits_seq, s.key_id, s.rate_quota, s.rate_window_s, s.daily_cap, "
        "s.monthly_cap FROM accounts a LEFT JOIN LATERAL ("
        "SELECT 0::bigint AS key_id, rate_quota, rate_window_s, daily_cap, monthly_cap "
        "FROM account_limits WHERE account_id = a.id UNION ALL "
        "SELECT l.key_id, l.rate_quota, l.rate_window_s, l.daily_cap, l.monthly_cap "
        "FROM key_limits l JOIN api_keys k ON k.id = l.key_id "
        "WHERE l.account_id = a.id AND k.revoked_at IS NULL) s ON true "
        "WHERE a.id = $1",
        1, p);
    if (!r) return -1;
    if (PQntuples(r) < 1) goto out;
    seq = limits_col(r, 0, 0);
    for (int row = 0; row < PQntuples(r); row++) {
        char prefix[32];
        if (PQgetisnull(r, row, 1)) continue; /* no settings at all */
        if (limits_col(r, row, 1) == 0)
            snprintf(prefix, sizeof prefix, "a.");
        else
            snprintf(prefix, sizeof prefix, "k%" PRId64 ".", limits_col(r, row, 1));
        if (limits_pairs(&pairs, &n, &cap, prefix, r, row) != 0) goto out;
    }
    rc = hot_limits_push(hot, account, seq, (const char *const *)pairs, n, &result);
out:
    PQclear(r);
    for (int i = 0; i < n; i++)
        free(pairs[i]);
    free(pairs);
    return rc;
}

int limits_push_all(PGconn *pg, hot_conn *hot, long *pushed)
{
    PGresult *r =
        ledger_query(pg, "SELECT id FROM accounts WHERE limits_seq > 0 ORDER BY id", 0, NULL);
    int rc = 0;
    *pushed = 0;
    if (!r) return -1;
    for (int i = 0; i < PQntuples(r) && rc == 0; i++) {
        rc = limits_push(pg, hot, strtoll(PQgetvalue(r, i, 0), NULL, 10));
        if (rc == 0) (*pushed)++;
    }
    PQclear(r);
    return rc;
}
