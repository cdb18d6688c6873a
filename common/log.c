/* log.c: the log and the access log (log.h). Owns line formatting (text or
 * JSON, with escaping), the two sinks' bounded buffers and the one writer
 * thread that empties them; does not own what is logged, nor the metrics
 * registry (log_metrics only renders two families into the caller's text).
 *
 * State: configuration (log_init, before any thread starts) plus the
 * writer's: its buffers, flags and counters, all behind one mutex held for
 * a bounds check and a memcpy only. No I/O ever happens under it.
 *
 * Why a mutex and not a lock-free ring: a caller holds it for about the
 * time of a cache-line transfer and a memcpy of one line (~100-400 bytes);
 * the writer holds it to read two positions. A ring per thread would need
 * the writer to merge lines in order across threads, which one lock gives
 * for free.
 *
 * Before log_start and after log_stop a line is written at once with one
 * write(2) on the caller's thread, so start-up errors and CLI commands
 * behave as plain stderr does. */
#include "common/log.h"
#include "common/metrics.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LOG_MSG_MAX 4096    /* a message as formatted, before escaping */
#define LOG_LINE_MAX 8192   /* a log line, escaped; longer ones are cut with "..." */
#define LOG_ACCESS_MAX 8192 /* an access line */
#define LOG_FIELD_MAX 2048  /* one access-log string field, escaped */
#define LOG_BUFFER_DEFAULT (1u << 20)
#define LOG_BUFFER_MIN (64u << 10)
#define LOG_BUFFER_MAX (256u << 20)
#define LOG_STOP_WAIT_S 5       /* log_stop gives up on a sink blocked this long */
#define LOG_DROP_REPORT_MS 1000 /* at most one "lines dropped" line a second */
/* Under load (LOG_NAP_BYTES or more written since the writer last
 * waited) it naps LOG_NAP_MS before it looks again, and callers do not wake
 * it unless their ring is half full: lines go out in batches and no caller
 * pays for a wake-up (a futex call, the largest part of a line's cost
 * otherwise). Otherwise, and after a nap that found nothing, it sleeps
 * until the next line wakes it: a quiet log is written within microseconds,
 * as a synchronous one was (tests and operators grep it right away). */
#define LOG_NAP_MS 2
#define LOG_NAP_BYTES 16384
enum { LOG_BUSY, LOG_IDLE_SLEEP, LOG_IDLE_NAP };

/* Bytes ever queued (wpos) and ever handed back by the writer (rpos): the
 * used part is [rpos, wpos) modulo cap. Callers write only into the free
 * part, and the writer reads [rpos, wpos) outside the lock, since rpos
 * moves only once its write(2) is done. */
typedef struct log_ring {
    char *buf;
    size_t cap;
    uint64_t wpos, rpos;
} log_ring;

typedef struct log_out {
    int fd;     /* -1: off */
    char *path; /* a file we opened (reopened on log_reopen); NULL: stderr */
    log_ring ring;
    atomic_ullong written, dropped;
} log_out;

static struct {
    /* configuration: log_init only */
    enum log_level min;
    int json;
    const char *component;
    size_t bufsize;
    log_out out[LOG_SINKS];
    /* the writer; these under mu */
    pthread_mutex_t mu;
    pthread_cond_t cond;
    pthread_t thread;
    int running;  /* lines go to the rings (the writer runs) */
    int stopping; /* log_stop asked: drain and exit */
    int idle;     /* the writer waits on cond: LOG_IDLE_* */
    int wedged;   /* log_stop gave up on the writer: never free the rings */
    unsigned long long dropped_at_start[LOG_SINKS];
    atomic_int reopen;
} L = {
    .min = LOG_INFO,
    .component = "pointgate",
    .bufsize = LOG_BUFFER_DEFAULT,
    .out = {{.fd = 2}, {.fd = -1}},
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .cond = PTHREAD_COND_INITIALIZER,
};

static const char *const log_level_names[] = {"debug", "info", "warn", "error"};

/* ---- formatting ----------------------------------------------------------- */

/* A bounded line being built: never written past cap; `cut` once something
 * did not fit. */
