/* server_conn.c: one client connection of the HTTP/1.1 server (see
 * server.h, server_int.h): its states and timeout lists, reading and
 * framing its requests, handing them to request.c, writing the answers,
 * closing. Does not own the listening socket, accepting, the timeout
 * sweep or setup and teardown: server.c does, and calls in here to make,
 * time out and close connections.
 *
 * Built for the fewest system calls per call: one recv for the request,
 * one send (or writev) for the answer, and no epoll_ctl in the steady
 * state. The client socket's read event (EV_READ|EV_PERSIST, level-
 * triggered) stays armed for the whole life of the connection, also while
 * a request is in flight: that is how a client that goes away is noticed
 * (request_gone) without a second watcher. A wake-up does one recv, not a
 * loop until EAGAIN: level triggering calls again if more is there. EV_WRITE
 * is armed only after a partial write.
 *
 * A connection is in one state at a time:
 *
 *   IDLE --byte--> HEAD --head--> BODY --body--> BUSY --answer--> WRITE
 *     ^                 \--(no body)-----------/                    |
 *     +--------------- written, keep-alive ------------------------+
 *                                   written, close: closed or LINGER
 *
 * A body not all here with its head is read only once request.c has
 * checked the key and held the price (request_early, BUSY with reads off
 * and only a close watched, then server_want_body: BODY). A body has one
 * deadline in all, not renewed by progress (GATEWAY_BODY_TIMEOUT_MS, 408).
 *
 * Pipelined requests are answered one at a time, in order: bytes past the
 * current request wait in the input buffer, which is never moved while a
 * request exists (request.c keeps pointers into its head), so reading stops
 * when that buffer is full and resumes after the answer. That rule is why
 * the input buffer is grown by hand and not a struct buf: it may grow only
 * before a request exists, up to the head bound, and gets its final size
 * (head + SERVER_ROOM) once, when the head is complete.
 *
 * Each state with a deadline puts the connection on a list ordered by the
 * time it entered it (server.c's sweep walks them). */
#include "gateway/server_int.h"

#include "gateway/request.h"
#include "gateway/worker.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

static int server_after_reply(server_conn *c);
static int server_fail(server_conn *c, unsigned status, const char *code, const char *msg);
static int server_read_body(server_conn *c);
static int server_body_begin(server_conn *c);

/* ---- lists and states ------------------------------------------------ */

static void server_unlink(server_conn *c)
{
    TAILQ_REMOVE(&c->s->lists[c->list], c, link);
}

/* Moves C to the end of LIST (also when already in it: progress). */
static void server_list(server_conn *c, int list)
{
    server_unlink(c);
    c->list = list;
    c->since_ms = list == L_NONE ? 0 : worker_now_ms();
    TAILQ_INSERT_TAIL(&c->s->lists[list], c, link);
}

static void server_set_state(server_conn *c, enum server_state st)
{
    if (c->state == CS_WRITE) c->s->nwriting--;
    if (st == CS_WRITE) c->s->nwriting++;
    c->state = st;
}

static void server_read_on(server_conn *c)
{
    if (c->watching) {
        event_del(&c->cev);
        c->watching = 0;
    }
    if (c->reading || c->eof) return;
    if (event_add(&c->rev, NULL) != 0) {
        /* Without its read event the connection cannot go on. */
        log_warn("client connection: cannot watch it; closing");
        c->eof = 1;
        return;
    }
    c->reading = 1;
}

static void server_read_off(server_conn *c)
{
    if (c->watching) {
        event_del(&c->cev);
        c->watching = 0;
    }
    if (!c->reading) return;
    event_del(&c->rev);
    c->reading = 0;
}

/* Stops reading while the buffer is full of pipelined bytes, but keeps
 * watching for the client's close (EPOLLRDHUP), so that a client that
 * leaves while its call is in flight is still noticed at once and pays
 * nothing. A reset without a FIN is not reported this way (libevent maps
 * it to read/write readiness); it is noticed at the answer. */
