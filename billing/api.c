/* api.c: admin and finance HTTP API (see api.h).
 *
 * Every answer is JSON; every refusal is a 4xx with {"error","message"} and
 * changes nothing. Tokens are compared in constant time (apikey_secret_equal)
 * and never logged. */
#include "billing/api.h"

#include "billing/alerts.h"
#include "billing/archive.h"
#include "billing/control.h"
#include "common/env.h"
#include "billing/keys.h"
#include "billing/limits.h"
#include "common/log.h"
#include "billing/operators.h"
#include "billing/periods.h"
#include "billing/reports.h"
#include "billing/status.h"
#include "billing/webhooks.h"
#include "common/buf.h"

#include <inttypes.h>
#include <arpa/inet.h>
#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define API_MAX_BODY (64 * 1024)
#define API_LEDGER_MAX 500

enum api_role { ROLE_NONE, ROLE_FINANCE, ROLE_ADMIN };

struct api_server {
    struct MHD_Daemon *d;
    const billing_config *cfg;
    billing_metrics *metrics; /* NULL: not counted */
    pthread_key_t ctx_key;    /* per MHD thread: control_ctx */
};

/* State of one request while MHD feeds us its body. */
typedef struct api_req {
    struct buf body; /* bounded at API_MAX_BODY */
    int too_big;
} api_req;

typedef struct api_reply {
    int status;
    json_t *json;      /* owned; NULL for an empty body or a text one */
    char *text;        /* owned; a non-JSON body (CSV) */
    const char *ctype; /* content type of text */
} api_reply;

/* Who is calling: the role and the name recorded on what they change. */
typedef struct api_caller {
    enum api_role role;
    char name[80];
} api_caller;

static api_reply api_json(int status, json_t *j)
{
    api_reply r = {status, j, NULL, NULL};
    return r;
}

static api_reply api_error(int status, const char *code, const char *message)
{
    return api_json(status, json_pack("{s:s, s:s}", "error", code, "message", message));
}

static void api_ctx_free(void *p)
{
    control_ctx *c = p;
    if (!c) return;
    if (c->pg) PQfinish(c->pg);
    hot_close(c->hot);
    free(c);
}

/* The calling thread's connections, opened on first use and repaired after a
 * failure. NULL when Postgres cannot be reached. */
static control_ctx *api_ctx(api_server *s)
{
    control_ctx *c = pthread_getspecific(s->ctx_key);
    if (!c) {
        c = calloc(1, sizeof *c);
        if (!c) return NULL;
        c->pepper = &s->cfg->pepper;
        c->metrics = s->metrics;
        c->hot = hot_open(s->cfg->redis_url);
        if (!c->hot || pthread_setspecific(s->ctx_key, c) != 0) {
            api_ctx_free(c);
            return NULL;
        }
    }
    if (!c->pg) c->pg = ledger_connect(s->cfg->database_url);
    if (!c->pg || ledger_check(c->pg) != 0) return NULL;
    return c;
}

/* Resolves the bearer token: the bootstrap tokens of the environment first
 * (constant-time compares, both always run), then named operators, looked up
 * in Postgres on every call so that a revoke is effective at once. */
static int api_caller_of(api_server *s, control_ctx *c, struct MHD_Connection *conn,
                         api_caller *who)
{
    const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    const char *tok;
    operator_info op;
    size_t n;
    int admin, finance, rc;

    who->role = ROLE_NONE;
    if (!auth || strncmp(auth, "Bearer ", 7) != 0) return LEDGER_OK;
    tok = auth + 7;
    n = strlen(tok);
    admin = s->cfg->admin_token &&
            apikey_secret_equal(tok, n, s->cfg->admin_token, strlen(s->cfg->admin_token));
    finance = s->cfg->finance_token &&
              apikey_secret_equal(tok, n, s->cfg->finance_token, strlen(s->cfg->finance_token));
    if (admin || finance) {
        who->role = admin ? ROLE_ADMIN : ROLE_FINANCE;
        snprintf(who->name, sizeof who->name, "%s",
                 admin ? "bootstrap-admin" : "bootstrap-finance");
        return LEDGER_OK;
    }
    if (n != APIKEY_LEN || strncmp(tok, OPERATOR_PREFIX, strlen(OPERATOR_PREFIX)) != 0)
        return LEDGER_OK;
    rc = operators_authenticate(c->pg, &s->cfg->pepper, tok, &op);
    if (rc == LEDGER_NOT_FOUND) return LEDGER_OK;
    if (rc != LEDGER_OK) return rc;
    who->role = strcmp(op.role, "admin") == 0 ? ROLE_ADMIN : ROLE_FINANCE;
    snprintf(who->name, sizeof who->name, "%s", op.name);
    return LEDGER_OK;
}

