/* devsim.c: the device control API simulator (bin/devsim).
 *
 * Owns: a stand-in for the IoT device control API that the gateway proxies
 * to, for the end-to-end tests, the fault tests and `make run`. It is not
 * part of the product and holds no points logic.
 *
 *   GET  /v1/devices/{id}            200, the device: id, kind, state
 *   POST /v1/devices/{id}/commands   202, {"command_id": ...}
 *   POST /v1/batch                   200, {"items": N}, X-Usage-Units: N
 *   GET  /_sim/last                  headers (lower-case) + method/path of the last request
 *   GET  /_sim/stats                 {"requests": N, "in_flight": M} (of /v1 requests)
 *   POST /_sim/reset                 zeroes the above
 *
 * Every answer outside /_sim is driven per request by headers:
 *   X-Sim-Status: S        answer status S (100..599) instead of the usual one
 *   X-Sim-Delay-Ms: D      sleep D ms (0..60000) before answering
 *   X-Sim-Usage: U         answer X-Usage-Units: U (verbatim; a gateway must cope with junk)
 *   X-Sim-Body-Bytes: N    answer a body of exactly N bytes (0..64 MiB) instead of the echo
 *   X-Sim-Drop: 1          close the connection without answering (after the delay)
 *   X-Sim-Drop-Once: T     the same, but only the first time token T (1..63 bytes) is
 *                          seen (the last 256 tokens are remembered): the next request
 *                          with T is answered, as after a lost keep-alive connection
 *   X-Sim-Framing: F       how the body is delimited: "length" (Content-Length, the
 *                          default), "chunked" (chunks of at most 997 bytes) or "close"
 *                          (no length, Connection: close, the body ends at the close)
 * A malformed control header is answered 400 {"error":"bad_sim_header"}.
 * X-Sim-Status 1xx sends that interim answer and no final one: the client
 * waits, as behind a broken upstream. 1xx, 204 and 304 carry no body.
 * Otherwise the body is JSON echoing what was received: method, path, query,
 * headers (lower-case names, repeats joined with ", "), body_length.
 * Request bodies are read up to 1 MiB; past that the answer is 413.
 *
 * Threads: libmicrohttpd runs one thread per connection, so a delayed answer
 * only blocks its own connection. Shared state (counters, last request, the
 * stopping flag) lives in one struct devsim_state behind a mutex; delays wait
 * on its condition variable so that SIGTERM/SIGINT ends them at once.
 * Signals are taken synchronously by sigwait() in main; shutdown frees
 * everything and exits 0.
 *
 * Configuration: DEVSIM_LISTEN (host:port, default 127.0.0.1:9090),
 * DEVSIM_MAX_CONNECTIONS (default 4096), DEVSIM_IDLE_TIMEOUT_S (how long an
 * idle keep-alive connection is kept, default 120), LOG_LEVEL. */
#include "common/env.h"
#include "common/log.h"

#include <jansson.h>
#include <microhttpd.h>

#include <ctype.h>
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define DEVSIM_MAX_BODY ((size_t)1 << 20)          /* request bodies kept, bytes */
#define DEVSIM_MAX_REPLY_BYTES ((int64_t)64 << 20) /* X-Sim-Body-Bytes bound */
#define DEVSIM_MAX_DELAY_MS 60000
#define DEVSIM_REPLY_BLOCK (64 * 1024)
#define DEVSIM_CONN_TIMEOUT_S 120 /* idle keep-alive; above the longest delay */
#define DEVSIM_PIECE 997          /* chunk size of unknown-length bodies: odd on purpose */
#define DEVSIM_DROP_ONCE_MAX 256  /* X-Sim-Drop-Once tokens remembered */
#define DEVSIM_TOKEN_MAX 64
#define DEVSIM_THREAD_STACK (512 * 1024)

/* Everything shared between connection threads. */
struct devsim_state {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* broadcast when stopping: wakes delayed answers */
    bool stopping;
    uint64_t requests;  /* /v1 requests since start or reset */
    uint64_t in_flight; /* of those, not yet completed */
    uint64_t commands;  /* command ids handed out; never reset, ids stay unique */
    json_t *last;       /* last request outside /_sim, or NULL */
    char drop_once[DEVSIM_DROP_ONCE_MAX][DEVSIM_TOKEN_MAX]; /* ring of X-Sim-Drop-Once tokens */
    unsigned drop_once_next;
};