static void server_read_pause(server_conn *c)
{
    server_read_off(c);
    if (c->s->early_close && !c->eof && event_add(&c->cev, NULL) == 0) c->watching = 1;
}

/* ---- closing --------------------------------------------------------- */

void server_close(server_conn *c)
{
    server *s = c->s;
    if (c->r) {
        request_discard(c->r);
        c->r = NULL;
    }
    server_set_state(c, CS_IDLE);
    /* Also takes the read event off the active queue (event_active). */
    event_del(&c->rev);
    event_del(&c->wev);
    event_del(&c->cev);
    close(c->fd);
    server_unlink(c);
    s->nconns--;
    metric_gauge_add(&s->w->m.connections, -1);
    free(c->wbody);
    free(c->in);
    buf_free(&c->body);
    buf_free(&c->out);
    free(c);
}

/* Closes C after an answer. A client that may still be sending (a body we
 * did not read, bytes past the answered request) would get a reset from a
 * plain close, which can destroy the answer before it reads it; so writes
 * are shut down and its bytes read and dropped until it closes too, or
 * SERVER_LINGER_MS. 0: C is gone now. */
static int server_end(server_conn *c)
{
    int unread = c->body_unread || c->in_len > c->head_len + c->skip;
    if (c->eof || !unread || shutdown(c->fd, SHUT_WR) != 0) {
        server_close(c);
        return 0;
    }
    server_set_state(c, CS_LINGER);
    server_list(c, L_LINGER);
    server_read_on(c);
    if (c->eof) {
        server_close(c);
        return 0;
    }
    return 1;
}

/* ---- answers --------------------------------------------------------- */

/* Reason phrases of the statuses the gateway and upstreams produce
 * (sorted); others get "Unknown", which clients ignore anyway. */
static const struct server_reason {
    unsigned code;
    const char *text;
} server_reasons[] = {{100, "Continue"},
                      {101, "Switching Protocols"},
                      {102, "Processing"},
                      {103, "Early Hints"},
                      {200, "OK"},
                      {201, "Created"},
                      {202, "Accepted"},
                      {203, "Non-Authoritative Information"},
                      {204, "No Content"},
                      {205, "Reset Content"},
                      {206, "Partial Content"},
                      {207, "Multi-Status"},
                      {208, "Already Reported"},
                      {226, "IM Used"},
                      {300, "Multiple Choices"},
                      {301, "Moved Permanently"},
                      {302, "Found"},
                      {303, "See Other"},
                      {304, "Not Modified"},
                      {305, "Use Proxy"},
                      {307, "Temporary Redirect"},
                      {308, "Permanent Redirect"},
                      {400, "Bad Request"},
                      {401, "Unauthorized"},
                      {402, "Payment Required"},
                      {403, "Forbidden"},
                      {404, "Not Found"},
                      {405, "Method Not Allowed"},
                      {406, "Not Acceptable"},
                      {407, "Proxy Authentication Required"},
                      {408, "Request Timeout"},
                      {409, "Conflict"},
                      {410, "Gone"},
                      {411, "Length Required"},
                      {412, "Precondition Failed"},
                      {413, "Content Too Large"},
                      {414, "URI Too Long"},
                      {415, "Unsupported Media Type"},
                      {416, "Range Not Satisfiable"},
                      {417, "Expectation Failed"},
                      {418, "I'm a teapot"},
                      {421, "Misdirected Request"},
                      {422, "Unprocessable Content"},
                      {423, "Locked"},
                      {424, "Failed Dependency"},
                      {425, "Too Early"},
                      {426, "Upgrade Required"},
                      {428, "Precondition Required"},
                      {429, "Too Many Requests"},
                      {431, "Request Header Fields Too Large"},
                      {451, "Unavailable For Legal Reasons"},
                      {500, "Internal Server Error"},
                      {501, "Not Implemented"},
                      {502, "Bad Gateway"},
                      {503, "Service Unavailable"},
                      {504, "Gateway Timeout"},
                      {505, "HTTP Version Not Supported"},
                      {506, "Variant Also Negotiates"},
                      {507, "Insufficient Storage"},
                      {508, "Loop Detected"},
                      {510, "Not Extended"},
                      {511, "Network Authentication Required"}};