/* A positive decimal id of at most 18 digits; 0 if not one. */
static int64_t api_parse_id(const char *s, size_t n)
{
    int64_t v = 0;
    if (n == 0 || n > 18) return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* Checks a text field: present, a string of 1..MAX characters (as Postgres
 * counts them; jansson has already checked the UTF-8), no NUL and no control
 * characters. Returns the string or NULL. */
static const char *api_text(json_t *body, const char *field, size_t max)
{
    json_t *v = json_object_get(body, field);
    const char *s;
    if (!json_is_string(v)) return NULL;
    s = json_string_value(v);
    if (strlen(s) != json_string_length(v)) return NULL; /* embedded NUL */
    return ledger_valid_text(s, max) ? s : NULL;
}

static json_t *api_account_json(const ledger_account *a)
{
    return json_pack("{s:I, s:s, s:s, s:I, s:I, s:I}", "id", (json_int_t)a->id, "name", a->name,
                     "created_at", a->created_at, "credited", (json_int_t)a->credited, "spent",
                     (json_int_t)a->spent, "balance", (json_int_t)(a->credited - a->spent));
}

static json_t *api_entry_json(const ledger_entry *e)
{
    json_t *j = json_pack("{s:I, s:I, s:s, s:I, s:I, s:I, s:s, s:s}", "id", (json_int_t)e->id,
                          "account_id", (json_int_t)e->account_id, "kind", e->kind, "amount",
                          (json_int_t)e->amount, "credit_seq", (json_int_t)e->credit_seq,
                          "credited_after", (json_int_t)e->credited_after, "operator",
                          e->operator_name, "created_at", e->created_at);
    if (!j) return NULL;
    json_object_set_new(j, "reference", e->reference[0] ? json_string(e->reference) : json_null());
    json_object_set_new(j, "reason", e->reason[0] ? json_string(e->reason) : json_null());
    return j;
}

/* Maps a ledger/control status to an answer. */
static api_reply api_status_error(int rc, const char *what)
{
    switch (rc) {
    case LEDGER_NOT_FOUND:
        return api_error(404, "not_found", what);
    case LEDGER_CONFLICT:
        return api_error(409, "conflict",
                         "this reference was already used on this account with other terms");
    case LEDGER_INSUFFICIENT:
        return api_error(409, "insufficient_points",
                         "the adjustment would take the balance below zero");
    case LEDGER_LIMIT:
        return api_error(422, "limit_exceeded",
                         "the amount would exceed the account's maximum credited total");
    case CONTROL_UNAVAILABLE:
        return api_error(503, "billing_unavailable", "redis is unreachable; retry");
    default:
        return api_error(503, "database_unavailable", "the ledger is unreachable; retry");
    }
}

json_t *api_body_parse(const char *buf, size_t len, char *msg, size_t msglen)
{
    json_error_t e;
    json_t *j;
    if (len == 0) {
        snprintf(msg, msglen, "a JSON object body is required");
        return NULL;
    }
    j = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &e);
    if (!j || !json_is_object(j)) {
        snprintf(msg, msglen, "malformed JSON: %s", j ? "not an object" : e.text);
        json_decref(j);
        return NULL;
    }
    return j;
}

static json_t *api_parse_body(const api_req *rq, api_reply *err)
{
    char msg[256];
    json_t *j = api_body_parse(rq->body.p, rq->body.len, msg, sizeof msg);
    if (!j) *err = api_error(400, "bad_request", msg);
    return j;
}

/* Reads "amount": a JSON integer, non-zero, |amount| <= 10^12, and > 0
 * unless SIGNED. */
