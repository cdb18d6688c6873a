/* whdeliver.c: the webhook thread of `billing serve`. Owns sending (libcurl
 * multi: bounded concurrency, timeouts), signing each attempt, retries with
 * backoff, the balance watcher's ticks (alerts_check over every watched
 * account), retention of old events and the webhook gauges. Does not own
 * what an event or an endpoint is (webhooks.c) nor when a threshold fires
 * (alerts.c). The only file that links libcurl.
 *
 * It has its own Postgres connection and never touches Redis, the API's
 * threads or settlement: a slow or dead receiver delays nothing but its own
 * deliveries, and at most WEBHOOK_CONCURRENCY of those at once.
 *
 * At least once. A delivery is claimed in Postgres before it is sent
 * (attempts + 1, claimed_by = this process, next_attempt_at = now + the
 * attempt's timeout + a margin: a lease). A process that dies mid-attempt
 * leaves a lease that expires, and then any billing process sends it again;
 * the process that restarts under the same WEBHOOK_CONSUMER name takes its
 * own claims back at once. So a receiver can see an event twice (same
 * webhook-id: Standard Webhooks asks receivers to deduplicate on it) but
 * never zero times while it answers 2xx within WEBHOOK_RETRY_HORIZON_S.
 *
 * Redirects are not followed (a 3xx is a failure: the URL should be
 * fixed), only http and https are spoken, and the answer is read to its end
 * but only its first WH_RESPONSE_KEEP bytes are kept for the delivery log.
 * The endpoint URL is the admin's; this thread does not block private
 * addresses (an operator-set URL, not a tenant's: see README). */
#include "common/env.h"
#include "billing/events.h"
#include "billing/ledger.h"
#include "common/log.h"
#include "billing/webhooks.h"
#include "billing/workers.h"

#include <curl/curl.h>
#include <inttypes.h>
#include <jansson.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WH_RESPONSE_KEEP 256
#define WH_LEASE_MARGIN_S 30
#define WH_POLL_MS 250
#define WH_GAUGE_MS 1000
#define WH_RETENTION_MS 600000
#define WH_RETENTION_BATCH 1000

/* One attempt in flight. */
typedef struct wh_attempt {
    CURL *easy; /* NULL: the slot is free */
    struct curl_slist *headers;
    char *body;
    int64_t delivery_id;
    int attempt;
    int64_t scheduled_ms; /* the delivery's retry horizon starts here (epoch ms) */
    int64_t started_us;   /* monotonic */
    time_t started_wall;
    char response[WH_RESPONSE_KEEP + 1];
    size_t response_len;
    char error[CURL_ERROR_SIZE];
} wh_attempt;

typedef struct wh_worker {
    const billing_config *cfg;
    atomic_int *stop;
    billing_metrics *m;
    PGconn *pg;
    CURLM *multi;
    webhook_key key;
    wh_attempt *slots;
    int nslots, in_flight;
    int reclaimed; /* this consumer's claims from before the start were taken back */
    char consumer[160];
    int64_t next_watch_ms, next_gauge_ms, next_retention_ms, next_claim_ms;
} wh_worker;

static int64_t wh_now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Keeps the first WH_RESPONSE_KEEP bytes of the answer, printable ASCII
 * only (the log column is text), and reads the rest to nowhere. */
static size_t wh_write(char *data, size_t size, size_t n, void *arg)
{
    wh_attempt *a = arg;
    size_t len = size * n;
    for (size_t i = 0; i < len && a->response_len < WH_RESPONSE_KEEP; i++) {
        unsigned char ch = (unsigned char)data[i];
        a->response[a->response_len++] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
    }
    a->response[a->response_len] = '\0';
    return len;
}

static void wh_slot_free(wh_worker *w, wh_attempt *a)
{
    if (a->easy) {
        curl_multi_remove_handle(w->multi, a->easy);
        curl_easy_cleanup(a->easy);
        w->in_flight--;
    }
    curl_slist_free_all(a->headers);
    free(a->body);
    memset(a, 0, sizeof *a);
}

/* The JSON body of an event in the Standard Webhooks shape: type,
 * timestamp (when the event was written) and data. */