typedef struct log_buf {
    char *p;
    size_t len, cap;
    int cut;
} log_buf;

static void lb_add(log_buf *b, const char *s, size_t n)
{
    if (b->len + n > b->cap) {
        b->cut = 1;
        return;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void lb_str(log_buf *b, const char *s)
{
    lb_add(b, s, strlen(s));
}

/* V in decimal: snprintf costs more than the rest of an access line. */
static void lb_int(log_buf *b, long long v)
{
    char tmp[24];
    size_t k = sizeof tmp;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[--k] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) tmp[--k] = '-';
    lb_add(b, tmp + k, sizeof tmp - k);
}

/* Milliseconds with three decimals (microseconds), "12.345"; not finite: 0. */
static void lb_ms(log_buf *b, double ms)
{
    long long us;
    char frac[4];
    if (!isfinite(ms) || ms > 9e12 || ms < -9e12) ms = 0;
    us = llround(ms * 1000.0);
    if (us < 0) {
        lb_add(b, "-", 1);
        us = -us;
    }
    lb_int(b, us / 1000);
    frac[0] = '.';
    frac[1] = (char)('0' + us / 100 % 10);
    frac[2] = (char)('0' + us / 10 % 10);
    frac[3] = (char)('0' + us % 10);
    lb_add(b, frac, 4);
}

/* Length of the well-formed UTF-8 sequence (RFC 3629: no overlongs, no
 * surrogates, nothing past U+10FFFF) at S (N bytes left), 0 if there is
 * none, i.e. S[0] is an invalid byte. */
static size_t log_utf8_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    unsigned char lo = 0x80, hi = 0xBF;
    size_t len;
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF)
        len = 3;
    else if (c >= 0xF0 && c <= 0xF4)
        len = 4;
    else
        return 0;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
    if (n < len || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return len;
}

/* Appends S (N bytes, any content) escaped: for JSON a string's inside
 * (quote, backslash and control characters escaped, an invalid UTF-8 byte
 * as U+FFFD); for text the same bytes made printable (control characters
 * as \n, \t, \xNN; invalid UTF-8 as \xNN; the rest as it is, so messages
 * read as before). Stops at LIMIT bytes of B, never inside an escape or a
 * character, and then ends with "...". */
static void lb_escape(log_buf *b, const char *str, size_t n, int json, size_t limit)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    if (limit > b->cap) limit = b->cap;
    while (i < n) {
        char e[8];
        size_t j = i;
        /* The usual case first: a run of printable ASCII, copied at once. */
        while (j < n && s[j] >= 0x20 && s[j] < 0x7F && s[j] != '"' && s[j] != '\\')
            j++;
        if (j > i) {
            size_t run = j - i;
            if (b->len + run + 3 > limit) run = limit > b->len + 3 ? limit - b->len - 3 : 0;
            memcpy(b->p + b->len, str + i, run);
            b->len += run;
            i += run;
            if (i < j) {
                b->cut = 1;
                if (b->len + 3 <= b->cap) lb_add(b, "...", 3);
                return;
            }
            continue;
        }
        const char *out = e;
        size_t k = 0, adv = 1;
        unsigned char c = s[i];
        if (c >= 0x20 && c < 0x7F && !(json && (c == '"' || c == '\\'))) {
            e[k++] = (char)c;
        } else if (c == '"' || c == '\\') {
            e[k++] = '\\';
            e[k++] = (char)c;
        } else if (c == '\n' || c == '\t' || c == '\r') {
            e[k++] = '\\';
            e[k++] = c == '\n' ? 'n' : c == '\t' ? 't' : 'r';
        } else if (c < 0x80) { /* other control characters and DEL */
            if (json) {
                memcpy(e, "\\u00", 4);
                k = 4;
            } else {
                memcpy(e, "\\x", 2);
                k = 2;
            }
            e[k++] = hex[c >> 4];
            e[k++] = hex[c & 15];
        } else if ((adv = log_utf8_len(s + i, n - i)) > 0) {
            out = str + i;
            k = adv;
        } else {
            adv = 1;
            if (json) {
                memcpy(e, "\\ufffd", 6);
                k = 6;
            } else {
                e[0] = '\\';
                e[1] = 'x';
                e[2] = hex[c >> 4];
                e[3] = hex[c & 15];
                k = 4;
            }
        }
        if (b->len + k + 3 > limit) {
            b->cut = 1;
            if (b->len + 3 <= b->cap) lb_add(b, "...", 3);
            return;
        }
        memcpy(b->p + b->len, out, k);
        b->len += k;
        i += adv;
    }
}

