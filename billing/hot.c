/* hot.c: synchronous hot-balance client (see hot.h). */
#include "billing/hot.h"

#include "common/hotkeys.h"
#include "common/log.h"
#include "common/redisurl.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { HOT_RESERVE, HOT_SETTLE, HOT_CREDIT, HOT_KEYPUSH, HOT_PASSEND, HOT_LIMITS, HOT_NSCRIPTS };

struct hot_conn {
    redisContext *c;
    redisurl url;      /* REDIS_URL, parsed: AUTH and SELECT on every connect */
    int auth_refused;  /* the last handshake was refused: logged once per streak */
    unsigned connects; /* handshakes that succeeded: a new one may be a new Redis */
    char error[128];   /* the last connection or I/O error (hot_error) */
    int timeout_ms;    /* 0: the defaults (hot_set_timeout) */
    char sha[HOT_NSCRIPTS][41];
};

static const char *const hot_sources[HOT_NSCRIPTS] = {hot_lua_reserve, hot_lua_settle,
                                                      hot_lua_credit,  hot_lua_keypush,
                                                      hot_lua_passend, hot_lua_limits};

hot_conn *hot_open(const char *redis_url)
{
    hot_conn *h = calloc(1, sizeof *h);
    char err[256], shown[512];
    if (!h) return NULL;
    if (redisurl_parse(redis_url, &h->url, err, sizeof err) != 0) {
        redisurl_redact(redis_url, shown, sizeof shown);
        log_error("REDIS_URL=%s: %s", shown, err);
        free(h);
        return NULL;
    }
    return h;
}

void hot_set_timeout(hot_conn *h, int ms)
{
    h->timeout_ms = ms;
}

void hot_close(hot_conn *h)
{
    if (!h) return;
    if (h->c) redisFree(h->c);
    redisurl_wipe(&h->url);
    free(h);
}

static void hot_drop(hot_conn *h)
{
    if (h->c) redisFree(h->c);
    h->c = NULL;
}

/* One handshake command (AUTH, SELECT) on a fresh connection: 0 when Redis
 * said OK. A refusal (WRONGPASS, NOPERM, a db out of range) is logged once
 * until a handshake succeeds again: every worker retries on its own
 * interval, and a wrong password would otherwise fill the log. The reply
 * names no secret; the command line is never logged. */
static int hot_handshake(hot_conn *h, const char *what, int argc, const char **argv)
{
    redisReply *r = redisCommandArgv(h->c, argc, argv, NULL);
    int ok = r && r->type == REDIS_REPLY_STATUS;
    if (!ok && r && r->type == REDIS_REPLY_ERROR && !h->auth_refused) {
        log_error("redis %s:%d: %s refused: %s (check the user and password in REDIS_URL; "
                  "Redis counts as unavailable until it is accepted)",
                  h->url.host, h->url.port, what, r->str);
        h->auth_refused = 1;
    } else if (!ok && !r) {
        log_warn("redis %s:%d: %s: %s", h->url.host, h->url.port, what, h->c->errstr);
    }
    if (r) freeReplyObject(r);
    return ok ? 0 : -1;
}

/* Connects if needed; 0 when a connection is ready. AUTH (REDIS_URL's user
 * and password) and SELECT run on every new connection, before anything
 * else is sent on it. */