static int api_amount(json_t *body, int is_signed, int64_t *out)
{
    json_t *v = json_object_get(body, "amount");
    json_int_t a;
    if (!json_is_integer(v)) return -1;
    a = json_integer_value(v);
    if (a == 0 || a > LEDGER_MAX_AMOUNT || a < -LEDGER_MAX_AMOUNT) return -1;
    if (!is_signed && a < 0) return -1;
    *out = (int64_t)a;
    return 0;
}

const char *api_body_account(json_t *body, const char **name)
{
    *name = api_text(body, "name", 200);
    return *name ? NULL : "name must be a string of 1 to 200 characters";
}

const char *api_body_credit(json_t *body, int is_topup, api_credit_body *out)
{
    out->reference = out->reason = NULL;
    if (api_amount(body, !is_topup, &out->amount) != 0)
        return is_topup ? "amount must be an integer between 1 and 1000000000000"
                        : "amount must be a non-zero integer between -1000000000000 "
                          "and 1000000000000";
    if (json_object_get(body, "reference")) {
        out->reference = api_text(body, "reference", 200);
        if (!out->reference) return "reference must be a string of 1 to 200 characters";
    }
    if (is_topup && !out->reference) return "reference is required: it makes a top-up idempotent";
    if (!is_topup) {
        out->reason = api_text(body, "reason", 500);
        if (!out->reason) return "reason must be a string of 1 to 500 characters";
    }
    return NULL;
}

static api_reply api_create_account(control_ctx *c, const api_req *rq)
{
    api_reply err;
    ledger_account a;
    json_t *body = api_parse_body(rq, &err);
    const char *name, *bad;
    int rc;
    if (!body) return err;
    bad = api_body_account(body, &name);
    if (bad) {
        json_decref(body);
        return api_error(400, "bad_request", bad);
    }
    rc = control_account_create(c, name, &a);
    json_decref(body);
    if (rc != LEDGER_OK) return api_status_error(rc, "account");
    return api_json(201, api_account_json(&a));
}

static api_reply api_get_account(control_ctx *c, int64_t id)
{
    ledger_account a;
    int found = 0;
    int64_t credited, spent, held;
    json_t *j;
    int rc = ledger_account_get(c->pg, id, &a);
    if (rc != LEDGER_OK) return api_status_error(rc, "no such account");
    j = api_account_json(&a);
    if (hot_account(c->hot, id, &found, &credited, &spent, &held) == 0 && found) {
        json_object_set_new(j, "available", json_integer(credited - spent - held));
        json_object_set_new(j, "held", json_integer(held));
        json_object_set_new(j, "live", json_true());
    } else {
        /* Redis unreachable or not yet synced: say so rather than guess. */
        json_object_set_new(j, "available", json_null());
        json_object_set_new(j, "held", json_null());
        json_object_set_new(j, "live", json_false());
    }
    return api_json(200, j);
}

/* POST /v1/accounts/{id}/keys [{"name","expires_at","scopes"}]: 201 the
 * key as listed plus "api_key", the secret, shown this once. */
static api_reply api_create_key(control_ctx *c, int64_t account, const api_req *rq)
{
    char key[APIKEY_LEN + 1];
    api_reply err;
    keys_spec spec;
    json_t *body = NULL, *info = NULL;
    const char *bad;
    int rc;
    if (rq->body.len > 0 && !(body = api_parse_body(rq, &err))) return err;
    bad = keys_parse(body, &spec);
    if (bad) {
        json_decref(body);
        return api_error(400, "bad_request", bad);
    }
    rc = keys_create(c, account, &spec, key, &info);
    json_decref(body);
    if (rc != LEDGER_OK) return api_status_error(rc, "no such account");
    json_object_set_new(info, "api_key", json_string(key));
    sodium_memzero(key, sizeof key);
    return api_json(201, info);
}

/* GET /v1/accounts/{id}/keys?after=&limit=: never a secret or a hash. */
static api_reply api_list_keys(control_ctx *c, int64_t account, struct MHD_Connection *conn)
{
    const char *ls = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "limit");
    const char *as = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "after");
    int64_t limit = 100, after = 0;
    json_t *keys;
    int rc;
    if (ls && (env_parse_int64(ls, &limit) != 0 || limit < 1 || limit > KEYS_LIST_MAX))
        return api_error(400, "bad_request", "limit must be an integer from 1 to 1000");
    if (as && (env_parse_int64(as, &after) != 0 || after < 0))
        return api_error(400, "bad_request", "after must be a key id");
    rc = keys_list(c->pg, account, after, (int)limit, &keys);
    if (rc != LEDGER_OK) return api_status_error(rc, "no such account");
    /* "O": next_after is borrowed from the last key (json_null() is not counted). */
    return api_json(200, json_pack("{s:o, s:O}", "keys", keys, "next_after",
                                   json_array_size(keys) == (size_t)limit
                                       ? json_object_get(json_array_get(keys, limit - 1), "key_id")
                                       : json_null()));
}