/* Per request, from the first handler call to MHD's completion callback. */
struct devsim_req {
    char *body;
    size_t len;      /* bytes kept in body */
    size_t cap;      /* bytes allocated for body */
    size_t received; /* bytes received, kept or not */
    bool counted;    /* accounted in requests/in_flight */
};

enum devsim_framing { DEVSIM_LENGTH, DEVSIM_CHUNKED, DEVSIM_CLOSE };

/* The per-request control headers, parsed. */
struct devsim_ctl {
    int status;         /* 0: the endpoint's own */
    int64_t delay_ms;   /* 0: none */
    const char *usage;  /* NULL: the endpoint's own */
    int64_t body_bytes; /* -1: the JSON echo */
    bool drop;
    const char *drop_once; /* NULL: none */
    enum devsim_framing framing;
};

/* ---- small helpers ------------------------------------------------------ */

static uint32_t devsim_hash(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 16777619u;
    }
    return h;
}

/* Adds NAME: VALUE to OBJ under the lower-cased name, joining repeats with ", ". */
static void devsim_obj_add_joined(json_t *obj, const char *name, const char *value, bool lower)
{
    char key[256];
    size_t i;
    json_t *old;
    if (!value) value = "";
    for (i = 0; i < sizeof key - 1 && name[i]; i++)
        key[i] = lower ? (char)tolower((unsigned char)name[i]) : name[i];
    key[i] = '\0';
    old = json_object_get(obj, key);
    if (old && json_is_string(old)) {
        size_t n = strlen(json_string_value(old)) + 2 + strlen(value) + 1;
        char *joined = malloc(n);
        if (!joined) return;
        snprintf(joined, n, "%s, %s", json_string_value(old), value);
        json_object_set_new(obj, key, json_string(joined));
        free(joined);
        return;
    }
    json_object_set_new(obj, key, json_string(value));
}

static enum MHD_Result devsim_collect_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                             const char *value)
{
    devsim_obj_add_joined(cls, key, value, true);
    return MHD_YES;
}

static enum MHD_Result devsim_collect_arg(void *cls, enum MHD_ValueKind kind, const char *key,
                                          const char *value)
{
    devsim_obj_add_joined(cls, key, value, false);
    return MHD_YES;
}

static json_t *devsim_headers(struct MHD_Connection *conn)
{
    json_t *h = json_object();
    if (h) MHD_get_connection_values(conn, MHD_HEADER_KIND, devsim_collect_header, h);
    return h;
}

/* JSON of what was received. */
static json_t *devsim_echo(struct MHD_Connection *conn, const char *method, const char *url,
                           const struct devsim_req *req)
{
    json_t *echo = json_object();
    json_t *query = json_object();
    if (!echo || !query) {
        json_decref(echo);
        json_decref(query);
        return NULL;
    }
    MHD_get_connection_values(conn, MHD_GET_ARGUMENT_KIND, devsim_collect_arg, query);
    json_object_set_new(echo, "method", json_string(method));
    json_object_set_new(echo, "path", json_string(url));
    json_object_set_new(echo, "query", query);
    json_object_set_new(echo, "headers", devsim_headers(conn));
    json_object_set_new(echo, "body_length", json_integer((json_int_t)req->received));
    return echo;
}

/* Parses header NAME as an integer in [min, max]; 0 when absent, 1 when set, -1 when bad. */
static int devsim_header_int(struct MHD_Connection *conn, const char *name, int64_t min,
                             int64_t max, int64_t *out)
{
    const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, name);
    if (!v) return 0;
    if (env_parse_int64(v, out) != 0 || *out < min || *out > max) return -1;
    return 1;
}