static const char *server_reason(unsigned status)
{
    size_t lo = 0, hi = sizeof server_reasons / sizeof server_reasons[0];
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (server_reasons[mid].code == status) return server_reasons[mid].text;
        if (server_reasons[mid].code < status)
            lo = mid + 1;
        else
            hi = mid;
    }
    return "Unknown";
}

static void server_out(server_conn *c, const char *data, size_t n)
{
    if (c->reply_failed) return;
    if (buf_append(&c->out, data, n) != BUF_OK) c->reply_failed = 1;
}

#define SERVER_OUT_LIT(c, lit) server_out((c), (lit), sizeof(lit) - 1)

/* The Date header's value, rebuilt once a second (a vDSO clock read per
 * answer, no system call). */
static void server_date(server *s)
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    if (ts.tv_sec == s->date_s && s->date_len) return;
    gmtime_r(&ts.tv_sec, &tm);
    s->date_len = strftime(s->date, sizeof s->date, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    s->date_s = ts.tv_sec;
}

void server_reply_begin(server_conn *c, unsigned status)
{
    char line[96];
    int n;
    server_date(c->s);
    buf_reset(&c->out);
    c->out_sent = 0;
    c->reply_failed = 0;
    c->reply_length = -1;
    c->status = status;
    gw_metrics_answer(&c->s->w->m, status);
    n = snprintf(line, sizeof line, "HTTP/1.1 %03u %s\r\nDate: ", status, server_reason(status));
    server_out(c, line, (size_t)n);
    server_out(c, c->s->date, c->s->date_len);
    SERVER_OUT_LIT(c, "\r\n");
}

void server_reply_header(server_conn *c, const char *name, const char *value)
{
    server_out(c, name, strlen(name));
    SERVER_OUT_LIT(c, ": ");
    server_out(c, value, strlen(value));
    SERVER_OUT_LIT(c, "\r\n");
}

void server_reply_length(server_conn *c, int64_t len)
{
    c->reply_length = len;
}

void server_reply_send(server_conn *c, char *body, size_t len, int take)
{
    server *s = c->s;
    /* RFC 9110 6.4.1: 1xx, 204 and 304 have no content; 1xx and 204 no
     * Content-Length either, and 304 is sent without one too (it would
     * have to be the GET answer's, which we do not know). */
    int bodiless = c->status < 200 || c->status == 204 || c->status == 304;
    int send_body = !bodiless && !c->head_req && len > 0;
    char num[48];
    int n;

    c->close_after = !c->req.keep_alive || s->stopping || c->body_unread || c->eof;
    if (!bodiless) {
        /* HEAD: the length a GET would get, and no body. */
        int64_t cl = c->head_req && c->reply_length >= 0 ? c->reply_length : (int64_t)len;
        n = snprintf(num, sizeof num, "Content-Length: %lld\r\n", (long long)cl);
        server_out(c, num, (size_t)n);
    }
    if (c->close_after)
        SERVER_OUT_LIT(c, "Connection: close\r\n");
    else if (c->req.minor == 0)
        SERVER_OUT_LIT(c, "Connection: keep-alive\r\n"); /* HTTP/1.0 closes unless told */
    SERVER_OUT_LIT(c, "\r\n");
    if (send_body && (!take || len <= SERVER_COPY_BODY_MAX)) {
        server_out(c, body, len);
        send_body = 0;
    }
    if (send_body) {
        c->wbody = body; /* writev'd behind the head, freed when written */
        c->wbody_len = len;
    } else if (take) {
        free(body);
    }
    c->r = NULL; /* request.c is done with C */
    c->replied = 1;
    if (c->in_cb) return; /* the server's caller goes on from here */
    if (server_after_reply(c) && c->state == CS_IDLE && c->in_len > 0) {
        /* Pipelined bytes: parsed from the loop, not inside request.c's
         * call stack. EV_TIMEOUT marks "process, do not read". */
        event_active(&c->rev, EV_TIMEOUT, 1);
    }
}