/* POST /v1/keys/{id}/rotate [{"grace_s"}]: 201 the new key with its secret. */
static api_reply api_rotate_key(control_ctx *c, int64_t key_id, const api_req *rq)
{
    char key[APIKEY_LEN + 1];
    api_reply err;
    json_t *body = NULL, *info = NULL, *g;
    int64_t grace = KEYS_GRACE_DEFAULT_S;
    const char *k;
    int rc;
    if (rq->body.len > 0 && !(body = api_parse_body(rq, &err))) return err;
    if (body) {
        json_t *v;
        json_object_foreach(body, k, v)
        {
            if (strcmp(k, "grace_s") != 0) {
                json_decref(body);
                return api_error(400, "bad_request", "unknown field: a rotation takes grace_s");
            }
        }
        g = json_object_get(body, "grace_s");
        if (!json_is_object(body) || (g && (!json_is_integer(g) || json_integer_value(g) < 0 ||
                                            json_integer_value(g) > KEYS_GRACE_MAX_S))) {
            json_decref(body);
            return api_error(400, "bad_request",
                             "grace_s must be an integer of seconds from 0 to 2592000 (30 days)");
        }
        if (g) grace = (int64_t)json_integer_value(g);
        json_decref(body);
    }
    rc = keys_rotate(c, key_id, grace, key, &info);
    if (rc == LEDGER_CONFLICT)
        return api_error(409, "already_rotated",
                         "this key was rotated already: rotate its successor (rotated_to)");
    if (rc != LEDGER_OK) return api_status_error(rc, "no such live key");
    json_object_set_new(info, "api_key", json_string(key));
    json_object_set_new(info, "grace_s", json_integer((json_int_t)grace));
    sodium_memzero(key, sizeof key);
    return api_json(201, info);
}

static api_reply api_revoke_key(control_ctx *c, int64_t key_id)
{
    int rc = keys_revoke(c, key_id);
    if (rc != LEDGER_OK) return api_status_error(rc, "no such key");
    return api_json(204, NULL);
}

static api_reply api_credit(control_ctx *c, int64_t account, const api_req *rq, int is_topup,
                            const char *operator_name)
{
    api_reply err;
    ledger_entry e;
    api_credit_body b;
    int created = 0, rc;
    const char *bad;
    json_t *body = api_parse_body(rq, &err);
    if (!body) return err;
    bad = api_body_credit(body, is_topup, &b);
    if (bad) {
        err = api_error(400, "bad_request", bad);
        goto out;
    }
    rc = control_credit(c, account, is_topup ? "topup" : "adjustment", b.amount, b.reference,
                        b.reason, operator_name, &e, &created);
    if (rc != LEDGER_OK) {
        err = api_status_error(rc, "no such account");
        goto out;
    }
    err = api_json(created ? 201 : 200, api_entry_json(&e));
out:
    json_decref(body);
    return err;
}

static api_reply api_ledger(control_ctx *c, int64_t account, struct MHD_Connection *conn)
{
    const char *ls = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "limit");
    const char *bs = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "before");
    int64_t limit = 50, before = 0;
    ledger_entry *rows;
    ledger_account a;
    json_t *arr, *j;
    int n = 0, rc;

    if (ls && (env_parse_int64(ls, &limit) != 0 || limit < 1 || limit > API_LEDGER_MAX))
        return api_error(400, "bad_request", "limit must be an integer from 1 to 500");
    if (bs && (env_parse_int64(bs, &before) != 0 || before < 1))
        return api_error(400, "bad_request", "before must be a positive entry id");
    rc = ledger_account_get(c->pg, account, &a);
    if (rc != LEDGER_OK) return api_status_error(rc, "no such account");
    rows = calloc((size_t)limit, sizeof *rows);
    if (!rows) return api_error(503, "internal", "out of memory");
    rc = ledger_entries(c->pg, account, before, (int)limit, rows, &n);
    if (rc != LEDGER_OK) {
        free(rows);
        return api_status_error(rc, "ledger");
    }
    arr = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(arr, api_entry_json(&rows[i]));
    j = json_pack("{s:o}", "entries", arr);
    /* The cursor for the next (older) page, when this one was full. */
    json_object_set_new(j, "next_before", n == limit ? json_integer(rows[n - 1].id) : json_null());
    free(rows);
    return api_json(200, j);
}