static void lb_json_str(log_buf *b, const char *s, size_t limit)
{
    if (!s) {
        lb_add(b, "null", 4);
        return;
    }
    lb_add(b, "\"", 1);
    lb_escape(b, s, strlen(s), 1, limit);
    lb_add(b, "\"", 1);
}

static void log_put(char *p, unsigned v, int digits)
{
    while (digits-- > 0) {
        p[digits] = (char)('0' + v % 10);
        v /= 10;
    }
}

/* NOW as RFC 3339 UTC with milliseconds, "2024-05-01T12:34:56.789Z" (24
 * bytes and a NUL). Computed here, not with gmtime_r, which takes glibc's
 * time-zone lock on every call: a lock shared by every logging thread. */
static void log_ts(char out[32])
{
    struct timespec now;
    int64_t secs, days, rem, z, era, doe, yoe, y, doy, mp, d, m;
    clock_gettime(CLOCK_REALTIME, &now);
    secs = (int64_t)now.tv_sec;
    days = secs / 86400;
    rem = secs % 86400;
    if (rem < 0) {
        rem += 86400;
        days--;
    }
    /* civil_from_days (H. Hinnant): days since 1970-01-01 to a date. */
    z = days + 719468;
    era = (z >= 0 ? z : z - 146096) / 146097;
    doe = z - era * 146097;
    yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    y = yoe + era * 400;
    doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    mp = (5 * doy + 2) / 153;
    d = doy - (153 * mp + 2) / 5 + 1;
    m = mp < 10 ? mp + 3 : mp - 9;
    y += m <= 2;
    memcpy(out, "0000-00-00T00:00:00.000Z", 25);
    log_put(out, (unsigned)y, 4);
    log_put(out + 5, (unsigned)m, 2);
    log_put(out + 8, (unsigned)d, 2);
    log_put(out + 11, (unsigned)(rem / 3600), 2);
    log_put(out + 14, (unsigned)(rem / 60 % 60), 2);
    log_put(out + 17, (unsigned)(rem % 60), 2);
    log_put(out + 20, (unsigned)(now.tv_nsec / 1000000), 3);
}

/* One log line, with its newline, into B. */
static void log_format(log_buf *b, enum log_level lvl, const char *rid, long long account,
                       const char *msg)
{
    char ts[32];
    size_t ml = strlen(msg);
    log_ts(ts);
    /* Room kept for what follows the message. */
    size_t limit = b->cap - 128;
    if (L.json) {
        lb_str(b, "{\"ts\":\"");
        lb_str(b, ts);
        lb_str(b, "\",\"level\":\"");
        lb_str(b, log_level_names[lvl]);
        lb_str(b, "\",\"component\":");
        lb_json_str(b, L.component, b->len + 64);
        lb_str(b, ",\"msg\":\"");
        lb_escape(b, msg, ml, 1, limit);
        lb_str(b, "\"");
        if (rid) {
            lb_str(b, ",\"request_id\":");
            lb_json_str(b, rid, b->len + 80);
        }
        if (account > 0) {
            lb_str(b, ",\"account_id\":");
            lb_int(b, account);
        }
        lb_str(b, "}\n");
    } else {
        lb_str(b, ts);
        lb_str(b, " ");
        lb_escape(b, L.component, strlen(L.component), 0, b->len + 64);
        lb_str(b, " ");
        lb_str(b, log_level_names[lvl]);
        lb_str(b, ": ");
        lb_escape(b, msg, ml, 0, limit);
        if (rid) {
            lb_str(b, " request_id=");
            lb_escape(b, rid, strlen(rid), 0, b->len + 80);
        }
        if (account > 0) {
            lb_str(b, " account_id=");
            lb_int(b, account);
        }
        lb_str(b, "\n");
    }
}