/* Fills CTL from the request headers; on a bad one returns its name. */
static const char *devsim_parse_ctl(struct MHD_Connection *conn, struct devsim_ctl *ctl)
{
    int64_t v;
    const char *drop, *framing;
    int rc;

    ctl->status = 0;
    ctl->delay_ms = 0;
    ctl->body_bytes = -1;
    ctl->drop = false;
    ctl->framing = DEVSIM_LENGTH;
    ctl->usage = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Sim-Usage");

    rc = devsim_header_int(conn, "X-Sim-Status", 100, 599, &v);
    if (rc < 0) return "X-Sim-Status";
    if (rc > 0) ctl->status = (int)v;
    rc = devsim_header_int(conn, "X-Sim-Delay-Ms", 0, DEVSIM_MAX_DELAY_MS, &v);
    if (rc < 0) return "X-Sim-Delay-Ms";
    if (rc > 0) ctl->delay_ms = v;
    rc = devsim_header_int(conn, "X-Sim-Body-Bytes", 0, DEVSIM_MAX_REPLY_BYTES, &v);
    if (rc < 0) return "X-Sim-Body-Bytes";
    if (rc > 0) ctl->body_bytes = v;
    drop = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Sim-Drop");
    if (drop) {
        if (strcmp(drop, "1") == 0)
            ctl->drop = true;
        else if (strcmp(drop, "0") != 0)
            return "X-Sim-Drop";
    }
    ctl->drop_once = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Sim-Drop-Once");
    if (ctl->drop_once && (ctl->drop_once[0] == '\0' || strlen(ctl->drop_once) >= DEVSIM_TOKEN_MAX))
        return "X-Sim-Drop-Once";
    framing = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Sim-Framing");
    if (framing) {
        if (strcmp(framing, "chunked") == 0)
            ctl->framing = DEVSIM_CHUNKED;
        else if (strcmp(framing, "close") == 0)
            ctl->framing = DEVSIM_CLOSE;
        else if (strcmp(framing, "length") != 0)
            return "X-Sim-Framing";
    }
    return NULL;
}

/* Sleeps MS milliseconds, or less if the simulator is stopping. */
static void devsim_delay(struct devsim_state *st, int64_t ms)
{
    struct timespec deadline;
    if (ms <= 0) return;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += (time_t)(ms / 1000);
    deadline.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&st->mu);
    while (!st->stopping) {
        if (pthread_cond_timedwait(&st->cv, &st->mu, &deadline) == ETIMEDOUT) break;
    }
    pthread_mutex_unlock(&st->mu);
}

/* Body generator for X-Sim-Body-Bytes; CLS is the total size. */
static ssize_t devsim_fill(void *cls, uint64_t pos, char *buf, size_t max)
{
    uint64_t total = (uint64_t)(uintptr_t)cls;
    size_t n;
    if (pos >= total) return MHD_CONTENT_READER_END_OF_STREAM;
    n = (total - pos < (uint64_t)max) ? (size_t)(total - pos) : max;
    memset(buf, 'x', n);
    return (ssize_t)n;
}

/* A body of unknown length for chunked or close-delimited framing: TEXT
 * (owned) or, when NULL, TOTAL bytes of 'x'. */
struct devsim_piece {
    char *text;
    uint64_t total;
};

static ssize_t devsim_piece_fill(void *cls, uint64_t pos, char *buf, size_t max)
{
    const struct devsim_piece *pc = cls;
    size_t n;
    if (pos >= pc->total) return MHD_CONTENT_READER_END_OF_STREAM;
    n = (pc->total - pos < (uint64_t)max) ? (size_t)(pc->total - pos) : max;
    if (n > DEVSIM_PIECE) n = DEVSIM_PIECE; /* one callback, one chunk */
    if (pc->text)
        memcpy(buf, pc->text + pos, n);
    else
        memset(buf, 'x', n);
    return (ssize_t)n;
}

static void devsim_piece_free(void *cls)
{
    struct devsim_piece *pc = cls;
    free(pc->text);
    free(pc);
}

/* LEN bytes of TEXT (stolen) or of 'x' when TEXT is NULL, as an unknown-
 * length response: MHD sends it chunked to an HTTP/1.1 client, or
 * close-delimited with FRAMING close. NULL on failure (TEXT freed). */
static struct MHD_Response *devsim_unknown_length(char *text, uint64_t len,
                                                  enum devsim_framing framing)
{
    struct devsim_piece *pc = malloc(sizeof *pc);
    struct MHD_Response *resp = NULL;
    if (pc) {
        pc->text = text;
        pc->total = len;
        resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, DEVSIM_PIECE, devsim_piece_fill,
                                                 pc, devsim_piece_free);
    }
    if (!resp) {
        free(text);
        free(pc);
        return NULL;
    }
    if (framing == DEVSIM_CLOSE &&
        MHD_set_response_options(resp, MHD_RF_HTTP_VERSION_1_0_ONLY, MHD_RO_END) != MHD_YES) {
        MHD_destroy_response(resp);
        return NULL;
    }
    return resp;
}