void server_want_body(server_conn *c)
{
    c->want_body = 1;
    /* From the loop, not inside request.c's call stack; EV_TIMEOUT marks
     * "process, do not read" (the read event need not be added for that). */
    if (!c->in_cb) event_active(&c->rev, EV_TIMEOUT, 1);
}

/* The protocol's own answers (request.c never saw the request): a JSON
 * error, then the connection ends, since what follows in the stream cannot
 * be trusted. 0: C is gone. */
static int server_fail(server_conn *c, unsigned status, const char *code, const char *msg)
{
    char buf[256];
    int n = snprintf(buf, sizeof buf, "{\"error\":\"%s\",\"message\":\"%s\"}", code, msg);
    if (c->r) {
        request_discard(c->r);
        c->r = NULL;
    }
    c->body_unread = 1;
    server_reply_begin(c, status);
    SERVER_OUT_LIT(c, "Content-Type: application/json\r\n");
    c->in_cb++;
    server_reply_send(c, buf, (size_t)n, 0);
    c->in_cb--;
    return server_after_reply(c);
}

/* The answer is written: ready for the next request, or closed. */
static int server_answer_done(server_conn *c)
{
    size_t used = c->head_len + c->skip;
    free(c->wbody);
    c->wbody = NULL;
    c->wbody_len = c->wbody_sent = 0;
    buf_reset(&c->out);
    c->out_sent = 0;
    if (c->close_after || c->eof) return server_end(c);
    /* Drop the answered request; what follows is the next one's. */
    if (c->in_len > used) memmove(c->in, c->in + used, c->in_len - used);
    c->in_len -= used;
    c->head_len = c->skip = c->scan = 0;
    buf_reset(&c->body);
    c->body_need = 0;
    c->body_unread = c->chunked = c->head_req = 0;
    if (c->body.cap > SERVER_KEEP_BODY_CAP) buf_free(&c->body);
    server_set_state(c, CS_IDLE);
    server_list(c, L_IDLE);
    server_read_on(c);
    if (c->eof) {
        server_close(c);
        return 0;
    }
    return 1;
}

/* Writes what is left of the answer: head and body in one call. 0: C is
 * gone. */
static int server_flush(server_conn *c)
{
    for (;;) {
        struct iovec iov[2];
        int niov = 0;
        ssize_t n;
        size_t head_left = c->out.len - c->out_sent, body_left = c->wbody_len - c->wbody_sent;
        if (head_left) {
            iov[niov].iov_base = c->out.p + c->out_sent;
            iov[niov++].iov_len = head_left;
        }
        if (body_left) {
            iov[niov].iov_base = c->wbody + c->wbody_sent;
            iov[niov++].iov_len = body_left;
        }
        if (niov == 0) return server_answer_done(c);
        if (niov == 1)
            n = send(c->fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL);
        else
            n = writev(c->fd, iov, niov);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            server_close(c); /* reset or broken pipe: nobody to answer */
            return 0;
        }
        metric_add(&c->s->w->m.sent_bytes, (uint64_t)n);
        if ((size_t)n >= head_left) {
            c->out_sent = c->out.len;
            c->wbody_sent += (size_t)n - head_left;
        } else {
            c->out_sent += (size_t)n;
        }
        /* Short: the socket is full; another try now would fail. */
        if (c->out_sent < c->out.len || c->wbody_sent < c->wbody_len) break;
    }
    /* Partial write: wait until the socket drains, within the I/O timeout. */
    server_list(c, L_IO);
    if (event_add(&c->wev, NULL) != 0) {
        server_close(c);
        return 0;
    }
    return 1;
}

