/* proxy.c: libcurl multi on libevent (see proxy.h).
 *
 * The classic "multi socket" integration: curl tells us which sockets to
 * watch (CURLMOPT_SOCKETFUNCTION) and when to wake it (TIMERFUNCTION); we
 * translate that into libevent events and call curl_multi_socket_action.
 * Socket watchers are kept on a list so that teardown can free any that
 * curl forgets to remove.
 *
 * No epoll_ctl churn per call: curl REMOVEs a connection's socket when a
 * transfer ends and adds it again for the next one on the same keep-alive
 * connection. For sockets curl opened through our OPENSOCKETFUNCTION (so
 * their closing comes through our CLOSESOCKETFUNCTION, and a reused fd
 * number is never mistaken for the old socket) the watcher stays registered
 * while the connection idles in the pool ("parked"); the next add with the
 * same events costs nothing. A parked socket that turns readable (the
 * upstream closed it) is unregistered; curl finds it dead on reuse. */
#include "gateway/proxy.h"

#include "billing/log.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define PROXY_FREE_EASY_MAX 128
#define PROXY_HEADERS_MAX (64 * 1024)
#define PROXY_MAXCONNECTS 1024

typedef struct proxy_sock {
    struct proxy_sock *prev, *next;
    struct event *ev;
    proxy *p;
    curl_socket_t fd;
    short kind; /* events registered, 0 when not registered */
    int owned;  /* opened by our opensocket callback: closed by ours */
    int parked; /* curl removed it; connection idle in the pool */
} proxy_sock;

struct proxy {
    struct event_base *base;
    CURLM *multi;
    struct event *timer;
    proxy_sock *socks;
    proxy_sock **by_fd; /* owned sockets by fd number */
    int by_fd_cap;
    proxy_call *running;
    CURL *free_easy[PROXY_FREE_EASY_MAX];
    int nfree;
    int64_t max_body;
};

int proxy_hop_by_hop(const char *n)
{
    static const char *const hop[] = {"connection",          "keep-alive", "proxy-authenticate",
                                      "proxy-authorization", "te",         "trailer",
                                      "transfer-encoding",   "upgrade",    "proxy-connection"};
    for (size_t i = 0; i < sizeof hop / sizeof hop[0]; i++)
        if (strcasecmp(n, hop[i]) == 0) return 1;
    return 0;
}

static void proxy_check_done(proxy *p)
{
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(p->multi, &left))) {
        proxy_call *c = NULL;
        CURLcode res;
        if (m->msg != CURLMSG_DONE) continue;
        res = m->data.result;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&c);
        if (!c) continue;
        curl_easy_getinfo(m->easy_handle, CURLINFO_RESPONSE_CODE, &c->status);
        if (res == CURLE_OK)
            c->result = PROXY_OK;
        else if (c->too_large || res == CURLE_FILESIZE_EXCEEDED)
            c->result = PROXY_TOO_LARGE;
        else if (res == CURLE_OPERATION_TIMEDOUT)
            c->result = PROXY_TIMEOUT;
        else
            c->result = PROXY_UNAVAILABLE;
        if (res != CURLE_OK) log_debug("upstream: %s", curl_easy_strerror(res));
        /* Detach first: the callback may start new calls or free C. */
        proxy_cancel(c);
        c->done(c->arg, c);
    }
}

static void proxy_on_event(evutil_socket_t fd, short what, void *arg)
{
    proxy_sock *s = arg;
    proxy *p = s->p;
    int running;
    int action;
    if (s->parked) {
        /* Idle pooled connection readable: closed or junk. Stop watching
         * (level-triggered, it would fire again); curl checks on reuse. */
        event_del(s->ev);
        s->kind = 0;
        return;
    }
    action = ((what & EV_READ) ? CURL_CSELECT_IN : 0) | ((what & EV_WRITE) ? CURL_CSELECT_OUT : 0);
    /* S may be freed inside socket_action (CURL_POLL_REMOVE): not used after. */
    curl_multi_socket_action(p->multi, fd, action, &running);
    proxy_check_done(p);
}