static const char *api_arg(struct MHD_Connection *conn, const char *name)
{
    return MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, name);
}

/* GET /v1/reports/usage?from=&to=&group_by=&account=&format=json|csv */
static api_reply api_usage(control_ctx *c, struct MHD_Connection *conn)
{
    const char *from = api_arg(conn, "from"), *to = api_arg(conn, "to");
    const char *group = api_arg(conn, "group_by"), *fmt = api_arg(conn, "format");
    const char *accts = api_arg(conn, "account");
    const char *accept = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Accept");
    int mask, csv, rc;
    int64_t account = 0;
    report_usage u;
    api_reply out;

    if (calendar_valid_date(from) != 0 || calendar_valid_date(to) != 0)
        return api_error(400, "bad_request", "from and to must be dates YYYY-MM-DD (to exclusive)");
    if (strcmp(from, to) >= 0) return api_error(400, "bad_request", "from must be before to");
    if (reports_parse_group_by(group, &mask) != 0)
        return api_error(400, "bad_request",
                         "group_by is a comma-separated list of account, route, day");
    if (accts && !(account = api_parse_id(accts, strlen(accts))))
        return api_error(400, "bad_request", "account must be an account id");
    if (fmt && strcmp(fmt, "csv") != 0 && strcmp(fmt, "json") != 0)
        return api_error(400, "bad_request", "format is json or csv");
    csv = fmt ? strcmp(fmt, "csv") == 0 : (accept && strstr(accept, "text/csv") != NULL);
    rc = reports_usage(c->pg, from, to, mask, account, &u);
    if (rc == LEDGER_LIMIT)
        return api_error(422, "too_many_rows", "the report is too large; narrow it");
    if (rc != LEDGER_OK) return api_status_error(rc, "report");
    if (csv) {
        out = api_json(200, NULL);
        out.text = reports_usage_csv(&u);
        out.ctype = "text/csv; charset=utf-8";
        if (!out.text) out = api_error(500, "internal", "could not render");
    } else {
        out = api_json(200, reports_usage_json(&u));
    }
    reports_usage_free(&u);
    return out;
}

/* GET /v1/reports/statement?account=&month=YYYY-MM */
static api_reply api_statement(control_ctx *c, struct MHD_Connection *conn)
{
    const char *accts = api_arg(conn, "account"), *month = api_arg(conn, "month");
    char next[8];
    int64_t account = accts ? api_parse_id(accts, strlen(accts)) : 0;
    report_statement st;
    api_reply out;
    int rc;
    if (!account) return api_error(400, "bad_request", "account must be an account id");
    if (calendar_valid_month(month, next) != 0)
        return api_error(400, "bad_request", "month must be YYYY-MM");
    rc = reports_statement(c->pg, account, month, &st);
    if (rc != LEDGER_OK) return api_status_error(rc, "no such account");
    out = api_json(200, reports_statement_json(&st));
    reports_statement_free(&st);
    return out;
}

/* The settings of SCOPE ID as answered by GET and PUT .../limits. */
static api_reply api_limits_reply(int status, enum limits_scope scope, int64_t id, int64_t account,
                                  const limits_spec *spec, int pushed)
{
    json_t *j = limits_json(spec);
    if (!j) return api_error(500, "internal", "out of memory");
    json_object_set_new(j, scope == LIMITS_ACCOUNT ? "account_id" : "key_id",
                        json_integer((json_int_t)id));
    if (scope == LIMITS_KEY)
        json_object_set_new(j, "account_id", json_integer((json_int_t)account));
    if (pushed >= 0) json_object_set_new(j, "applied", json_boolean(pushed));
    return api_json(status, j);
}