static int server_after_reply(server_conn *c)
{
    c->replied = 0;
    if (c->gone || c->reply_failed) {
        if (c->reply_failed) log_warn("client connection: cannot build an answer; closing");
        server_close(c);
        return 0;
    }
    server_set_state(c, CS_WRITE);
    server_list(c, L_NONE);
    return server_flush(c);
}

static void server_on_write(evutil_socket_t fd, short what, void *arg)
{
    server_conn *c = arg;
    if (server_flush(c) && c->state == CS_IDLE && c->in_len > 0)
        event_active(&c->rev, EV_TIMEOUT, 1);
}

/* ---- requests -------------------------------------------------------- */

/* The body is in: request.c goes on. 0: C is gone. */
static int server_dispatch(server_conn *c)
{
    c->body_unread = 0;
    server_set_state(c, CS_BUSY);
    server_list(c, L_NONE);
    c->in_cb++;
    request_body_done(c->r);
    c->in_cb--;
    return c->replied ? server_after_reply(c) : 1;
}

/* The body is 408 past its deadline: from the tick, or when it completes
 * late (between two ticks). The request (and a hold it took) is let go,
 * cost 0. 0: C is gone. */
int server_body_timeout(server_conn *c, uint64_t now)
{
    server *s = c->s;
    if (log_limit_ok(&s->log, now, SERVER_LOG_PER_SEC))
        log_info("client connection: request body not complete within %llu ms; 408",
                 (unsigned long long)s->timeout_ms[L_BODY]);
    return server_fail(c, 408, "request_timeout", "request body not complete in time");
}

/* The whole body is here: on to request.c, unless it came past its
 * deadline. The tick notices a late body only up to a tick later (up to a
 * second): without this check such a body would still be proxied, and the
 * call would start that much later than its hold's deadline allows for
 * (request.c sizes it for the body deadline, the route timeout and
 * HOLD_GRACE_MS). 0: C is gone. */
static int server_body_complete(server_conn *c)
{
    uint64_t now = worker_now_ms();
    if (now - c->since_ms >= c->s->timeout_ms[L_BODY]) return server_body_timeout(c, now);
    return server_dispatch(c);
}

/* Takes the body bytes that are in the input buffer. 0: C is gone. */
static int server_read_body(server_conn *c)
{
    size_t off = c->head_len;
    int done = 0;
    if (!c->chunked) {
        size_t n = c->in_len - off;
        if (n > c->body_need - c->body.len) n = c->body_need - c->body.len;
        memcpy(c->body.p + c->body.len, c->in + off, n);
        c->body.len += n;
        off += n;
        done = c->body.len == c->body_need;
    } else {
        for (;;) {
            http1_event ev;
            size_t used = 0;
            enum http1_ev e = http1_next(&c->bp, c->in + off, c->in_len - off, &used, &ev);
            off += used;
            if (e == HTTP1_BODY) {
                /* The bound was checked by the framing: a refusal is the
                 * allocator's. */
                if (buf_append(&c->body, ev.data, ev.len) != BUF_OK)
                    return server_fail(c, 500, "internal", "out of memory");
                continue;
            }
            if (e == HTTP1_TOO_LARGE)
                return server_fail(c, 413, "request_too_large", "request body too large");
            if (e == HTTP1_MALFORMED)
                return server_fail(c, 400, "bad_request", "malformed chunked body");
            done = e == HTTP1_DONE;
            break;
        }
    }
    /* Consumed bytes go; the head stays where it is. */
    if (off > c->head_len) {
        memmove(c->in + c->head_len, c->in + off, c->in_len - off);
        c->in_len -= off - c->head_len;
    }
    /* No deadline renewal on progress: a body has one deadline in all
     * (L_BODY), so a trickle cannot hold a connection (and a hold) forever. */
    if (done) return server_body_complete(c);
    return 1;
}