static void proxy_on_timer(evutil_socket_t fd, short what, void *arg)
{
    proxy *p = arg;
    int running;
    curl_multi_socket_action(p->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    proxy_check_done(p);
}

static void proxy_sock_free(proxy *p, proxy_sock *s)
{
    if (s->owned && s->fd < p->by_fd_cap && p->by_fd[s->fd] == s) p->by_fd[s->fd] = NULL;
    if (s->prev)
        s->prev->next = s->next;
    else
        p->socks = s->next;
    if (s->next) s->next->prev = s->prev;
    event_free(s->ev);
    free(s);
}

static proxy_sock *proxy_sock_new(proxy *p, curl_socket_t fd)
{
    proxy_sock *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->p = p;
    s->fd = fd;
    s->ev = event_new(p->base, fd, EV_READ, proxy_on_event, s);
    if (!s->ev) {
        free(s);
        return NULL;
    }
    s->next = p->socks;
    if (p->socks) p->socks->prev = s;
    p->socks = s;
    return s;
}

static proxy_sock *proxy_sock_owned(proxy *p, curl_socket_t fd)
{
    return fd >= 0 && fd < p->by_fd_cap ? p->by_fd[fd] : NULL;
}

static int proxy_socket_cb(CURL *e, curl_socket_t fd, int what, void *userp, void *sockp)
{
    proxy *p = userp;
    proxy_sock *s = sockp ? sockp : proxy_sock_owned(p, fd);
    short kind = EV_PERSIST;

    if (what == CURL_POLL_REMOVE) {
        if (!s) return 0;
        if (s->owned) {
            /* Keep a read watcher registered while pooled: see the top. */
            s->parked = 1;
            if (s->kind != (EV_READ | EV_PERSIST) && s->kind) {
                event_del(s->ev);
                s->kind = 0;
            }
        } else {
            proxy_sock_free(p, s);
        }
        return 0;
    }
    if (what & CURL_POLL_IN) kind |= EV_READ;
    if (what & CURL_POLL_OUT) kind |= EV_WRITE;
    if (!s && !(s = proxy_sock_new(p, fd))) return -1;
    if (!sockp) curl_multi_assign(p->multi, fd, s);
    s->parked = 0;
    if (s->kind == kind) return 0;
    if (s->kind) event_del(s->ev);
    s->kind = 0;
    event_assign(s->ev, p->base, fd, kind, proxy_on_event, s);
    if (event_add(s->ev, NULL) != 0) return -1;
    s->kind = kind;
    return 0;
}

static curl_socket_t proxy_open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *a)
{
    proxy *p = clientp;
    proxy_sock *s;
    curl_socket_t fd = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
    if (fd < 0 || purpose != CURLSOCKTYPE_IPCXN) return fd;
    if (fd >= p->by_fd_cap) {
        int cap = p->by_fd_cap ? p->by_fd_cap : 64;
        proxy_sock **nb;
        while (cap <= fd)
            cap *= 2;
        nb = realloc(p->by_fd, (size_t)cap * sizeof *nb);
        if (!nb) return fd; /* not owned: watched the plain way */
        memset(nb + p->by_fd_cap, 0, (size_t)(cap - p->by_fd_cap) * sizeof *nb);
        p->by_fd = nb;
        p->by_fd_cap = cap;
    }
    s = proxy_sock_new(p, fd);
    if (!s) return fd;
    s->owned = 1;
    s->parked = 1; /* not watched until curl asks */
    p->by_fd[fd] = s;
    return fd;
}

static int proxy_close_socket(void *clientp, curl_socket_t fd)
{
    proxy *p = clientp;
    proxy_sock *s = proxy_sock_owned(p, fd);
    if (s) {
        if (s->kind) event_del(s->ev);
        proxy_sock_free(p, s);
    }
    return close(fd);
}

static int proxy_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    proxy *p = userp;
    if (timeout_ms < 0) {
        evtimer_del(p->timer);
    } else {
        struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
        evtimer_add(p->timer, &tv);
    }
    return 0;
}

