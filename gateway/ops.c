/* ops.c: the ops listener (ops.h): libevent's evhttp on a base of its own,
 * in its own thread. A scrape or a probe never runs on a worker's loop: it
 * reads the workers' metric blocks (metrics.h) and nothing else of theirs. */
#include "gateway/ops.h"

#include "common/log.h"
#include "gateway/metrics.h"
#include "gateway/worker.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Probes and scrapers send small requests and expect quick answers. */
#define OPS_MAX_HEADERS 8192
#define OPS_MAX_BODY 1024
#define OPS_TIMEOUT_S 10
#define OPS_STOP_POLL_MS 100

struct gw_ops {
    const worker *workers;
    int n;
    struct event_base *base;
    struct evhttp *http;
    struct event *poll;
    pthread_t thread;
    int started;
    atomic_int draining;
    atomic_int stop;
};

/* What keeps the gateway from taking traffic, as a JSON array's items into
 * OUT ("" when ready). */
static void ops_reasons(const gw_ops *o, char *out, size_t outlen)
{
    int redis = 0, stopping = 0;
    size_t len = 0;
    out[0] = 0;
    for (int i = 0; i < o->n; i++) {
        if (metric_gauge_get(&o->workers[i].m.redis_ready) == 0) redis = 1;
        if (metric_gauge_get(&o->workers[i].m.stopping) != 0) stopping = 1;
    }
    if (atomic_load(&o->draining) || stopping)
        len += (size_t)snprintf(out + len, outlen - len, "%s\"draining\"", len ? "," : "");
    if (redis && len < outlen)
        len += (size_t)snprintf(out + len, outlen - len, "%s\"redis\"", len ? "," : "");
}

/* Workers whose loop has not turned for GW_OPS_STALL_MS, as JSON items. */
static int ops_stalled(const gw_ops *o, char *out, size_t outlen)
{
    int64_t now = (int64_t)worker_now_ms();
    size_t len = 0;
    int n = 0;
    out[0] = 0;
    for (int i = 0; i < o->n && len < outlen; i++) {
        if (now - metric_gauge_get(&o->workers[i].m.heartbeat_ms) <= GW_OPS_STALL_MS) continue;
        len += (size_t)snprintf(out + len, outlen - len, "%s\"worker %d\"", n ? "," : "", i);
        n++;
    }
    return n;
}

static void ops_send(struct evhttp_request *req, int code, const char *type, const char *body,
                     size_t len)
{
    struct evbuffer *b = evbuffer_new();
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", type);
    evhttp_add_header(h, "Cache-Control", "no-store");
    if (!b || evbuffer_add(b, body, len) != 0) {
        if (b) evbuffer_free(b);
        evhttp_send_error(req, 500, NULL);
        return;
    }
    evhttp_send_reply(req, code, code == 200 ? "OK" : NULL, b);
    evbuffer_free(b);
}

static void ops_json(struct evhttp_request *req, int code, const char *body)
{
    ops_send(req, code, "application/json", body, strlen(body));
}

static void ops_metrics(gw_ops *o, struct evhttp_request *req)
{
    char reasons[128];
    promtext p;
    ops_reasons(o, reasons, sizeof reasons);
    promtext_init(&p);
    gw_metrics_render(&p, o->workers, o->n, atomic_load(&o->draining), reasons[0] == 0);
    if (promtext_done(&p) != 0)
        ops_json(req, 503, "{\"error\":{\"code\":\"out_of_memory\"}}");
    else
        ops_send(req, 200, "text/plain; version=0.0.4; charset=utf-8", p.b.p, p.b.len);
    promtext_free(&p);
}