/* Reads C's body: 100 Continue when the client waits for it, then the
 * bytes, within the body deadline (GATEWAY_BODY_TIMEOUT_MS, counted from
 * here, not renewed by progress; past it 408). 0: C is gone. */
static int server_body_begin(server_conn *c)
{
    server *s = c->s;
    c->want_body = 0;
    buf_reset(&c->body);
    if (c->chunked) {
        /* Trailers are skipped, within half the room past the head: a
         * line never has to wait for space the buffer cannot give. */
        http1_init_body(&c->bp, HTTP1_CHUNKED, 0, SERVER_ROOM / 2, (uint64_t)s->cfg->max_body);
    } else {
        c->body_need = (size_t)c->req.content_length;
        /* Refused past max_body before: a refusal is the allocator's. */
        if (buf_reserve_exact(&c->body, c->body_need) != BUF_OK)
            return server_fail(c, 500, "internal", "out of memory");
    }
    if (c->req.expect_continue && c->in_len == c->head_len) {
        /* The client waits for this before it sends the body. The previous
         * answer has been handed to the kernel whole, but a client that
         * does not read may have left no room: then it is skipped (a client
         * waits for a 100 only so long, RFC 9110 10.1.1, then sends the
         * body anyway); only a part of it sent breaks the stream. */
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        ssize_t n = send(c->fd, cont, sizeof cont - 1, MSG_NOSIGNAL);
        if (n != (ssize_t)(sizeof cont - 1) &&
            !(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))) {
            server_close(c);
            return 0;
        }
    }
    /* An answer before the body is complete ends the connection. */
    c->body_unread = 1;
    server_set_state(c, CS_BODY);
    server_list(c, L_BODY);
    server_read_on(c);
    if (c->eof) {
        server_close(c);
        return 0;
    }
    return server_read_body(c);
}

/* A complete head at [0, END): parse it and hand it to request.c. 0: C is
 * gone. */
static int server_start_request(server_conn *c, size_t end)
{
    server *s = c->s;
    int status, has_body, buffered;
    gw_request *r;

    c->head_len = end;
    c->scan = 0;
    c->head_req = 0;
    c->req.fields = c->fields;
    c->req.max_fields = SERVER_MAX_FIELDS;
    status = http1req_parse(c->in, end, &c->req);
    if (status != 0) return server_fail(c, (unsigned)status, c->req.error_code, c->req.error);
    c->head_req = strcmp(c->in + c->req.method, "HEAD") == 0;
    /* Refused from the length alone: no 100 Continue, the body is not read. */
    if (c->req.content_length > s->cfg->max_body)
        return server_fail(c, 413, "request_too_large", "request body too large");
    /* From here on request.c may keep pointers into the head, so the buffer
     * gets its final size now: room for SERVER_ROOM bytes past the head (a
     * body's chunks and trailers pass through it). Bytes already queued
     * behind the head (pipelined) count as that room: growing by them would
     * let a client that keeps the buffer full grow it without end. */
    if (c->in_cap < c->head_len + SERVER_ROOM) {
        char *nb = realloc(c->in, c->head_len + SERVER_ROOM);
        if (!nb) return server_fail(c, 500, "internal", "out of memory");
        c->in = nb;
        c->in_cap = c->head_len + SERVER_ROOM;
    }
    c->chunked = c->req.chunked;
    has_body = c->chunked || c->req.content_length > 0;
    /* Should request.c answer from the head alone, a body already here in
     * full is skipped and the connection kept; otherwise the connection
     * ends after that answer (decided before the answer is built). */
    buffered = !c->chunked && c->in_len - c->head_len >= (size_t)c->req.content_length;
    c->body_unread = has_body && !buffered;
    c->in_cb++;
    r = request_head(s->w, c);
    c->in_cb--;
    if (c->replied) {
        if (has_body && buffered) c->skip = (size_t)c->req.content_length;
        return server_after_reply(c);
    }
    if (!r) return server_fail(c, 500, "internal", "out of memory");
    c->r = r;
    if (!has_body) {
        c->body_unread = 0;
        return server_dispatch(c);
    }
    if (buffered) {
        c->body_unread = 0;
        return server_body_begin(c);
    }
    /* The body is still to come: the key and the reserve first, while the
     * socket is watched only for a close (no body byte is read, nor the
     * body buffer sized); an answer now closes the connection (body_unread). */
    server_set_state(c, CS_BUSY);
    server_list(c, L_NONE);
    server_read_pause(c);
    c->in_cb++;
    request_early(r);
    c->in_cb--;
    if (c->replied) return server_after_reply(c);
    if (c->want_body) return server_body_begin(c);
    return 1;
}