int proxy_new(struct event_base *base, int64_t max_body, proxy **out)
{
    proxy *p = calloc(1, sizeof *p);
    if (!p) return -1;
    p->base = base;
    p->max_body = max_body;
    p->multi = curl_multi_init();
    p->timer = evtimer_new(base, proxy_on_timer, p);
    if (!p->multi || !p->timer) {
        proxy_free(p);
        return -1;
    }
    curl_multi_setopt(p->multi, CURLMOPT_SOCKETFUNCTION, proxy_socket_cb);
    curl_multi_setopt(p->multi, CURLMOPT_SOCKETDATA, p);
    curl_multi_setopt(p->multi, CURLMOPT_TIMERFUNCTION, proxy_timer_cb);
    curl_multi_setopt(p->multi, CURLMOPT_TIMERDATA, p);
    /* The keep-alive pool: big enough that steady concurrency reuses. */
    curl_multi_setopt(p->multi, CURLMOPT_MAXCONNECTS, (long)PROXY_MAXCONNECTS);
    *out = p;
    return 0;
}

void proxy_free(proxy *p)
{
    if (!p) return;
    /* Running calls belong to requests that are being torn down. */
    while (p->running)
        proxy_cancel(p->running);
    for (int i = 0; i < p->nfree; i++)
        curl_easy_cleanup(p->free_easy[i]);
    if (p->multi) curl_multi_cleanup(p->multi);
    while (p->socks)
        proxy_sock_free(p, p->socks);
    if (p->timer) event_free(p->timer);
    free(p->by_fd);
    free(p);
}

static size_t proxy_on_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    proxy_call *c = userdata;
    size_t n = size * nmemb;
    if (c->body_len + n > (size_t)c->p->max_body) {
        c->too_large = 1;
        return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
    }
    if (c->body_len + n > c->body_cap) {
        size_t cap = c->body_cap ? c->body_cap : 4096;
        char *nb;
        while (cap < c->body_len + n)
            cap *= 2;
        if (cap > (size_t)c->p->max_body) cap = (size_t)c->p->max_body;
        nb = realloc(c->body, cap);
        if (!nb) return 0;
        c->body = nb;
        c->body_cap = cap;
    }
    memcpy(c->body + c->body_len, ptr, n);
    c->body_len += n;
    return n;
}

static int proxy_skip_response_header(const char *name)
{
    /* MHD writes its own framing and Date; the gateway writes the billing
     * headers itself, so an upstream cannot spoof them. */
    return proxy_hop_by_hop(name) || strcasecmp(name, "content-length") == 0 ||
           strcasecmp(name, "date") == 0 || strcasecmp(name, "x-request-id") == 0 ||
           strcasecmp(name, "x-points-charged") == 0 || strcasecmp(name, "x-points-remaining") == 0;
}

static size_t proxy_on_header(char *buf, size_t size, size_t nitems, void *userdata)
{
    proxy_call *c = userdata;
    size_t n = size * nitems;
    size_t nl, vs, ve;
    const char *colon;

    if (n >= 5 && memcmp(buf, "HTTP/", 5) == 0) {
        c->hdrs_len = 0; /* a new response (after 1xx): start over */
        return n;
    }
    colon = memchr(buf, ':', n);
    if (!colon) return n; /* blank line or junk */
    nl = (size_t)(colon - buf);
    vs = nl + 1;
    while (vs < n && (buf[vs] == ' ' || buf[vs] == '\t'))
        vs++;
    ve = n;
    while (ve > vs && (buf[ve - 1] == '\r' || buf[ve - 1] == '\n' || buf[ve - 1] == ' '))
        ve--;
    if (nl == 0) return n;
    if (c->hdrs_len + nl + (ve - vs) + 2 > PROXY_HEADERS_MAX) {
        c->too_large = 1;
        return 0;
    }
    if (c->hdrs_len + nl + (ve - vs) + 2 > c->hdrs_cap) {
        size_t cap = c->hdrs_cap ? c->hdrs_cap * 2 : 1024;
        char *nb;
        while (cap < c->hdrs_len + nl + (ve - vs) + 2)
            cap *= 2;
        nb = realloc(c->hdrs, cap);
        if (!nb) return 0;
        c->hdrs = nb;
        c->hdrs_cap = cap;
    }
    memcpy(c->hdrs + c->hdrs_len, buf, nl);
    c->hdrs[c->hdrs_len + nl] = '\0';
    if (proxy_skip_response_header(c->hdrs + c->hdrs_len)) return n;
    c->hdrs_len += nl + 1;
    memcpy(c->hdrs + c->hdrs_len, buf + vs, ve - vs);
    c->hdrs_len += ve - vs;
    c->hdrs[c->hdrs_len++] = '\0';
    return n;
}