/* ---- output ----------------------------------------------------------------- */

/* All of BUF to FD: retries EINTR and partial writes, waits on a
 * non-blocking fd that says EAGAIN. 0, or -1 with the bytes written in *DONE. */
static int log_write_all(int fd, const char *buf, size_t n, size_t *done)
{
    size_t off = 0;
    int rc = 0;
    while (off < n) {
        ssize_t w = write(fd, buf + off, n - off);
        if (w > 0) {
            off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            if (poll(&pfd, 1, 1000) >= 0 || errno == EINTR) continue;
        }
        rc = -1;
        break;
    }
    if (done) *done = off;
    return rc;
}

static unsigned long long log_count_lines(const char *p, size_t n)
{
    unsigned long long k = 0;
    const char *end = p + n;
    while (p < end && (p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        k++;
        p++;
    }
    return k;
}

/* Writes one chunk of whole or partial lines: lines written and lines lost
 * to an error are counted by their newlines. Writer thread, or a caller
 * while synchronous. */
static void log_write_chunk(log_out *o, const char *p, size_t n)
{
    size_t done = 0;
    int rc = log_write_all(o->fd, p, n, &done);
    atomic_fetch_add_explicit(&o->written, log_count_lines(p, done), memory_order_relaxed);
    if (rc != 0)
        atomic_fetch_add_explicit(&o->dropped, log_count_lines(p + done, n - done),
                                  memory_order_relaxed);
}

/* Copies LINE into O's ring; under L.mu, while running. 0, or -1 when it
 * does not fit (the caller counts the drop or not). */
static int log_push_locked(log_out *o, const char *line, size_t len)
{
    log_ring *r = &o->ring;
    size_t off, first;
    if (r->cap - (size_t)(r->wpos - r->rpos) < len) return -1;
    off = (size_t)(r->wpos % r->cap);
    first = len < r->cap - off ? len : r->cap - off;
    memcpy(r->buf + off, line, first);
    memcpy(r->buf, line + first, len - first);
    r->wpos += len;
    if (L.idle == LOG_IDLE_SLEEP || (L.idle == LOG_IDLE_NAP && r->wpos - r->rpos >= r->cap / 2)) {
        L.idle = LOG_BUSY;
        pthread_cond_signal(&L.cond);
    }
    return 0;
}

/* One finished line to SINK: queued while the writer runs (dropped and
 * counted when it does not fit), written at once otherwise. */
static void log_emit(enum log_sink sink, const char *line, size_t len)
{
    log_out *o = &L.out[sink];
    if (o->fd < 0) return;
    pthread_mutex_lock(&L.mu);
    if (L.running) {
        if (log_push_locked(o, line, len) != 0)
            atomic_fetch_add_explicit(&o->dropped, 1, memory_order_relaxed);
        pthread_mutex_unlock(&L.mu);
        return;
    }
    pthread_mutex_unlock(&L.mu);
    log_write_chunk(o, line, len);
}

/* Reopens the files at their paths onto the same descriptors (dup2), so a
 * line being written by another thread goes to the old file or the new
 * one, never to a closed descriptor. A failure keeps the old file. */
static void log_reopen_files(void)
{
    for (int s = 0; s < LOG_SINKS; s++) {
        log_out *o = &L.out[s];
        int fd;
        if (!o->path || o->fd < 0) continue;
        fd = open(o->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
        if (fd < 0) {
            log_error("log: cannot reopen %s: %s (still writing to the old file)", o->path,
                      strerror(errno));
            continue;
        }
        if (dup2(fd, o->fd) < 0)
            log_error("log: cannot reopen %s: dup2: %s", o->path, strerror(errno));
        close(fd);
    }
}

static unsigned long long log_dropped_all(void)
{
    return log_dropped(LOG_SINK_LOG) + log_dropped(LOG_SINK_ACCESS);
}

static long long log_mono_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* The writer waits on L.cond (under L.mu) for at most MS, as STATE. */
static void log_wait(int state, long long ms)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += (time_t)(ms / 1000);
    dl.tv_nsec += (long)(ms % 1000) * 1000000L;
    dl.tv_sec += dl.tv_nsec / 1000000000L;
    dl.tv_nsec %= 1000000000L;
    L.idle = state;
    pthread_cond_timedwait(&L.cond, &L.mu, &dl);
    L.idle = LOG_BUSY;
}

/* The writer: empties each ring in turn (both parts of a wrapped one
 * before the next ring, so two sinks on one fd never split a line), with
 * one write(2) per contiguous part; reopens files when asked; says how
 * many lines were dropped, at most once a second. */
static void *log_writer(void *arg)
{
    /* Drops before the writer started (a failing sink) are not reported as its. */
    unsigned long long rep_log = log_dropped(LOG_SINK_LOG),
                       rep_access = log_dropped(LOG_SINK_ACCESS);
    unsigned long long reported = rep_log + rep_access;
    long long last_report = 0;
    int napped = 0;
    size_t since_wait = 0; /* bytes written since the last wait */
    (void)arg;
    pthread_mutex_lock(&L.mu);
    for (;;) {
        int did = 0;
        unsigned long long dropped;
        if (atomic_exchange(&L.reopen, 0)) {
            pthread_mutex_unlock(&L.mu);
            log_reopen_files();
            pthread_mutex_lock(&L.mu);
        }
        for (int s = 0; s < LOG_SINKS; s++) {
            log_out *o = &L.out[s];
            log_ring *r = &o->ring;
            uint64_t from = r->rpos, to = r->wpos;
            size_t off, n, first;
            if (from == to) continue;
            pthread_mutex_unlock(&L.mu);
            off = (size_t)(from % r->cap);
            n = (size_t)(to - from);
            first = n < r->cap - off ? n : r->cap - off;
            log_write_chunk(o, r->buf + off, first);
            if (n > first) log_write_chunk(o, r->buf, n - first);
            pthread_mutex_lock(&L.mu);
            r->rpos = to;
            since_wait += n;
            did = 1;
        }
        if (did) {
            napped = 0;
            continue;
        }
        dropped = log_dropped_all();
        if (dropped != reported) {
            long long now = log_mono_ms();
            if (now - last_report >= LOG_DROP_REPORT_MS) {
                char line[512];
                char msg[256];
                log_buf b = {line, 0, sizeof line, 0};
                unsigned long long dl = log_dropped(LOG_SINK_LOG),
                                   da = log_dropped(LOG_SINK_ACCESS);
                pthread_mutex_unlock(&L.mu);
                snprintf(msg, sizeof msg,
                         "log: %llu log lines and %llu access lines dropped since the last report "
                         "(a sink could not keep up; LOG_BUFFER_BYTES)",
                         dl - rep_log, da - rep_access);
                log_format(&b, LOG_WARN, NULL, 0, msg);
                pthread_mutex_lock(&L.mu);
                /* The ring is empty here, so it fits; the line is not counted
                 * as a drop when it does not: said next time. */
                if (log_push_locked(&L.out[LOG_SINK_LOG], line, b.len) == 0) {
                    reported = dl + da;
                    rep_log = dl;
                    rep_access = da;
                    last_report = now;
                    continue;
                }
            }
            if (!L.stopping) {
                long long wait_ms = LOG_DROP_REPORT_MS - (now - last_report);
                log_wait(LOG_IDLE_SLEEP, wait_ms < 1 ? LOG_DROP_REPORT_MS : wait_ms);
                continue;
            }
        }
        if (L.stopping) break;
        if (!napped && since_wait >= LOG_NAP_BYTES) {
            log_wait(LOG_IDLE_NAP, LOG_NAP_MS);
            napped = 1;
            since_wait = 0;
            continue;
        }
        L.idle = LOG_IDLE_SLEEP;
        pthread_cond_wait(&L.cond, &L.mu);
        L.idle = LOG_BUSY;
        napped = 0;
        since_wait = 0;
    }
    /* Still under the lock: a line queued before this point was written; one
     * after it is written by its caller. */
    L.running = 0;
    pthread_mutex_unlock(&L.mu);
    return NULL;
}

/* ---- the API -------------------------------------------------------------- */

static void log_close_outs(void)
{
    for (int s = 0; s < LOG_SINKS; s++) {
        log_out *o = &L.out[s];
        if (o->path && o->fd >= 0) close(o->fd);
        free(o->path);
        o->path = NULL;
        o->fd = s == LOG_SINK_LOG ? 2 : -1;
    }
}

/* VALUE (unset, "", "stderr", "off" or a path) as O's destination. */
static int log_open_out(log_out *o, const char *var, const char *value, int may_be_off)
{
    if (!value || !*value || (may_be_off && strcmp(value, "off") == 0)) {
        o->fd = may_be_off ? -1 : 2;
        return 0;
    }
    if (strcmp(value, "stderr") == 0) {
        o->fd = 2;
        return 0;
    }
    o->path = strdup(value);
    if (!o->path) {
        log_error("%s: out of memory", var);
        return -1;
    }
    o->fd = open(value, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (o->fd < 0) {
        o->fd = may_be_off ? -1 : 2; /* so that the error below reaches stderr */
        log_error("%s=%s: cannot open: %s", var, value, strerror(errno));
        free(o->path);
        o->path = NULL;
        return -1;
    }
    return 0;
}

int log_init(const char *component)
{
    const char *lvl = getenv("LOG_LEVEL"), *fmt = getenv("LOG_FORMAT");
    const char *bufsz = getenv("LOG_BUFFER_BYTES");
    int running;
    pthread_mutex_lock(&L.mu);
    running = L.running;
    pthread_mutex_unlock(&L.mu);
    if (running) {
        log_error("log_init while the log writer runs");
        return -1;
    }
    log_close_outs();
    L.component = component ? component : "pointgate";
    L.min = LOG_INFO;
    L.json = 0;
    L.bufsize = LOG_BUFFER_DEFAULT;
    if (fmt && *fmt) {
        if (strcmp(fmt, "json") == 0)
            L.json = 1;
        else if (strcmp(fmt, "text") != 0) {
            log_error("LOG_FORMAT=%s: expected text or json", fmt);
            return -1;
        }
    }
    if (lvl && *lvl) {
        int i;
        for (i = 0; i < 4 && strcmp(lvl, log_level_names[i]) != 0; i++) {
        }
        if (i == 4) {
            log_error("LOG_LEVEL=%s: expected debug, info, warn or error", lvl);
            return -1;
        }
        L.min = (enum log_level)i;
    }
    if (bufsz && *bufsz) {
        char *end;
        unsigned long long v;
        errno = 0;
        v = strtoull(bufsz, &end, 10);
        if (errno || *end || bufsz[0] == '-' || v < LOG_BUFFER_MIN || v > LOG_BUFFER_MAX) {
            log_error("LOG_BUFFER_BYTES=%s: expected bytes from %u to %u", bufsz, LOG_BUFFER_MIN,
                      LOG_BUFFER_MAX);
            return -1;
        }
        L.bufsize = (size_t)v;
    }
    if (log_open_out(&L.out[LOG_SINK_LOG], "LOG_FILE", getenv("LOG_FILE"), 0) != 0) return -1;
    if (log_open_out(&L.out[LOG_SINK_ACCESS], "ACCESS_LOG", getenv("ACCESS_LOG"), 1) != 0) {
        log_close_outs();
        return -1;
    }
    return 0;
}

int log_start(void)
{
    sigset_t all, old;
    int rc = -1;
    pthread_mutex_lock(&L.mu);
    if (L.running || L.wedged) {
        pthread_mutex_unlock(&L.mu);
        return L.running ? 0 : -1;
    }
    for (int s = 0; s < LOG_SINKS; s++) {
        log_ring *r = &L.out[s].ring;
        r->wpos = r->rpos = 0;
        r->cap = 0;
        r->buf = NULL;
        if (L.out[s].fd < 0) continue;
        r->buf = malloc(L.bufsize);
        if (!r->buf) goto out;
        r->cap = L.bufsize;
    }
    L.stopping = 0;
    L.idle = LOG_BUSY;
    for (int s = 0; s < LOG_SINKS; s++)
        L.dropped_at_start[s] = log_dropped((enum log_sink)s);
    /* The writer takes no signal: they go to the programs' sigwait loops. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = pthread_create(&L.thread, NULL, log_writer, NULL) == 0 ? 0 : -1;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0) L.running = 1;
out:
    if (rc != 0) {
        for (int s = 0; s < LOG_SINKS; s++) {
            free(L.out[s].ring.buf);
            L.out[s].ring.buf = NULL;
            L.out[s].ring.cap = 0;
        }
    }
    pthread_mutex_unlock(&L.mu);
    if (rc != 0) log_error("log: cannot start the writer thread: lines stay synchronous");
    return rc;
}

void log_stop(void)
{
    struct timespec dl;
    unsigned long long dl_log, dl_access;
    pthread_mutex_lock(&L.mu);
    if (!L.running || L.stopping) {
        pthread_mutex_unlock(&L.mu);
        return;
    }
    L.stopping = 1;
    if (L.idle != LOG_BUSY) {
        L.idle = LOG_BUSY;
        pthread_cond_signal(&L.cond);
    }
    pthread_mutex_unlock(&L.mu);
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += LOG_STOP_WAIT_S;
    if (pthread_timedjoin_np(L.thread, NULL, &dl) != 0) {
        /* The writer is stuck in write(2) on a sink nobody reads: leave it
         * (and its rings) to the exit; lines keep being queued or dropped. */
        pthread_mutex_lock(&L.mu);
        L.wedged = 1;
        pthread_mutex_unlock(&L.mu);
        return;
    }
    for (int s = 0; s < LOG_SINKS; s++) {
        free(L.out[s].ring.buf);
        L.out[s].ring.buf = NULL;
        L.out[s].ring.cap = 0;
    }
    L.stopping = 0;
    dl_log = log_dropped(LOG_SINK_LOG) - L.dropped_at_start[LOG_SINK_LOG];
    dl_access = log_dropped(LOG_SINK_ACCESS) - L.dropped_at_start[LOG_SINK_ACCESS];
    if (dl_log || dl_access)
        log_warn("log: %llu log lines and %llu access lines dropped while the writer ran (a "
                 "sink could not keep up)",
                 dl_log, dl_access);
}

void log_reopen(void)
{
    int running;
    pthread_mutex_lock(&L.mu);
    running = L.running;
    if (running) {
        atomic_store(&L.reopen, 1);
        if (L.idle != LOG_BUSY) {
            L.idle = LOG_BUSY;
            pthread_cond_signal(&L.cond);
        }
    }
    pthread_mutex_unlock(&L.mu);
    if (!running) log_reopen_files();
}

unsigned long long log_dropped(enum log_sink sink)
{
    if ((int)sink < 0 || sink >= LOG_SINKS) return 0;
    return atomic_load_explicit(&L.out[sink].dropped, memory_order_relaxed);
}

unsigned long long log_written(enum log_sink sink)
{
    if ((int)sink < 0 || sink >= LOG_SINKS) return 0;
    return atomic_load_explicit(&L.out[sink].written, memory_order_relaxed);
}

void log_metrics(struct promtext *p)
{
    static const char *const sinks[LOG_SINKS] = {"log", "access"};
    char lab[32];
    promtext_family(p, "pointgate_log_lines_total", "counter", "Log lines written.");
    for (int s = 0; s < LOG_SINKS; s++) {
        snprintf(lab, sizeof lab, "sink=\"%s\"", sinks[s]);
        promtext_u64(p, "pointgate_log_lines_total", lab, log_written((enum log_sink)s));
    }
    promtext_family(p, "pointgate_log_lines_dropped_total", "counter",
                    "Log lines dropped because the sink could not keep up.");
    for (int s = 0; s < LOG_SINKS; s++) {
        snprintf(lab, sizeof lab, "sink=\"%s\"", sinks[s]);
        promtext_u64(p, "pointgate_log_lines_dropped_total", lab, log_dropped((enum log_sink)s));
    }
}

int log_access_on(void)
{
    return L.out[LOG_SINK_ACCESS].fd >= 0;
}

void log_access(const log_access_rec *r)
{
    char line[LOG_ACCESS_MAX], ts[32];
    log_buf b = {line, 0, sizeof line, 0};
    if (!log_access_on() || !r) return;
    log_ts(ts);
    lb_str(&b, "{\"ts\":\"");
    lb_str(&b, ts);
    lb_str(&b, "\",\"request_id\":");
    lb_json_str(&b, r->request_id, b.len + 80);
    lb_str(&b, ",\"account_id\":");
    if (r->account_id > 0)
        lb_int(&b, r->account_id);
    else
        lb_str(&b, "null");
    lb_str(&b, ",\"key_id\":");
    lb_json_str(&b, r->key_id, b.len + 80);
    lb_str(&b, ",\"route\":");
    lb_json_str(&b, r->route, b.len + 400);
    lb_str(&b, ",\"method\":");
    lb_json_str(&b, r->method, b.len + 80);
    lb_str(&b, ",\"path\":");
    lb_json_str(&b, r->path, b.len + LOG_FIELD_MAX);
    lb_str(&b, ",\"status\":");
    lb_int(&b, r->status);
    lb_str(&b, ",\"charged\":");
    lb_int(&b, r->charged);
    lb_str(&b, ",\"outcome\":");
    lb_json_str(&b, r->outcome, b.len + 80);
    lb_str(&b, ",\"total_ms\":");
    lb_ms(&b, r->total_ms);
    lb_str(&b, ",\"upstream_ms\":");
    lb_ms(&b, r->upstream_ms);
    lb_str(&b, ",\"wait_ms\":");
    lb_ms(&b, r->wait_ms);
    lb_str(&b, ",\"bytes_in\":");
    lb_int(&b, r->bytes_in);
    lb_str(&b, ",\"bytes_out\":");
    lb_int(&b, r->bytes_out);
    lb_str(&b, "}\n");
    /* The fields are bounded well below the line: cannot be cut. */
    if (b.cut) return;
    log_emit(LOG_SINK_ACCESS, line, b.len);
}

static void log_vmsg(enum log_level lvl, const char *rid, long long account, const char *fmt,
                     va_list ap)
{
    char msg[LOG_MSG_MAX], line[LOG_LINE_MAX];
    log_buf b = {line, 0, sizeof line, 0};
    if (lvl < L.min || (int)lvl < 0 || lvl > LOG_ERROR) return;
    if (vsnprintf(msg, sizeof msg, fmt, ap) >= (int)sizeof msg)
        memcpy(msg + sizeof msg - 4, "...", 4); /* said, not silently cut */
    log_format(&b, lvl, rid, account, msg);
    if (b.len == 0 || line[b.len - 1] != '\n') { /* cut in the tail: end it anyway */
        if (b.len == b.cap) b.len--;
        line[b.len++] = '\n';
    }
    log_emit(LOG_SINK_LOG, line, b.len);
}

void log_msg_ctx(enum log_level lvl, const char *request_id, long long account_id, const char *fmt,
                 ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vmsg(lvl, request_id, account_id, fmt, ap);
    va_end(ap);
}

void log_msg(enum log_level lvl, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vmsg(lvl, NULL, 0, fmt, ap);
    va_end(ap);
}

int log_limit_ok(log_limit *l, unsigned long long now_ms, unsigned per_sec)
{
    unsigned long long sec = now_ms / 1000;
    if (sec != l->second) {
        l->second = sec;
        l->n = 0;
    }
    if (l->n >= per_sec) {
        l->suppressed++;
        return 0;
    }
    l->n++;
    if (l->suppressed) {
        log_msg(LOG_WARN, "%lu similar log lines suppressed (more than %u a second)", l->suppressed,
                per_sec);
        l->suppressed = 0;
    }
    return 1;
}