/* Parses what the input buffer holds, as far as the state allows. 0: C is
 * gone. */
static int server_process(server_conn *c)
{
    for (int started = 0;;) {
        long end;
        switch (c->state) {
        case CS_IDLE:
            if (c->in_len == 0) return 1;
            if (++started > SERVER_BURST) {
                /* More pipelined requests: after the others' turn. */
                event_active(&c->rev, EV_TIMEOUT, 1);
                return 1;
            }
            /* The first byte of a request: its head has a deadline. */
            server_set_state(c, CS_HEAD);
            server_list(c, L_HEAD);
            /* fall through */
        case CS_HEAD:
            end = http1req_head_end(c->in, c->in_len, SERVER_HEAD_MAX, &c->scan);
            if (end == 0) return 1;
            if (end < 0) return server_fail(c, 431, "header_too_large", "request head too large");
            if (!server_start_request(c, (size_t)end)) return 0;
            break;
        case CS_BODY:
            if (c->in_len == c->head_len) return 1;
            if (!server_read_body(c)) return 0;
            if (c->state == CS_BODY) return 1;
            break;
        default:
            return 1;
        }
    }
}

/* The client closed (or reset) its side. 0: C is gone. */
static int server_on_eof(server_conn *c)
{
    c->eof = 1;
    server_read_off(c);
    switch (c->state) {
    case CS_BUSY:
        /* Gone while its call is in flight: a half-close counts too (it
         * cannot be told from a close here). request.c drops a call not yet
         * written to the upstream (hold released) and lets one written run
         * to its answer, which settles it; either answer is dropped, and C
         * stays (closed for I/O, counted in MAX_CONNECTIONS) until then. */
        c->gone = 1;
        c->in_cb++;
        request_gone(c->r);
        c->in_cb--;
        if (c->replied) {
            server_close(c);
            return 0;
        }
        return 1;
    case CS_WRITE:
        return 1; /* finish writing, then close */
    default:
        server_close(c); /* idle, partial head or body (request discarded), lingering */
        return 0;
    }
}