static char *wh_body(const char *id, const char *type, const char *created, const char *payload)
{
    json_t *data = json_loads(payload, 0, NULL), *j;
    char *s;
    if (!data) return NULL;
    j = json_pack("{s:s, s:s, s:s, s:o}", "id", id, "type", type, "timestamp", created, "data",
                  data);
    if (!j) return NULL;
    s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    return s;
}

/* Appends "NAME: VALUE" to *LIST; -1 when out of memory. */
static int wh_header(struct curl_slist **list, const char *name, const char *value)
{
    char line[256];
    struct curl_slist *n;
    snprintf(line, sizeof line, "%s: %s", name, value);
    n = curl_slist_append(*list, line);
    if (!n) return -1;
    *list = n;
    return 0;
}

/* Starts the attempt of claimed row I of R in slot A. An attempt that
 * cannot start (a secret that does not open, no memory) is finished at once
 * as a failed attempt, so it is logged and retried like any other. */
static void wh_attempt_finish(wh_worker *w, wh_attempt *a, int ok, long status, const char *error);

static void wh_attempt_start(wh_worker *w, wh_attempt *a, const PGresult *r, int i)
{
    unsigned char key[64];
    size_t keylen = 0;
    char sig[WEBHOOK_SIGNATURE_LEN], ts[24];
    const char *event_id = PQgetvalue(r, i, 2);
    int64_t account = strtoll(PQgetvalue(r, i, 3), NULL, 10);
    time_t now = time(NULL);

    memset(a, 0, sizeof *a);
    a->delivery_id = strtoll(PQgetvalue(r, i, 0), NULL, 10);
    a->attempt = atoi(PQgetvalue(r, i, 1));
    a->scheduled_ms = strtoll(PQgetvalue(r, i, 9), NULL, 10);
    a->started_us = bm_mono_us();
    a->started_wall = now;
    if (webhook_secret_open(&w->key, account, PQgetvalue(r, i, 8), key, &keylen) != 0) {
        wh_attempt_finish(w, a, 0, 0, "the endpoint's secret does not open (KEY_PEPPER changed?)");
        return;
    }
    a->body = wh_body(event_id, PQgetvalue(r, i, 4), PQgetvalue(r, i, 6), PQgetvalue(r, i, 5));
    if (a->body) webhook_sign(key, keylen, event_id, (long long)now, a->body, strlen(a->body), sig);
    sodium_memzero(key, sizeof key);
    snprintf(ts, sizeof ts, "%lld", (long long)now);
    a->easy = a->body ? curl_easy_init() : NULL;
    if (!a->easy || wh_header(&a->headers, "Content-Type", "application/json") != 0 ||
        wh_header(&a->headers, "webhook-id", event_id) != 0 ||
        wh_header(&a->headers, "webhook-timestamp", ts) != 0 ||
        wh_header(&a->headers, "webhook-signature", sig) != 0 ||
        /* No 100-continue round trip: the body is small. */
        wh_header(&a->headers, "Expect", "") != 0) {
        if (a->easy) curl_easy_cleanup(a->easy);
        a->easy = NULL;
        wh_attempt_finish(w, a, 0, 0, "out of memory");
        return;
    }
    curl_easy_setopt(a->easy, CURLOPT_URL, PQgetvalue(r, i, 7));
    curl_easy_setopt(a->easy, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(a->easy, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(a->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(a->easy, CURLOPT_TIMEOUT_MS, (long)w->cfg->webhook_timeout_ms);
    curl_easy_setopt(a->easy, CURLOPT_CONNECTTIMEOUT_MS, (long)w->cfg->webhook_connect_timeout_ms);
    curl_easy_setopt(a->easy, CURLOPT_POSTFIELDS, a->body);
    curl_easy_setopt(a->easy, CURLOPT_POSTFIELDSIZE, (long)strlen(a->body));
    curl_easy_setopt(a->easy, CURLOPT_HTTPHEADER, a->headers);
    curl_easy_setopt(a->easy, CURLOPT_USERAGENT, "pointgate-webhooks/1");
    curl_easy_setopt(a->easy, CURLOPT_WRITEFUNCTION, wh_write);
    curl_easy_setopt(a->easy, CURLOPT_WRITEDATA, a);
    curl_easy_setopt(a->easy, CURLOPT_ERRORBUFFER, a->error);
    curl_easy_setopt(a->easy, CURLOPT_PRIVATE, a);
    if (curl_multi_add_handle(w->multi, a->easy) != CURLM_OK) {
        curl_easy_cleanup(a->easy);
        a->easy = NULL;
        wh_attempt_finish(w, a, 0, 0, "could not start the request");
        return;
    }
    w->in_flight++;
}

/* The wait before attempt N+1 after N failed: base * 2^(N-1), at most max,
 * +-20% so that many deliveries failing together do not retry together. */
static int64_t wh_backoff_ms(const billing_config *cfg, int attempt)
{
    int64_t d = cfg->webhook_retry_base_ms;
    int64_t jitter;
    for (int i = 1; i < attempt && d < cfg->webhook_retry_max_ms; i++)
        d *= 2;
    if (d > cfg->webhook_retry_max_ms) d = cfg->webhook_retry_max_ms;
    jitter = d / 5;
    if (jitter > 0) d += (int64_t)randombytes_uniform((uint32_t)(2 * jitter + 1)) - jitter;
    return d;
}

/* Records the attempt and the delivery's next state in one statement. The
 * delivery row changes only if this process still holds the claim of this
 * attempt (a lease that expired was taken by another attempt, which will
 * record itself; a replay that reset the row meanwhile also wins). */
#define WH_FINISH_SQL                                                                              \
    "WITH up AS (UPDATE webhook_deliveries SET state = $2, last_status = $5::integer, "            \
    "  last_error = $6, claimed_by = NULL, "                                                       \
    "  next_attempt_at = CASE WHEN $2 = 'pending' THEN now() + make_interval(secs => $8::bigint "  \
    "    / 1000.0) ELSE next_attempt_at END, "                                                     \
    "  delivered_at = CASE WHEN $2 = 'delivered' THEN now() END, "                                 \
    "  failed_at = CASE WHEN $2 = 'failed' THEN now() END "                                        \
    "  WHERE id = $1 AND claimed_by = $9 AND attempts = $3::integer AND state = 'pending' "        \
    "  RETURNING 1) "                                                                              \
    "INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, status_code, "   \
    "  error, response, next_attempt_at) "                                                         \
    "SELECT $1, $3::integer, to_timestamp($4::bigint), $10::integer, $5::integer, $6, $7, "        \
    "  CASE WHEN $2 = 'pending' THEN now() + make_interval(secs => $8::bigint / 1000.0) END "      \
    "WHERE EXISTS (SELECT 1 FROM webhook_deliveries WHERE id = $1)"

static void wh_attempt_finish(wh_worker *w, wh_attempt *a, int ok, long status, const char *error)
{
    char ids[24], attempt[16], started[24], statuss[24], delay[24], dur[24], err[301];
    const char *state;
    const char *p[10] = {ids,
                         NULL,
                         attempt,
                         started,
                         status ? statuss : NULL,
                         NULL,
                         a->response_len ? a->response : NULL,
                         delay,
                         w->consumer,
                         dur};
    int64_t duration_us = bm_mono_us() - a->started_us, wait = 0;
    int result;
    PGresult *r;

    if (ok) {
        state = "delivered";
        result = BM_WH_DELIVERED;
    } else {
        wait = wh_backoff_ms(w->cfg, a->attempt);
        if (wh_now_ms() + wait > a->scheduled_ms + w->cfg->webhook_retry_horizon_s * 1000) {
            state = "failed";
            result = BM_WH_FAILED;
        } else {
            state = "pending";
            result = BM_WH_RETRY;
        }
    }
    if (error) {
        snprintf(err, sizeof err, "%s", error);
        p[5] = err;
    }
    p[1] = state;
    snprintf(ids, sizeof ids, "%" PRId64, a->delivery_id);
    snprintf(attempt, sizeof attempt, "%d", a->attempt);
    snprintf(started, sizeof started, "%lld", (long long)a->started_wall);
    snprintf(statuss, sizeof statuss, "%ld", status);
    snprintf(delay, sizeof delay, "%" PRId64, wait);
    snprintf(dur, sizeof dur, "%" PRId64, duration_us / 1000);
    bm_webhook_attempt(w->m, result, duration_us);
    r = w->pg ? ledger_query(w->pg, WH_FINISH_SQL, 10, p) : NULL;
    /* Not recorded (Postgres away): the claim's lease expires and the
     * delivery is sent again, which at least once allows. */
    if (!r)
        log_warn("webhook delivery %" PRId64 " attempt %d: result not recorded; it will be "
                 "retried",
                 a->delivery_id, a->attempt);
    PQclear(r);
    if (result != BM_WH_DELIVERED)
        log_info("webhook delivery %" PRId64 " attempt %d failed (%s): %s", a->delivery_id,
                 a->attempt, error ? error : "no error text", state);
    wh_slot_free(w, a);
}

/* The result of a finished transfer. */
static void wh_transfer_done(wh_worker *w, CURL *easy, CURLcode code)
{
    wh_attempt *a = NULL;
    long status = 0;
    char msg[CURL_ERROR_SIZE + 64];
    curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&a);
    if (!a) return;
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
    if (code != CURLE_OK) {
        snprintf(msg, sizeof msg, "%s", a->error[0] ? a->error : curl_easy_strerror(code));
        wh_attempt_finish(w, a, 0, status, msg);
    } else if (status >= 200 && status < 300) {
        wh_attempt_finish(w, a, 1, status, NULL);
    } else {
        snprintf(msg, sizeof msg, "the receiver answered %ld", status);
        wh_attempt_finish(w, a, 0, status, msg);
    }
}

/* Claims up to the free slots' worth of due deliveries and starts them, at
 * most WH_PER_ENDPOINT in flight per endpoint across every billing process
 * (claims whose lease runs count): one slow or dead receiver cannot take
 * every slot from the others. The window is computed over the oldest
 * WH_CLAIM_SCAN due rows only, so a large backlog costs a bounded scan. */
#define WH_PER_ENDPOINT 4
#define WH_CLAIM_SCAN 1000
#define WH_CLAIM_SQL                                                                               \
    "WITH busy AS (SELECT endpoint_id, count(*) AS n FROM webhook_deliveries "                     \
    "  WHERE state = 'pending' AND claimed_by IS NOT NULL AND next_attempt_at > now() "            \
    "  GROUP BY endpoint_id), "                                                                    \
    " due AS (SELECT id, endpoint_id, next_attempt_at FROM webhook_deliveries "                    \
    "  WHERE state = 'pending' AND next_attempt_at <= now() AND endpoint_id NOT IN "               \
    "  (SELECT endpoint_id FROM busy WHERE n >= $4) ORDER BY next_attempt_at LIMIT $5), "          \
    " pick AS (SELECT x.id FROM (SELECT due.id, due.next_attempt_at, row_number() OVER "           \
    "  (PARTITION BY due.endpoint_id ORDER BY due.next_attempt_at) + coalesce(busy.n, 0) AS k "    \
    "  FROM due LEFT JOIN busy USING (endpoint_id)) x WHERE x.k <= $4 "                            \
    "  ORDER BY x.next_attempt_at LIMIT $1), "                                                     \
    " c AS (SELECT id FROM webhook_deliveries WHERE id IN (SELECT id FROM pick) "                  \
    "  FOR UPDATE SKIP LOCKED) "                                                                   \
    "UPDATE webhook_deliveries d SET attempts = d.attempts + 1, claimed_by = $2, "                 \
    "  next_attempt_at = now() + make_interval(secs => $3::bigint) "                               \
    "FROM c, webhook_events e, webhook_endpoints w "                                               \
    "WHERE d.id = c.id AND d.state = 'pending' AND d.next_attempt_at <= now() "                    \
    "  AND e.id = d.event_id AND w.id = d.endpoint_id "                                            \
    "RETURNING d.id, d.attempts, e.id, e.account_id, e.type, e.payload::text, "                    \
    "  to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), w.url, "     \
    "  w.secret_enc, (extract(epoch FROM d.scheduled_at) * 1000)::bigint"

static void wh_claim(wh_worker *w)
{
    char lim[16], lease[24], per[16], scan[16];
    const char *p[5] = {lim, w->consumer, lease, per, scan};
    PGresult *r;
    int free_slots = w->nslots - w->in_flight, next = 0;
    if (free_slots <= 0) return;
    snprintf(lim, sizeof lim, "%d", free_slots);
    snprintf(lease, sizeof lease, "%" PRId64,
             w->cfg->webhook_timeout_ms / 1000 + 1 + WH_LEASE_MARGIN_S);
    snprintf(per, sizeof per, "%d", WH_PER_ENDPOINT);
    snprintf(scan, sizeof scan, "%d", WH_CLAIM_SCAN);
    r = ledger_query(w->pg, WH_CLAIM_SQL, 5, p);
    if (!r) return;
    for (int i = 0; i < PQntuples(r); i++) {
        while (next < w->nslots && w->slots[next].easy)
            next++;
        if (next == w->nslots) break;
        wh_attempt_start(w, &w->slots[next], r, i);
    }
    PQclear(r);
}

static void wh_gauges(wh_worker *w)
{
    PGresult *r = ledger_query(
        w->pg,
        "SELECT count(*), coalesce((extract(epoch FROM now() - min(scheduled_at)) * 1000)::bigint, "
        "0) FROM webhook_deliveries WHERE state = 'pending'",
        0, NULL);
    if (!r) return;
    if (w->m) {
        metric_set(&w->m->webhook_pending, strtoll(PQgetvalue(r, 0, 0), NULL, 10));
        metric_set(&w->m->webhook_oldest_ms, strtoll(PQgetvalue(r, 0, 1), NULL, 10));
        metric_set(&w->m->webhook_in_flight, w->in_flight);
    }
    PQclear(r);
}

/* Deletes events older than the retention with nothing pending (their
 * deliveries and attempts go with them), a batch at a time. */
static void wh_retention(wh_worker *w)
{
    char days[16], lim[16];
    const char *p[2] = {days, lim};
    PGresult *r;
    snprintf(days, sizeof days, "%" PRId64, w->cfg->webhook_retention_days);
    snprintf(lim, sizeof lim, "%d", WH_RETENTION_BATCH);
    r = ledger_query(w->pg,
                     "DELETE FROM webhook_events WHERE id IN (SELECT e.id FROM webhook_events e "
                     "WHERE e.created_at < now() - make_interval(days => $1::integer) AND NOT "
                     "EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id AND "
                     "d.state = 'pending') LIMIT $2::integer)",
                     2, p);
    if (r && atoi(PQcmdTuples(r)) > 0)
        log_info("webhooks: %s event(s) past retention deleted", PQcmdTuples(r));
    /* A full batch: more are due; the next pass comes at once. */
    if (r && atoi(PQcmdTuples(r)) == WH_RETENTION_BATCH) w->next_retention_ms = 0;
    PQclear(r);
}

/* (Re)connects, listens for new events and takes back this consumer's own
 * claims (a previous run of this process died with them in flight). */
static int wh_connect(wh_worker *w)
{
    PGresult *r;
    const char *p[1] = {w->consumer};
    if (w->pg && PQstatus(w->pg) == CONNECTION_OK) return 0;
    if (w->pg) PQfinish(w->pg);
    w->pg = ledger_connect(w->cfg->database_url);
    if (!w->pg) return -1;
    /* A half-open connection (a failover) must not hang the thread: no
     * statement outlives the claims' lease margin. */
    r = ledger_query(w->pg, "SET statement_timeout = '15s'", 0, NULL);
    if (!r) goto fail;
    PQclear(r);
    r = ledger_query(w->pg, "LISTEN " WEBHOOK_CHANNEL, 0, NULL);
    if (!r) goto fail;
    PQclear(r);
    /* Once per start only: after a reconnect, claims of this name are
     * attempts still in flight here. */
    if (w->reclaimed) return 0;
    r = ledger_query(w->pg,
                     "UPDATE webhook_deliveries SET next_attempt_at = now(), claimed_by = NULL "
                     "WHERE state = 'pending' AND claimed_by = $1",
                     1, p);
    if (!r) goto fail;
    if (atoi(PQcmdTuples(r)) > 0)
        log_info("webhooks: %s delivery(ies) claimed before a restart are due again",
                 PQcmdTuples(r));
    PQclear(r);
    w->reclaimed = 1;
    return 0;
fail:
    PQfinish(w->pg);
    w->pg = NULL;
    return -1;
}

/* One turn: timers, claims, transfers, then a wait on the transfers and the
 * notification socket of at most WH_POLL_MS. */
static void wh_turn(wh_worker *w)
{
    int64_t now = bm_mono_ms();
    int running = 0, left = 0, nfd = 0, notified = 0;
    struct curl_waitfd extra;
    CURLMsg *msg;

    if (w->pg && now >= w->next_watch_ms) {
        if (events_check_balance(w->pg, 0, NULL, NULL) != LEDGER_OK)
            log_warn("webhooks: the balance watcher's check failed; it runs again");
        w->next_watch_ms = now + w->cfg->webhook_watch_interval_ms;
    }
    if (w->pg && now >= w->next_gauge_ms) {
        wh_gauges(w);
        w->next_gauge_ms = now + WH_GAUGE_MS;
    }
    if (w->pg && now >= w->next_retention_ms) {
        w->next_retention_ms = now + WH_RETENTION_MS;
        wh_retention(w);
    }
    if (w->pg && now >= w->next_claim_ms && w->nslots > 0) {
        wh_claim(w);
        w->next_claim_ms = now + WH_POLL_MS;
    }
    curl_multi_perform(w->multi, &running);
    while ((msg = curl_multi_info_read(w->multi, &left)))
        if (msg->msg == CURLMSG_DONE) wh_transfer_done(w, msg->easy_handle, msg->data.result);
    memset(&extra, 0, sizeof extra);
    if (w->pg) {
        extra.fd = PQsocket(w->pg);
        extra.events = CURL_WAIT_POLLIN;
        nfd = extra.fd >= 0;
    }
    curl_multi_poll(w->multi, nfd ? &extra : NULL, (unsigned)nfd, WH_POLL_MS, NULL);
    if (w->pg) {
        PGnotify *n;
        if (PQconsumeInput(w->pg) == 0) {
            log_warn("webhooks: postgres connection lost; reconnecting");
            PQfinish(w->pg);
            w->pg = NULL;
            return;
        }
        while ((n = PQnotifies(w->pg))) {
            notified = 1;
            PQfreemem(n);
        }
        if (notified) w->next_claim_ms = 0;
    }
}

void *webhooks_run(void *arg)
{
    worker_args *wa = arg;
    wh_worker w;
    char host[128] = "billing";
    memset(&w, 0, sizeof w);
    w.cfg = wa->cfg;
    w.stop = wa->stop;
    w.m = wa->metrics;
    gethostname(host, sizeof host - 1);
    /* The same name after a restart, so the restart takes its claims back. */
    snprintf(w.consumer, sizeof w.consumer, "%s",
             env_str("WEBHOOK_CONSUMER", env_str("SETTLE_CONSUMER", host)));
    webhook_key_derive(&w.cfg->pepper, &w.key);
    w.nslots = (int)w.cfg->webhook_concurrency;
    w.slots = calloc((size_t)(w.nslots > 0 ? w.nslots : 1), sizeof *w.slots);
    w.multi = curl_multi_init();
    if (!w.slots || !w.multi) {
        log_error("webhooks: out of memory; no webhook will be delivered by this process");
        goto out;
    }
    curl_multi_setopt(w.multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)(w.nslots > 0 ? w.nslots : 1));
    while (!atomic_load(w.stop)) {
        bm_beat(w.m, BM_BEAT_WEBHOOKS);
        if (wh_connect(&w) != 0) {
            worker_rest(w.stop, 1000, w.m, BM_BEAT_WEBHOOKS);
            continue;
        }
        wh_turn(&w);
    }
out:
    /* Attempts in flight are abandoned: their leases expire, or this
     * consumer's next start takes them back. */
    for (int i = 0; w.slots && i < w.nslots; i++)
        if (w.slots[i].easy) wh_slot_free(&w, &w.slots[i]);
    if (w.multi) curl_multi_cleanup(w.multi);
    free(w.slots);
    if (w.pg) PQfinish(w.pg);
    sodium_memzero(&w.key, sizeof w.key);
    return NULL;
}