static int hot_ensure(hot_conn *h)
{
    struct timeval tv = {2, 0}, cmd = {5, 0};
    char db[16];
    const char *argv[3];
    if (h->c && !h->c->err) return 0;
    if (h->timeout_ms > 0) {
        tv = (struct timeval){h->timeout_ms / 1000, (h->timeout_ms % 1000) * 1000};
        cmd = tv;
    }
    hot_drop(h);
    h->c = redisConnectWithTimeout(h->url.host, h->url.port, tv);
    if (!h->c || h->c->err) {
        log_warn("redis %s:%d: %s", h->url.host, h->url.port,
                 h->c ? h->c->errstr : "out of memory");
        snprintf(h->error, sizeof h->error, "%s", h->c ? h->c->errstr : "out of memory");
        hot_drop(h);
        return -1;
    }
    redisSetTimeout(h->c, cmd);
    if (h->url.password[0]) {
        int argc = 0;
        argv[argc++] = "AUTH";
        if (h->url.user[0]) argv[argc++] = h->url.user;
        argv[argc++] = h->url.password;
        if (hot_handshake(h, "AUTH", argc, argv) != 0) goto fail;
    }
    if (h->url.db != 0) {
        snprintf(db, sizeof db, "%d", h->url.db);
        argv[0] = "SELECT";
        argv[1] = db;
        if (hot_handshake(h, "SELECT", 2, argv) != 0) goto fail;
    }
    if (h->auth_refused) log_info("redis %s:%d: accepted again", h->url.host, h->url.port);
    h->auth_refused = 0;
    h->connects++;
    return 0;
fail:
    hot_drop(h);
    return -1;
}

/* A reply that means "Redis is up but cannot answer yet" (loading its data
 * after a restart, a busy script): worth waiting a moment for. ("BUSY " with
 * its space: BUSYGROUP is a real answer.) */
static int hot_transient(const redisReply *r)
{
    return r && r->type == REDIS_REPLY_ERROR &&
           (strncmp(r->str, "LOADING", 7) == 0 || strncmp(r->str, "BUSY ", 5) == 0 ||
            strncmp(r->str, "TRYAGAIN", 8) == 0);
}

/* Every command this client sends is idempotent (scripts by reservation id
 * or sequence, SET/DEL, XACK/XDEL; a lost XREADGROUP reply leaves entries
 * pending, which are read again), so a command that met a dead connection
 * (Redis restarted since our last call) is retried on a fresh one, and one
 * refused as transient is retried for up to about two seconds. This client
 * serves the control plane's own threads, never an event loop, so waiting
 * here blocks nobody else. */
void *hot_command_argv(hot_conn *h, int argc, const char **argv, const size_t *lens)
{
    redisReply *r = NULL;
    for (int attempt = 0; attempt < 40; attempt++) {
        if (hot_ensure(h) != 0) return NULL;
        r = redisCommandArgv(h->c, argc, argv, lens);
        if (!r) {
            log_warn("redis: %s", h->c->errstr);
            snprintf(h->error, sizeof h->error, "%s", h->c->errstr);
            hot_drop(h);
            if (attempt >= 1) return NULL; /* a second dead connection: Redis is down */
            continue;
        }
        if (!hot_transient(r)) return r;
        freeReplyObject(r);
        r = NULL;
        nanosleep(&(struct timespec){0, 50 * 1000000L}, NULL);
    }
    return r;
}

static int hot_load(hot_conn *h, int script)
{
    const char *argv[3] = {"SCRIPT", "LOAD", hot_sources[script]};
    redisReply *r = hot_command_argv(h, 3, argv, NULL);
    int rc = -1;
    if (!r) return -1;
    if (r->type == REDIS_REPLY_STRING && r->len == 40) {
        memcpy(h->sha[script], r->str, 41);
        rc = 0;
    } else {
        log_error("redis: SCRIPT LOAD failed: %s", r->type == REDIS_REPLY_ERROR ? r->str : "?");
    }
    freeReplyObject(r);
    return rc;
}

/* The most keys and arguments one script call of billing's takes (a
 * limits snapshot: 4 settings per key of an account). */
#define HOT_EVAL_ARGS_MAX 65536

/* EVALSHA with the script's keys and args; reloads once on NOSCRIPT (Redis
 * restarted or SCRIPT FLUSH). Returns the reply (caller frees) or NULL. */