static void server_on_read(evutil_socket_t fd, short what, void *arg)
{
    server_conn *c = arg;
    char *dst;
    size_t room;
    ssize_t n;

    if (what & EV_TIMEOUT) { /* event_active: process what is buffered */
        if (c->want_body && c->state == CS_BUSY)
            server_body_begin(c);
        else
            server_process(c);
        return;
    }
    if (c->state == CS_LINGER) {
        char junk[4096];
        n = recv(fd, junk, sizeof junk, 0);
        if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EINTR))) return;
        server_close(c);
        return;
    }
    if (c->state == CS_BODY && !c->chunked && c->in_len == c->head_len) {
        /* The rest of a Content-Length body: straight into its buffer. */
        dst = c->body.p + c->body.len;
        room = c->body_need - c->body.len;
    } else {
        if (c->in_len == c->in_cap) {
            /* Before a request exists the buffer may grow to the head bound
             * (http1req_head_end refuses past it); afterwards it may not
             * move: stop reading until the answer. */
            size_t cap = c->in_cap ? c->in_cap * 2 : SERVER_BUF_MIN;
            char *nb;
            if (c->state != CS_IDLE && c->state != CS_HEAD) {
                server_read_pause(c);
                return;
            }
            if (cap > SERVER_HEAD_MAX) cap = SERVER_HEAD_MAX;
            /* Cannot happen: a full head bound is refused (431) before. */
            nb = cap > c->in_cap ? realloc(c->in, cap) : NULL;
            if (!nb) {
                server_close(c);
                return;
            }
            c->in = nb;
            c->in_cap = cap;
        }
        dst = c->in + c->in_len;
        room = c->in_cap - c->in_len;
    }
    n = recv(fd, dst, room, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        server_on_eof(c); /* reset: the same as a close */
        return;
    }
    if (n == 0) {
        server_on_eof(c);
        return;
    }
    metric_add(&c->s->w->m.received_bytes, (uint64_t)n);
    if (dst == c->body.p + c->body.len) {
        c->body.len += (size_t)n;
        if (c->body.len == c->body_need) server_body_complete(c);
        return;
    }
    c->in_len += (size_t)n;
    if (c->state == CS_BUSY || c->state == CS_WRITE) {
        /* Pipelined: kept for after the answer. */
        if (c->in_len == c->in_cap) server_read_pause(c);
        return;
    }
    server_process(c);
}

/* ---- new connections ------------------------------------------------- */

/* The client closed while its reads were paused (server_read_pause). */
static void server_on_closed(evutil_socket_t fd, short what, void *arg)
{
    server_conn *c = arg;
    event_del(&c->cev); /* level-triggered: it would fire again */
    c->watching = 0;
    server_on_eof(c);
}

void server_conn_new(server *s, int fd, const struct sockaddr_storage *peer)
{
    int one = 1;
    server_conn *c;
    /* Small answers go out at once, not after the client's delayed ACK. */
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
        log_debug("TCP_NODELAY: %s", strerror(errno));
    c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        return;
    }
    c->s = s;
    c->fd = fd;
    c->peer = *peer;
    buf_init(&c->body, (size_t)s->cfg->max_body);
    buf_init(&c->out, SIZE_MAX);
    c->list = L_NONE;
    c->state = CS_HEAD; /* the first request's head is due within the head timeout */
    c->req.keep_alive = 1;
    c->req.minor = 1;
    event_assign(&c->rev, s->base, fd, EV_READ | EV_PERSIST, server_on_read, c);
    event_assign(&c->wev, s->base, fd, EV_WRITE, server_on_write, c);
    event_assign(&c->cev, s->base, fd, EV_CLOSED, server_on_closed, c);
    /* Linked before anything can close it. */
    TAILQ_INSERT_TAIL(&s->lists[L_NONE], c, link);
    s->nconns++;
    metric_gauge_add(&s->w->m.connections, 1);
    metric_add(&s->w->m.accepted, 1);
    server_list(c, L_HEAD);
    server_read_on(c);
    if (c->eof) server_close(c);
}

/* ---- accessors --------------------------------------------------------- */

const char *server_method(const server_conn *c)
{
    return c->in + c->req.method;
}

const char *server_target(const server_conn *c)
{
    return c->in + c->req.target;
}

const char *server_header(const server_conn *c, const char *name)
{
    return http1req_get(c->in, &c->req, name);
}

size_t server_header_count(const server_conn *c)
{
    return c->req.nfields;
}

void server_header_at(const server_conn *c, size_t i, const char **name, const char **value)
{
    *name = c->in + c->req.fields[i].name;
    *value = c->in + c->req.fields[i].value;
}

const struct sockaddr *server_peer(const server_conn *c)
{
    return (const struct sockaddr *)&c->peer;
}

const char *server_body(const server_conn *c, size_t *len)
{
    *len = c->body.len;
    return c->body.p;
}