size_t proxy_header_next(const proxy_call *c, size_t off, const char **name, const char **value)
{
    if (off >= c->hdrs_len) return 0;
    *name = c->hdrs + off;
    off += strlen(*name) + 1;
    *value = c->hdrs + off;
    off += strlen(*value) + 1;
    return off;
}

/* Options that are the same for every call: set once per easy handle. */
static CURL *proxy_easy_new(proxy *p)
{
    CURL *e = curl_easy_init();
    if (!e) return NULL;
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PATH_AS_IS, 1L);
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, proxy_on_body);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, proxy_on_header);
    curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)p->max_body);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, proxy_open_socket);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, p);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, proxy_close_socket);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETDATA, p);
    return e;
}

int proxy_start(proxy *p, proxy_call *c, const char *url, const char *method, const char *body,
                size_t body_len, int64_t timeout_ms, proxy_done_cb done, void *arg)
{
    CURL *e = p->nfree > 0 ? p->free_easy[--p->nfree] : proxy_easy_new(p);
    if (!e) return -1;
    c->p = p;
    c->easy = e;
    c->done = done;
    c->arg = arg;
    /* A reused handle keeps the previous call's options: every per-call
     * option is set here, method-related ones explicitly reset. */
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)c);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)timeout_ms);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, c->req_headers);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, c);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, c);
    if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, NULL);
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else if (strcmp(method, "GET") == 0 && body_len == 0) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L); /* also NOBODY 0, no upload */
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, NULL);
    } else {
        if (body_len > 0 || strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0 ||
            strcmp(method, "PATCH") == 0) {
            curl_easy_setopt(e, CURLOPT_NOBODY, 0L);
            curl_easy_setopt(e, CURLOPT_POSTFIELDS, body ? body : "");
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
        } else {
            curl_easy_setopt(e, CURLOPT_HTTPGET, 1L); /* no body from a previous call */
        }
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, strcmp(method, "POST") != 0 ? method : NULL);
    }
    if (curl_multi_add_handle(p->multi, e) != CURLM_OK) {
        curl_easy_cleanup(e);
        c->easy = NULL;
        return -1;
    }
    c->prev = NULL;
    c->next = p->running;
    if (p->running) p->running->prev = c;
    p->running = c;
    return 0;
}

void proxy_cancel(proxy_call *c)
{
    proxy *p = c->p;
    CURL *e = c->easy;
    if (!e) return;
    c->easy = NULL;
    if (c->prev)
        c->prev->next = c->next;
    else
        p->running = c->next;
    if (c->next) c->next->prev = c->prev;
    c->prev = c->next = NULL;
    curl_multi_remove_handle(p->multi, e);
    /* Reuse the handle as it is (no curl_easy_reset: proxy_start sets every
     * per-call option); drop what points into the finished call. */
    if (p->nfree < PROXY_FREE_EASY_MAX) {
        curl_easy_setopt(e, CURLOPT_PRIVATE, NULL);
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, NULL);
        curl_easy_setopt(e, CURLOPT_WRITEDATA, NULL);
        curl_easy_setopt(e, CURLOPT_HEADERDATA, NULL);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, NULL);
        p->free_easy[p->nfree++] = e;
    } else {
        curl_easy_cleanup(e);
    }
}

void proxy_call_clear(proxy_call *c)
{
    if (c->easy) proxy_cancel(c);
    curl_slist_free_all(c->req_headers);
    c->req_headers = NULL;
    free(c->hdrs);
    c->hdrs = NULL;
    c->hdrs_len = c->hdrs_cap = 0;
    free(c->body);
    c->body = NULL;
    c->body_len = c->body_cap = 0;
}