static redisReply *hot_eval(hot_conn *h, int script, int nkeys, const char **args, int nargs)
{
    const char *small[16], **argv = small;
    char nk[8];
    redisReply *r = NULL;
    if (nargs < 0 || nargs > HOT_EVAL_ARGS_MAX) return NULL;
    if (nargs + 3 > 16 && !(argv = malloc((size_t)(nargs + 3) * sizeof *argv))) return NULL;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (hot_ensure(h) != 0) break;
        if (!h->sha[script][0] && hot_load(h, script) != 0) break;
        snprintf(nk, sizeof nk, "%d", nkeys);
        argv[0] = "EVALSHA";
        argv[1] = h->sha[script];
        argv[2] = nk;
        for (int i = 0; i < nargs; i++)
            argv[3 + i] = args[i];
        r = hot_command_argv(h, nargs + 3, argv, NULL);
        if (!r) break;
        if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0) {
            freeReplyObject(r);
            r = NULL;
            h->sha[script][0] = '\0';
            continue;
        }
        break;
    }
    if (argv != small) free(argv);
    if (r && r->type == REDIS_REPLY_ERROR) {
        log_error("redis script: %s", r->str);
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

/* Reads integer element I of an array reply; 0 if absent. */
static int64_t hot_elem(const redisReply *r, size_t i)
{
    if (r->type != REDIS_REPLY_ARRAY || i >= r->elements) return 0;
    if (r->element[i]->type == REDIS_REPLY_INTEGER) return r->element[i]->integer;
    return 0;
}

/* Runs SCRIPT on ACCOUNT, as a batch of one for reserve.lua and settle.lua:
 * KEYS are OUTBOX (when given, first) then the account's two keys, ARGV the
 * script's arguments; OUT gets the first three integers of its reply
 * (absent ones 0). */
static int hot_run(hot_conn *h, int script, int64_t account, const char *outbox, const char **argv,
                   int nargv, int64_t out[3])
{
    hot_keys k;
    const char *args[12];
    int nkeys = 0;
    redisReply *r;
    if (3 + nargv > 12) return -1;
    hot_keys_for(&k, account);
    if (outbox) args[nkeys++] = outbox;
    args[nkeys++] = k.acct;
    args[nkeys++] = k.holds;
    for (int i = 0; i < nargv; i++)
        args[nkeys + i] = argv[i];
    r = hot_eval(h, script, nkeys, args, nkeys + nargv);
    if (!r) return -1;
    for (int i = 0; i < 3; i++)
        out[i] = hot_elem(r, (size_t)i);
    freeReplyObject(r);
    return 0;
}

/* credit.lua; MARKER (or NULL) names a repair pass: *lost = 1 when it is
 * gone (nothing written). */
static int hot_credit_run(hot_conn *h, const char *marker, int64_t account, int64_t seq,
                          int64_t credited, int64_t spent, const char *guard_rid,
                          int drop_expired_guards, int *applied, int *lost, int *repaired)
{
    char s[24], c[24], sp[24], rebuilt[HOT_KEYNAME_MAX];
    hot_keys k;
    const char *args[10];
    int64_t out[4];
    int nkeys = marker ? 5 : 4, n = 0;
    redisReply *r;
    hot_keys_for(&k, account);
    snprintf(rebuilt, sizeof rebuilt, "pg:{%" PRId64 "}:rebuilt", account);
    snprintf(s, sizeof s, "%" PRId64, seq);
    snprintf(c, sizeof c, "%" PRId64, credited);
    snprintf(sp, sizeof sp, "%" PRId64, spent);
    args[n++] = HOT_OUTBOX;
    args[n++] = k.acct;
    args[n++] = k.holds;
    args[n++] = rebuilt; /* credit.lua: a hash made from Postgres after a loss */
    if (marker) args[n++] = marker;
    args[n++] = s;
    args[n++] = c;
    args[n++] = sp;
    args[n++] = guard_rid ? guard_rid : "";
    args[n++] = drop_expired_guards ? "1" : "0";
    r = hot_eval(h, HOT_CREDIT, nkeys, args, n);
    if (!r) return -1;
    for (int i = 0; i < 4; i++)
        out[i] = hot_elem(r, (size_t)i);
    freeReplyObject(r);
    *applied = (int)out[0];
    *lost = out[3] == 1;
    *repaired = out[2] == 1;
    if (out[2] == 1)
        log_warn("account %" PRId64 ": Redis had lost settled charges; its spent raised to "
                 "Postgres' %" PRId64,
                 account, spent);
    return 0;
}

int hot_credit(hot_conn *h, int64_t account, int64_t seq, int64_t credited, int64_t spent,
               const char *guard_rid, int drop_expired_guards, int *applied)
{
    int lost, repaired;
    return hot_credit_run(h, NULL, account, seq, credited, spent, guard_rid, drop_expired_guards,
                          applied, &lost, &repaired);
}

int hot_pass_credit(hot_conn *h, const char *marker, int64_t account, int64_t seq, int64_t credited,
                    int64_t spent, int *applied, int *lost, int *repaired)
{
    return hot_credit_run(h, marker, account, seq, credited, spent, "", 1, applied, lost, repaired);
}

int hot_reserve(hot_conn *h, int64_t account, const char *rid, int64_t amount, int64_t ttl_ms,
                const char *route, int *status, int64_t *available, int64_t *held)
{
    char a[24], t[24];
    const char *argv[4] = {rid, a, t, route};
    int64_t out[3];
    snprintf(a, sizeof a, "%" PRId64, amount);
    snprintf(t, sizeof t, "%" PRId64, ttl_ms);
    if (hot_run(h, HOT_RESERVE, account, NULL, argv, 4, out) != 0) return -1;
    *status = (int)out[0];
    *available = out[1];
    *held = out[2];
    return 0;
}

int hot_settle(hot_conn *h, int64_t account, const char *rid, int64_t charge, const char *outcome,
               int upstream_status, int *settled, int64_t *charged, int64_t *available)
{
    char c[24], st[16], acct[24];
    const char *argv[5] = {rid, c, outcome, st, acct};
    int64_t out[3];
    snprintf(c, sizeof c, "%" PRId64, charge);
    snprintf(st, sizeof st, "%d", upstream_status);
    snprintf(acct, sizeof acct, "%" PRId64, account);
    if (hot_run(h, HOT_SETTLE, account, HOT_OUTBOX, argv, 5, out) != 0) return -1;
    *settled = (int)out[0];
    *charged = out[1];
    *available = out[2];
    return 0;
}

int hot_account(hot_conn *h, int64_t account, int *found, int64_t *credited, int64_t *spent,
                int64_t *held)
{
    hot_keys k;
    const char *argv[6];
    redisReply *r;
    int64_t v[4];
    hot_keys_for(&k, account);
    argv[0] = "HMGET";
    argv[1] = k.acct;
    argv[2] = "credited";
    argv[3] = "spent";
    argv[4] = "held";
    argv[5] = "leasefree";
    r = hot_command_argv(h, 6, argv, NULL);
    if (!r) return -1;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 4) {
        freeReplyObject(r);
        return -1;
    }
    *found = r->element[0]->type == REDIS_REPLY_STRING;
    for (int i = 0; i < 4; i++)
        v[i] =
            r->element[i]->type == REDIS_REPLY_STRING ? strtoll(r->element[i]->str, NULL, 10) : 0;
    freeReplyObject(r);
    *credited = v[0];
    *spent = v[1];
    /* A gateway's lease points not promised to a call are available to the
     * account, not held by a call (lease.lua). */
    *held = v[2] - v[3];
    return 0;
}