static api_reply api_get_limits(control_ctx *c, enum limits_scope scope, int64_t id)
{
    limits_spec spec;
    int64_t account = 0;
    int rc = limits_get(c->pg, scope, id, &spec, &account);
    if (rc != LEDGER_OK)
        return api_status_error(rc, scope == LIMITS_ACCOUNT ? "no such account" : "no such key");
    return api_limits_reply(200, scope, id, account, &spec, -1);
}

/* PUT replaces the scope's settings whole; "applied": false says Redis did
 * not take them yet (the repair pass pushes them). */
static api_reply api_put_limits(control_ctx *c, enum limits_scope scope, int64_t id,
                                const api_req *rq)
{
    api_reply err;
    limits_spec spec;
    int64_t account = 0;
    int rc, pushed = 0;
    json_t *body = api_parse_body(rq, &err);
    const char *bad;
    if (!body) return err;
    bad = limits_parse(body, &spec);
    json_decref(body);
    if (bad) return api_error(400, "bad_request", bad);
    rc = limits_set(c, scope, id, &spec, &account, &pushed);
    if (rc != LEDGER_OK)
        return api_status_error(rc, scope == LIMITS_ACCOUNT ? "no such account"
                                                            : "no such key (or it is revoked)");
    return api_limits_reply(200, scope, id, account, &spec, pushed);
}

/* The answer of a webhook or alert call (webhooks.h: its status, *OUT its
 * body), taken after the call has set it. */
static api_reply api_answer(int status, json_t **out)
{
    return api_json(status, *out);
}