static void ops_on_request(struct evhttp_request *req, void *arg)
{
    gw_ops *o = arg;
    const char *path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    char buf[512], items[256];

    if (!path) path = "";
    if (strcmp(path, "/metrics") != 0 && strcmp(path, "/healthz") != 0 &&
        strcmp(path, "/readyz") != 0) {
        ops_json(req, 404,
                 "{\"error\":{\"code\":\"not_found\",\"message\":\"ops paths: /metrics, "
                 "/healthz, /readyz\"}}");
        return;
    }
    if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_HEAD) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, HEAD");
        ops_json(req, 405, "{\"error\":{\"code\":\"method_not_allowed\"}}");
        return;
    }
    if (strcmp(path, "/metrics") == 0) {
        ops_metrics(o, req);
    } else if (strcmp(path, "/healthz") == 0) {
        if (ops_stalled(o, items, sizeof items) == 0) {
            ops_json(req, 200, "{\"status\":\"ok\"}");
        } else {
            snprintf(buf, sizeof buf, "{\"status\":\"stalled\",\"stalled\":[%s]}", items);
            ops_json(req, 503, buf);
        }
    } else {
        ops_reasons(o, items, sizeof items);
        if (items[0] == 0) {
            ops_json(req, 200, "{\"status\":\"ready\"}");
        } else {
            snprintf(buf, sizeof buf, "{\"status\":\"not_ready\",\"reasons\":[%s]}", items);
            ops_json(req, 503, buf);
        }
    }
}

/* The stop flag, polled: the base is not made thread-safe for a cross-thread
 * loopbreak (evthread), and a tenth of a second is quick enough at exit. */
static void ops_on_poll(evutil_socket_t fd, short what, void *arg)
{
    gw_ops *o = arg;
    if (atomic_load(&o->stop)) event_base_loopbreak(o->base);
}

static void *ops_main(void *arg)
{
    gw_ops *o = arg;
    event_base_dispatch(o->base);
    return NULL;
}

int gw_ops_new(const gw_config *cfg, const worker *workers, int n, gw_ops **out)
{
    gw_ops *o = calloc(1, sizeof *o);
    struct timeval tv = {0, OPS_STOP_POLL_MS * 1000};
    *out = NULL;
    if (!o) goto oom;
    o->workers = workers;
    o->n = n;
    atomic_init(&o->draining, 0);
    atomic_init(&o->stop, 0);
    o->base = event_base_new();
    if (!o->base) goto oom;
    o->http = evhttp_new(o->base);
    o->poll = event_new(o->base, -1, EV_PERSIST, ops_on_poll, o);
    if (!o->http || !o->poll || event_add(o->poll, &tv) != 0) goto oom;
    evhttp_set_max_headers_size(o->http, OPS_MAX_HEADERS);
    evhttp_set_max_body_size(o->http, OPS_MAX_BODY);
    evhttp_set_timeout(o->http, OPS_TIMEOUT_S);
    evhttp_set_allowed_methods(o->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD | EVHTTP_REQ_POST |
                                            EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE);
    evhttp_set_gencb(o->http, ops_on_request, o);
    if (evhttp_bind_socket(o->http, cfg->ops_host, (ev_uint16_t)cfg->ops_port) != 0) {
        log_error("GATEWAY_OPS_LISTEN %s:%d: cannot listen (in use, or not an address of this "
                  "host)",
                  cfg->ops_host, cfg->ops_port);
        gw_ops_free(o);
        return -1;
    }
    *out = o;
    return 0;
oom:
    log_error("ops listener: out of memory");
    gw_ops_free(o);
    return -1;
}

int gw_ops_start(gw_ops *o)
{
    if (pthread_create(&o->thread, NULL, ops_main, o) != 0) {
        log_error("ops listener: cannot start its thread");
        return -1;
    }
    o->started = 1;
    return 0;
}

void gw_ops_set_draining(gw_ops *o)
{
    if (o) atomic_store(&o->draining, 1);
}

void gw_ops_free(gw_ops *o)
{
    if (!o) return;
    if (o->started) {
        atomic_store(&o->stop, 1);
        pthread_join(o->thread, NULL);
    }
    if (o->http) evhttp_free(o->http);
    if (o->poll) event_free(o->poll);
    if (o->base) event_base_free(o->base);
    free(o);
}