static int hot_simple(hot_conn *h, int argc, const char **argv)
{
    redisReply *r = hot_command_argv(h, argc, argv, NULL);
    int rc;
    if (!r) return -1;
    rc = r->type == REDIS_REPLY_ERROR ? -1 : 0;
    freeReplyObject(r);
    return rc;
}

/* keypush.lua for one key: VALUE NULL writes the tombstone; MARKER (or
 * NULL) names the pass. *written gets the script's answer. */
static int hot_keypush(hot_conn *h, const char *key_hash, const char *value, const char *marker,
                       int *written)
{
    char name[96];
    const char *v = value ? value : HOT_KEY_REVOKED;
    const char *args[3] = {name, marker ? marker : v, v};
    redisReply *r;
    snprintf(name, sizeof name, HOT_KEY_PREFIX "%s", key_hash);
    r = hot_eval(h, HOT_KEYPUSH, marker ? 2 : 1, args, marker ? 3 : 2);
    if (!r) return -1;
    *written = r->type == REDIS_REPLY_INTEGER ? (int)r->integer : -1;
    freeReplyObject(r);
    return *written < 0 ? -1 : 0;
}

int hot_key_set(hot_conn *h, const char *key_hash, const char *value)
{
    int written;
    if (!value || !value[0]) return -1;
    return hot_keypush(h, key_hash, value, NULL, &written);
}