/* Splits "/v1/accounts/12/keys" style paths and dispatches. */
static api_reply api_route(api_server *s, struct MHD_Connection *conn, const char *method,
                           const char *url, const api_req *rq)
{
    const char *seg[6];
    size_t len[6];
    int n = 0, is_get = strcmp(method, "GET") == 0, is_post = strcmp(method, "POST") == 0,
        is_delete = strcmp(method, "DELETE") == 0, is_put = strcmp(method, "PUT") == 0;
    api_caller who;
    control_ctx *c;
    int64_t id = 0;

    if (strcmp(url, "/healthz") == 0 && is_get)
        return api_json(200, json_pack("{s:s}", "status", "ok"));
    for (const char *p = url; *p && n < 6;) {
        const char *q;
        if (*p != '/') return api_error(404, "not_found", "no such endpoint");
        p++;
        q = strchr(p, '/');
        seg[n] = p;
        len[n] = q ? (size_t)(q - p) : strlen(p);
        n++;
        p += len[n - 1];
    }
#define SEG(i, lit) (len[i] == sizeof(lit) - 1 && memcmp(seg[i], lit, len[i]) == 0)
    if (n < 2 || !SEG(0, "v1")) return api_error(404, "not_found", "no such endpoint");

    c = api_ctx(s);
    if (!c) return api_error(503, "database_unavailable", "the ledger is unreachable; retry");
    if (api_caller_of(s, c, conn, &who) != LEDGER_OK)
        return api_error(503, "database_unavailable", "the ledger is unreachable; retry");
    if (who.role == ROLE_NONE)
        return api_error(401, "unauthorized", "a valid operator bearer token is required");
    if (!is_get && who.role != ROLE_ADMIN)
        return api_error(403, "forbidden", "this call needs the admin role");

    if (SEG(1, "accounts")) {
        if (n == 2) {
            if (is_post) return api_create_account(c, rq);
            return api_error(405, "method_not_allowed", "use POST");
        }
        id = api_parse_id(seg[2], len[2]);
        if (!id) return api_error(404, "not_found", "no such account");
        if (n == 3) {
            if (is_get) return api_get_account(c, id);
            return api_error(405, "method_not_allowed", "use GET");
        }
        if (n == 4 && SEG(3, "keys")) {
            if (is_post) return api_create_key(c, id, rq);
            if (is_get) return api_list_keys(c, id, conn);
            return api_error(405, "method_not_allowed", "use GET or POST");
        }
        if (n == 4 && (SEG(3, "topups") || SEG(3, "adjustments"))) {
            if (is_post) return api_credit(c, id, rq, SEG(3, "topups"), who.name);
            return api_error(405, "method_not_allowed", "use POST");
        }
        if (n == 4 && SEG(3, "limits")) {
            if (is_get) return api_get_limits(c, LIMITS_ACCOUNT, id);
            if (is_put) return api_put_limits(c, LIMITS_ACCOUNT, id, rq);
            return api_error(405, "method_not_allowed", "use GET or PUT");
        }
        if (n == 4 && SEG(3, "ledger")) {
            if (is_get) return api_ledger(c, id, conn);
            return api_error(405, "method_not_allowed", "use GET");
        }
        if (n == 4 && SEG(3, "webhooks")) {
            json_t *out = NULL;
            if (is_post)
                return api_answer(webhooks_api_create(c, id, rq->body.p, rq->body.len, &out), &out);
            if (is_get) return api_answer(webhooks_api_list(c, id, &out), &out);
            return api_error(405, "method_not_allowed", "use GET or POST");
        }
        if (n == 4 && SEG(3, "alerts")) {
            json_t *out = NULL;
            if (is_put)
                return api_answer(alerts_api_put(c, id, rq->body.p, rq->body.len, &out), &out);
            if (is_get) return api_answer(alerts_api_get(c, id, &out), &out);
            return api_error(405, "method_not_allowed", "use GET or PUT");
        }
    } else if (SEG(1, "reports") && n == 3 && (SEG(2, "usage") || SEG(2, "statement"))) {
        if (!is_get) return api_error(405, "method_not_allowed", "use GET");
        return SEG(2, "usage") ? api_usage(c, conn) : api_statement(c, conn);
    } else if (SEG(1, "charges") && n == 3) {
        json_t *out = NULL;
        if (!is_get) return api_error(405, "method_not_allowed", "use GET");
        return api_answer(archive_api_charge(c->pg, seg[2], len[2], &out), &out);
    } else if (SEG(1, "periods") && (n == 2 || (n == 4 && SEG(3, "close")))) {
        json_t *out = NULL;
        if (n == 2) {
            if (!is_get) return api_error(405, "method_not_allowed", "use GET");
            return api_answer(periods_api_list(c->pg, &out), &out);
        }
        if (!is_post) return api_error(405, "method_not_allowed", "use POST");
        return api_answer(periods_api_close(c->pg, seg[2], len[2], who.name, &out), &out);
    } else if (SEG(1, "status") && n == 2) {
        /* Finance and admin alike: it changes nothing (status.c). */
        int verdict;
        json_t *rep;
        if (!is_get) return api_error(405, "method_not_allowed", "use GET");
        rep = status_build(c->pg, NULL, c->hot, &verdict);
        if (!rep) return api_error(500, "internal", "out of memory");
        return api_json(200, rep);
    } else if (SEG(1, "webhooks") && (n == 3 || (n == 4 && SEG(3, "deliveries")))) {
        json_t *out = NULL;
        id = api_parse_id(seg[2], len[2]);
        if (!id) return api_error(404, "not_found", "no such webhook endpoint");
        if (n == 3) {
            if (is_delete) return api_answer(webhooks_api_remove(c, id, &out), &out);
            return api_error(405, "method_not_allowed", "use DELETE");
        }
        if (!is_get) return api_error(405, "method_not_allowed", "use GET");
        return api_answer(
            webhooks_api_deliveries(
                c, id, MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "limit"),
                MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "before"), &out),
            &out);
    } else if (SEG(1, "events") && n == 4 && SEG(3, "replay")) {
        json_t *out = NULL;
        if (!is_post) return api_error(405, "method_not_allowed", "use POST");
        return api_answer(webhooks_api_replay(c, seg[2], len[2], &out), &out);
    } else if (SEG(1, "keys") && n == 4 && SEG(3, "limits")) {
        id = api_parse_id(seg[2], len[2]);
        if (!id) return api_error(404, "not_found", "no such key");
        if (is_get) return api_get_limits(c, LIMITS_KEY, id);
        if (is_put) return api_put_limits(c, LIMITS_KEY, id, rq);
        return api_error(405, "method_not_allowed", "use GET or PUT");
    } else if (SEG(1, "keys") && n == 4 && SEG(3, "rotate")) {
        id = api_parse_id(seg[2], len[2]);
        if (!id) return api_error(404, "not_found", "no such key");
        if (is_post) return api_rotate_key(c, id, rq);
        return api_error(405, "method_not_allowed", "use POST");
    } else if (SEG(1, "keys") && n == 3) {
        id = api_parse_id(seg[2], len[2]);
        if (!id) return api_error(404, "not_found", "no such key");
        if (is_delete) return api_revoke_key(c, id);
        return api_error(405, "method_not_allowed", "use DELETE");
    }