/* Queues STATUS with BODY (JSON, stolen; may be NULL for an empty body) and
 * the optional usage header, in FRAMING. Returns MHD's verdict. */
static enum MHD_Result devsim_send_json(struct MHD_Connection *conn, unsigned status, json_t *body,
                                        const char *usage, enum devsim_framing framing)
{
    char *text = NULL;
    size_t len = 0;
    struct MHD_Response *resp;
    enum MHD_Result ret;
    /* 1xx, 204 and 304 carry no body (RFC 9110 15.2, 15.3.5, 15.4.5). */
    bool bodiless = status < 200 || status == 204 || status == 304;

    if (body && !bodiless) {
        text = json_dumps(body, JSON_COMPACT);
        if (text) len = strlen(text);
    }
    json_decref(body);
    if (framing != DEVSIM_LENGTH && !bodiless) {
        resp = devsim_unknown_length(text, len, framing);
        if (!resp) return MHD_NO;
    } else {
        resp = MHD_create_response_from_buffer(
            len, text ? text : (char *)"", text ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
        if (!resp) {
            free(text);
            return MHD_NO;
        }
    }
    if (len) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    if (usage && MHD_add_response_header(resp, "X-Usage-Units", usage) != MHD_YES)
        log_warn("X-Sim-Usage value not usable as a header; ignored");
    ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result devsim_send_bytes(struct MHD_Connection *conn, unsigned status, int64_t n,
                                         const char *usage, enum devsim_framing framing)
{
    struct MHD_Response *resp;
    enum MHD_Result ret;
    if (framing != DEVSIM_LENGTH)
        resp = devsim_unknown_length(NULL, (uint64_t)n, framing);
    else if (n == 0)
        resp = MHD_create_response_from_buffer(0, (char *)"", MHD_RESPMEM_PERSISTENT);
    else
        resp = MHD_create_response_from_callback((uint64_t)n, DEVSIM_REPLY_BLOCK, devsim_fill,
                                                 (void *)(uintptr_t)n, NULL);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/octet-stream");
    if (usage) MHD_add_response_header(resp, "X-Usage-Units", usage);
    ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static json_t *devsim_error(const char *code, const char *message)
{
    return json_pack("{s:s, s:s}", "error", code, "message", message);
}

/* ---- /_sim control endpoints --------------------------------------------- */

static enum MHD_Result devsim_control(struct devsim_state *st, struct MHD_Connection *conn,
                                      const char *method, const char *url)
{
    json_t *body = NULL;
    bool get = strcmp(method, "GET") == 0;
    bool post = strcmp(method, "POST") == 0;

    if (strcmp(url, "/_sim/last") == 0 && get) {
        pthread_mutex_lock(&st->mu);
        body = st->last ? json_deep_copy(st->last) : json_object();
        pthread_mutex_unlock(&st->mu);
    } else if (strcmp(url, "/_sim/stats") == 0 && get) {
        pthread_mutex_lock(&st->mu);
        body = json_pack("{s:I, s:I}", "requests", (json_int_t)st->requests, "in_flight",
                         (json_int_t)st->in_flight);
        pthread_mutex_unlock(&st->mu);
    } else if (strcmp(url, "/_sim/reset") == 0 && post) {
        pthread_mutex_lock(&st->mu);
        st->requests = 0;
        json_decref(st->last);
        st->last = NULL;
        pthread_mutex_unlock(&st->mu);
        body = json_pack("{s:I}", "requests", (json_int_t)0);
    } else if (strcmp(url, "/_sim/last") == 0 || strcmp(url, "/_sim/stats") == 0 ||
               strcmp(url, "/_sim/reset") == 0) {
        return devsim_send_json(conn, MHD_HTTP_METHOD_NOT_ALLOWED,
                                devsim_error("method_not_allowed", "wrong method"), NULL,
                                DEVSIM_LENGTH);
    } else {
        return devsim_send_json(conn, MHD_HTTP_NOT_FOUND,
                                devsim_error("not_found", "no such control endpoint"), NULL,
                                DEVSIM_LENGTH);
    }
    if (!body) return MHD_NO;
    return devsim_send_json(conn, MHD_HTTP_OK, body, NULL, DEVSIM_LENGTH);
}

/* ---- the device API ------------------------------------------------------- */

/* Copies the single path segment after PREFIX into ID; returns the rest of the
 * URL after it, or NULL if URL does not start with PREFIX + a segment. */
static const char *devsim_segment(const char *url, const char *prefix, char *id, size_t idlen)
{
    size_t plen = strlen(prefix), n;
    const char *end;
    if (strncmp(url, prefix, plen) != 0) return NULL;
    url += plen;
    end = strchr(url, '/');
    n = end ? (size_t)(end - url) : strlen(url);
    if (n == 0 || n >= idlen) return NULL;
    memcpy(id, url, n);
    id[n] = '\0';
    return url + n;
}

static void devsim_device(json_t *out, const char *id)
{
    static const char *const kinds[] = {"thermometer", "lock", "camera"};
    uint32_t h = devsim_hash(id);
    json_t *state;
    switch (h % 3) {
    case 0:
        state =
            json_pack("{s:f, s:b}", "celsius", 15.0 + (double)(h / 3 % 150) / 10.0, "online", 1);
        break;
    case 1:
        state =
            json_pack("{s:b, s:i}", "locked", (int)(h / 3 % 2), "battery", 20 + (int)(h / 7 % 81));
        break;
    default:
        state = json_pack("{s:b, s:s}", "recording", (int)(h / 3 % 2), "resolution", "1080p");
        break;
    }
    json_object_set_new(out, "id", json_string(id));
    json_object_set_new(out, "kind", json_string(kinds[h % 3]));
    json_object_set_new(out, "state", state);
}

/* Fills OUT (the echo) with the endpoint's answer; returns the usual status
 * and sets *usage_units for /v1/batch. */
static unsigned devsim_route(struct devsim_state *st, json_t *out, const char *method,
                             const char *url, const struct devsim_req *req, long long *usage_units)
{
    char id[256];
    const char *rest;
    bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
    bool post = strcmp(method, "POST") == 0;

    *usage_units = -1;
    if (strcmp(url, "/v1/batch") == 0) {
        json_t *doc, *items;
        if (!post) goto not_allowed;
        doc = req->len ? json_loadb(req->body, req->len, 0, NULL) : NULL;
        items = json_object_get(doc, "items");
        if (!json_is_array(items)) {
            json_decref(doc);
            json_object_update_missing_new(
                out,
                devsim_error("bad_request", "body must be a JSON object with an array \"items\""));
            return MHD_HTTP_BAD_REQUEST;
        }
        *usage_units = (long long)json_array_size(items);
        json_object_set_new(out, "items", json_integer((json_int_t)*usage_units));
        json_decref(doc);
        return MHD_HTTP_OK;
    }
    rest = devsim_segment(url, "/v1/devices/", id, sizeof id);
    if (rest && *rest == '\0') {
        if (!get) goto not_allowed;
        devsim_device(out, id);
        return MHD_HTTP_OK;
    }
    if (rest && strcmp(rest, "/commands") == 0) {
        uint64_t n;
        char cmd[32];
        if (!post) goto not_allowed;
        pthread_mutex_lock(&st->mu);
        n = ++st->commands;
        pthread_mutex_unlock(&st->mu);
        snprintf(cmd, sizeof cmd, "cmd-%08llu", (unsigned long long)n);
        json_object_set_new(out, "command_id", json_string(cmd));
        json_object_set_new(out, "device_id", json_string(id));
        json_object_set_new(out, "status", json_string("accepted"));
        return MHD_HTTP_ACCEPTED;
    }
    json_object_update_missing_new(out, devsim_error("not_found", "no such endpoint"));
    return MHD_HTTP_NOT_FOUND;

not_allowed:
    json_object_update_missing_new(out, devsim_error("method_not_allowed", "wrong method"));
    return MHD_HTTP_METHOD_NOT_ALLOWED;
}

/* True the first time TOKEN is seen among the last DEVSIM_DROP_ONCE_MAX. */
static bool devsim_first_time(struct devsim_state *st, const char *token)
{
    bool first = true;
    pthread_mutex_lock(&st->mu);
    for (unsigned i = 0; i < DEVSIM_DROP_ONCE_MAX && first; i++)
        if (strcmp(st->drop_once[i], token) == 0) first = false;
    if (first) {
        snprintf(st->drop_once[st->drop_once_next], DEVSIM_TOKEN_MAX, "%s", token);
        st->drop_once_next = (st->drop_once_next + 1) % DEVSIM_DROP_ONCE_MAX;
    }
    pthread_mutex_unlock(&st->mu);
    return first;
}

/* Records the request as the last one seen (for /_sim/last). */
static void devsim_remember(struct devsim_state *st, struct MHD_Connection *conn,
                            const char *method, const char *url, const struct devsim_req *req)
{
    json_t *last = devsim_headers(conn);
    if (!last) return;
    json_object_set_new(last, "method", json_string(method));
    json_object_set_new(last, "path", json_string(url));
    json_object_set_new(last, "body_length", json_integer((json_int_t)req->received));
    pthread_mutex_lock(&st->mu);
    json_decref(st->last);
    st->last = last;
    pthread_mutex_unlock(&st->mu);
}

static enum MHD_Result devsim_answer(struct devsim_state *st, struct MHD_Connection *conn,
                                     const char *method, const char *url, struct devsim_req *req)
{
    struct devsim_ctl ctl;
    const char *bad;
    json_t *out;
    unsigned status;
    long long units;
    char units_text[32];
    const char *usage;

    devsim_remember(st, conn, method, url, req);
    bad = devsim_parse_ctl(conn, &ctl);
    if (bad) {
        char msg[128];
        snprintf(msg, sizeof msg, "%s is malformed or out of range", bad);
        return devsim_send_json(conn, MHD_HTTP_BAD_REQUEST, devsim_error("bad_sim_header", msg),
                                NULL, DEVSIM_LENGTH);
    }
    devsim_delay(st, ctl.delay_ms);
    if (ctl.drop || (ctl.drop_once && devsim_first_time(st, ctl.drop_once))) {
        log_debug("%s %s: dropping the connection as asked", method, url);
        return MHD_NO;
    }
    out = devsim_echo(conn, method, url, req);
    if (!out) return MHD_NO;
    if (req->received > DEVSIM_MAX_BODY) {
        json_object_update_missing_new(out, devsim_error("payload_too_large", "body over 1 MiB"));
        status = MHD_HTTP_CONTENT_TOO_LARGE;
        units = -1;
    } else {
        status = devsim_route(st, out, method, url, req, &units);
    }
    if (ctl.status) status = (unsigned)ctl.status;
    usage = ctl.usage;
    if (!usage && units >= 0) {
        snprintf(units_text, sizeof units_text, "%lld", units);
        usage = units_text;
    }
    if (ctl.body_bytes >= 0) {
        json_decref(out);
        return devsim_send_bytes(conn, status, ctl.body_bytes, usage, ctl.framing);
    }
    return devsim_send_json(conn, status, out, usage, ctl.framing);
}

static enum MHD_Result devsim_handler(void *cls, struct MHD_Connection *conn, const char *url,
                                      const char *method, const char *version,
                                      const char *upload_data, size_t *upload_data_size,
                                      void **con_cls)
{
    struct devsim_state *st = cls;
    struct devsim_req *req = *con_cls;
    bool control = strncmp(url, "/_sim/", 6) == 0;

    if (!req) { /* headers are in; the body (if any) follows */
        req = calloc(1, sizeof *req);
        if (!req) return MHD_NO;
        *con_cls = req;
        if (strcmp(url, "/v1") == 0 || strncmp(url, "/v1/", 4) == 0) {
            pthread_mutex_lock(&st->mu);
            st->requests++;
            st->in_flight++;
            pthread_mutex_unlock(&st->mu);
            req->counted = true;
        }
        return MHD_YES;
    }
    if (*upload_data_size) {
        size_t n = *upload_data_size;
        req->received += n;
        if (req->received <= DEVSIM_MAX_BODY) { /* past the bound: counted, dropped */
            if (req->len + n > req->cap) {
                size_t cap = req->cap ? req->cap : 4096;
                char *grown;
                while (cap < req->len + n)
                    cap *= 2;
                if (cap > DEVSIM_MAX_BODY) cap = DEVSIM_MAX_BODY;
                grown = realloc(req->body, cap);
                if (!grown) return MHD_NO;
                req->body = grown;
                req->cap = cap;
            }
            memcpy(req->body + req->len, upload_data, n);
            req->len += n;
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    log_debug("%s %s (%zu body bytes)", method, url, req->received);
    if (control) return devsim_control(st, conn, method, url);
    return devsim_answer(st, conn, method, url, req);
}

static void devsim_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                             enum MHD_RequestTerminationCode toe)
{
    struct devsim_state *st = cls;
    struct devsim_req *req = *con_cls;
    if (!req) return;
    if (req->counted) {
        pthread_mutex_lock(&st->mu);
        st->in_flight--;
        pthread_mutex_unlock(&st->mu);
    }
    free(req->body);
    free(req);
    *con_cls = NULL;
}

static void devsim_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    size_t n;
    vsnprintf(msg, sizeof msg, fmt, ap);
    n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    log_debug("mhd: %s", msg);
}

/* ---- start and stop -------------------------------------------------------- */

int main(void)
{
    struct devsim_state st = {.stopping = false};
    const char *listen_at = env_str("DEVSIM_LISTEN", "127.0.0.1:9090");
    char host[256], portstr[16];
    int port = 0, sig = 0, rc = 1, gai;
    int64_t max_conns = 0, idle_s = 0;
    struct addrinfo hints = {0}, *ai = NULL;
    struct MHD_Daemon *d = NULL;
    sigset_t sigs;
    bool sync_ok = false;
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL_INTERNAL_THREAD |
                     MHD_USE_ERROR_LOG | MHD_USE_ITC;

    log_init("devsim");
    if (pthread_mutex_init(&st.mu, NULL) != 0) return 1;
    {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        sync_ok = pthread_cond_init(&st.cv, &ca) == 0;
        pthread_condattr_destroy(&ca);
    }
    if (!sync_ok) goto out;

    if (env_int64("DEVSIM_MAX_CONNECTIONS", 4096, 1, 1000000, &max_conns) != 0) goto out;
    if (env_int64("DEVSIM_IDLE_TIMEOUT_S", DEVSIM_CONN_TIMEOUT_S, 1, 3600, &idle_s) != 0) goto out;
    if (env_parse_hostport(listen_at, host, sizeof host, &port) != 0) {
        log_error("DEVSIM_LISTEN=%s: expected host:port", listen_at);
        goto out;
    }
    if (host[0] == '[' && host[strlen(host) - 1] == ']') { /* [::1]:9090 */
        memmove(host, host + 1, strlen(host) - 2);
        host[strlen(host) - 2] = '\0';
    }
    snprintf(portstr, sizeof portstr, "%d", port);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    gai = getaddrinfo(host, portstr, &hints, &ai);
    if (gai != 0 || !ai) {
        log_error("DEVSIM_LISTEN=%s: %s", listen_at, gai_strerror(gai));
        goto out;
    }
    if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;

    /* Connection threads inherit this mask: only main takes the signals. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    d = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, devsim_handler, &st,
                         MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_NOTIFY_COMPLETED,
                         devsim_completed, &st, MHD_OPTION_CONNECTION_LIMIT, (unsigned)max_conns,
                         MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)idle_s,
                         MHD_OPTION_THREAD_STACK_SIZE, (size_t)DEVSIM_THREAD_STACK,
                         MHD_OPTION_EXTERNAL_LOGGER, devsim_mhd_log, NULL, MHD_OPTION_END);
    if (!d) {
        log_error("cannot listen on %s: %s", listen_at, strerror(errno));
        goto out;
    }
    log_info("listening on %s", listen_at);

    while (sigwait(&sigs, &sig) != 0) {
    }
    log_info("signal %d: stopping", sig);
    pthread_mutex_lock(&st.mu);
    st.stopping = true;
    pthread_cond_broadcast(&st.cv);
    pthread_mutex_unlock(&st.mu);
    rc = 0;

out:
    if (d) MHD_stop_daemon(d); /* joins every connection thread */
    if (ai) freeaddrinfo(ai);
    json_decref(st.last);
    if (sync_ok) pthread_cond_destroy(&st.cv);
    pthread_mutex_destroy(&st.mu);
    return rc;
}