int hot_key_revoke(hot_conn *h, const char *key_hash)
{
    int written;
    return hot_keypush(h, key_hash, NULL, NULL, &written);
}

int hot_limits_push(hot_conn *h, int64_t account, int64_t seq, const char *const *pairs, int n,
                    int *result)
{
    hot_keys k;
    char sq[24];
    const char **args = malloc((size_t)(n + 3) * sizeof *args);
    redisReply *r;
    if (!args) return -1;
    hot_keys_for(&k, account);
    snprintf(sq, sizeof sq, "%" PRId64, seq);
    args[0] = k.acct;
    args[1] = k.lim;
    args[2] = sq;
    for (int i = 0; i < n; i++)
        args[3 + i] = pairs[i];
    r = hot_eval(h, HOT_LIMITS, 2, args, n + 3);
    free(args);
    if (!r) return -1;
    *result = r->type == REDIS_REPLY_INTEGER ? (int)r->integer : -1;
    freeReplyObject(r);
    return *result < 0 ? -1 : 0;
}

int hot_pass_begin(hot_conn *h, char marker[HOT_PASS_MARKER])
{
    unsigned char raw[12];
    char hex[25];
    const char *argv[5] = {"SET", marker, "1", "EX", "86400"};
    randombytes_buf(raw, sizeof raw);
    sodium_bin2hex(hex, sizeof hex, raw, sizeof raw);
    snprintf(marker, HOT_PASS_MARKER, HOT_REBUILD_PREFIX "%s", hex);
    /* Outlives any pass; expires the markers of passes that died. */
    return hot_simple(h, 5, argv);
}

int hot_pass_key(hot_conn *h, const char *marker, const char *key_hash, const char *value,
                 int *lost, int *changed)
{
    int written;
    if (hot_keypush(h, key_hash, value, marker, &written) != 0) return -1;
    *lost = written == 2;
    *changed = written == 1;
    return 0;
}

int hot_pass_end(hot_conn *h, const char *marker, int *result)
{
    unsigned char raw[8];
    char hex[17], epoch[48];
    struct timespec now;
    const char *args[3] = {marker, HOT_EPOCH, epoch};
    redisReply *r;
    randombytes_buf(raw, sizeof raw);
    sodium_bin2hex(hex, sizeof hex, raw, sizeof raw);
    clock_gettime(CLOCK_REALTIME, &now);
    snprintf(epoch, sizeof epoch, "%lld-%s", (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000,
             hex);
    r = hot_eval(h, HOT_PASSEND, 2, args, 3);
    if (!r) return -1;
    *result = r->type == REDIS_REPLY_INTEGER ? (int)r->integer : -1;
    freeReplyObject(r);
    return *result < 0 ? -1 : 0;
}

const char *hot_error(const hot_conn *h)
{
    return h->error[0] ? h->error : "no answer";
}

unsigned hot_connects(const hot_conn *h)
{
    return h->connects;
}

int hot_epoch_exists(hot_conn *h, int *exists)
{
    const char *argv[2] = {"EXISTS", HOT_EPOCH};
    redisReply *r = hot_command_argv(h, 2, argv, NULL);
    if (!r) return -1;
    if (r->type != REDIS_REPLY_INTEGER) {
        freeReplyObject(r);
        return -1;
    }
    *exists = r->integer == 1;
    freeReplyObject(r);
    return 0;
}

int hot_ping(hot_conn *h)
{
    const char *argv[1] = {"PING"};
    return hot_simple(h, 1, argv);
}