#undef SEG
    return api_error(404, "not_found", "no such endpoint");
}

/* Sends R, counting it under endpoint template EP with its final status. */
static enum MHD_Result api_send(api_server *s, int ep, struct MHD_Connection *conn, api_reply r)
{
    char *text = r.json ? json_dumps(r.json, JSON_COMPACT) : r.text;
    const char *ctype = r.json ? "application/json" : r.ctype;
    struct MHD_Response *resp;
    enum MHD_Result ret;
    if (r.json && !text) {
        r.status = 500;
        text = strdup("{\"error\":\"internal\",\"message\":\"could not render\"}");
    }
    json_decref(r.json);
    resp = MHD_create_response_from_buffer(text ? strlen(text) : 0, text, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(text);
        return MHD_NO;
    }
    if (text) MHD_add_response_header(resp, "Content-Type", ctype ? ctype : "application/json");
    MHD_add_response_header(resp, "Cache-Control", "no-store");
    bm_api(s->metrics, ep, r.status);
    ret = MHD_queue_response(conn, (unsigned)r.status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result api_handler(void *cls, struct MHD_Connection *conn, const char *url,
                                   const char *method, const char *version, const char *upload_data,
                                   size_t *upload_size, void **con_cls)
{
    api_server *s = cls;
    api_req *rq = *con_cls;
    if (!rq) {
        rq = calloc(1, sizeof *rq);
        if (!rq) return MHD_NO;
        buf_init(&rq->body, API_MAX_BODY);
        *con_cls = rq;
        return MHD_YES;
    }
    if (*upload_size > 0) {
        if (!rq->too_big) {
            int rc = buf_append(&rq->body, upload_data, *upload_size);
            if (rc == BUF_NOMEM) return MHD_NO;
            /* Past the bound: the rest is not kept, and the answer is 413. */
            if (rc == BUF_TOO_LARGE) rq->too_big = 1;
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (rq->too_big)
        return api_send(s, bm_endpoint_of(url), conn,
                        api_error(413, "payload_too_large", "body over 64 KiB"));
    return api_send(s, bm_endpoint_of(url), conn, api_route(s, conn, method, url, rq));
}

static void api_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                          enum MHD_RequestTerminationCode toe)
{
    api_req *rq = *con_cls;
    if (!rq) return;
    buf_free(&rq->body);
    free(rq);
    *con_cls = NULL;
}

api_server *api_start(const billing_config *cfg, billing_metrics *metrics)
{
    api_server *s = calloc(1, sizeof *s);
    struct sockaddr_in addr;
    if (!s) return NULL;
    s->cfg = cfg;
    s->metrics = metrics;
    if (pthread_key_create(&s->ctx_key, api_ctx_free) != 0) {
        free(s);
        return NULL;
    }
    if (config_sockaddr("BILLING_LISTEN", cfg->listen_host, cfg->listen_port, &addr) != 0)
        goto fail;
    s->d =
        MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL, 0, NULL, NULL,
                         api_handler, s, MHD_OPTION_SOCK_ADDR, &addr, MHD_OPTION_THREAD_POOL_SIZE,
                         (unsigned)cfg->api_threads, MHD_OPTION_NOTIFY_COMPLETED, api_completed, s,
                         MHD_OPTION_CONNECTION_TIMEOUT, 30u, MHD_OPTION_CONNECTION_LIMIT, 1000u,
                         MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(128 * 1024), MHD_OPTION_END);
    if (!s->d) {
        log_error("admin API: cannot listen on %s:%d", cfg->listen_host, cfg->listen_port);
        goto fail;
    }
    log_info("admin API listening on %s:%d", cfg->listen_host, cfg->listen_port);
    return s;
fail:
    pthread_key_delete(s->ctx_key);
    free(s);
    return NULL;
}

void api_stop(api_server *s)
{
    if (!s) return;
    /* Stopping joins the pool threads, which runs each one's ctx destructor. */
    MHD_stop_daemon(s->d);
    pthread_key_delete(s->ctx_key);
    free(s);
}
