/* test_log.c: the log writer (common/log.c) against real files and a real
 * FIFO: lines in order through the writer thread, a line that does not fit
 * dropped and counted while the caller goes on, the JSON of the log and of
 * the access log parsed back (jansson) with every hostile byte escaped,
 * the text format's lines kept whole, bad settings refused, reopen after a
 * rename, two sinks on one descriptor never splitting a line. Needs no
 * service. Exit 0 when every check holds.
 *
 * `test_log bench` instead prints what a line costs its caller (not a test:
 * run.py never passes it). */
#include "common/log.h"
#include "tests/unit/check.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char dir[64];

static void path_of(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", dir, name);
}

/* Sets the log's variables (NULL: unset) and runs log_init. */
static int init(const char *level, const char *format, const char *file, const char *access,
                const char *bufsz)
{
    const char *names[] = {"LOG_LEVEL", "LOG_FORMAT", "LOG_FILE", "ACCESS_LOG", "LOG_BUFFER_BYTES"};
    const char *vals[] = {level, format, file, access, bufsz};
    for (int i = 0; i < 5; i++) {
        if (vals[i])
            setenv(names[i], vals[i], 1);
        else
            unsetenv(names[i]);
    }
    return log_init("test");
}

/* The file's lines (without their newlines), NULL-terminated; *N their count. */
static char **read_lines(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    char **out = NULL;
    size_t k = 0, cap = 0;
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    *n = 0;
    if (!f) return calloc(1, sizeof *out);
    while ((len = getline(&line, &lcap, f)) >= 0) {
        if (k + 2 > cap) {
            char **grown;
            cap = cap ? cap * 2 : 64;
            grown = realloc(out, cap * sizeof *out);
            if (!grown) break;
            out = grown;
        }
        if (len > 0 && line[len - 1] == '\n') line[--len] = '\0';
        out[k++] = strdup(line);
    }
    free(line);
    fclose(f);
    if (!out) out = calloc(1, sizeof *out);
    out[k] = NULL;
    *n = k;
    return out;
}

static void free_lines(char **l)
{
    for (size_t i = 0; l && l[i]; i++)
        free(l[i]);
    free(l);
}

/* No raw control byte in a line: one line per record, whatever the message. */
static int printable(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f) return 0;
    return 1;
}

/* "2024-05-01T12:34:56.789Z" within a few seconds of now. */
static int ts_ok(const char *ts)
{
    struct tm tm = {0};
    const char *end;
    time_t t;
    if (!ts || strlen(ts) != 24 || ts[19] != '.' || ts[23] != 'Z') return 0;
    for (int i = 20; i < 23; i++)
        if (ts[i] < '0' || ts[i] > '9') return 0;
    end = strptime(ts, "%Y-%m-%dT%H:%M:%S", &tm);
    if (!end || *end != '.') return 0;
    t = timegm(&tm);
    return llabs((long long)(t - time(NULL))) <= 5;
}

static json_t *parse(const char *line)
{
    json_error_t e;
    json_t *j = json_loads(line, JSON_REJECT_DUPLICATES, &e);
    if (!j) fprintf(stderr, "  not JSON (%s): %.200s\n", e.text, line);
    return j;
}

static const char *jstr(json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k));
}

/* ---- bad settings ----------------------------------------------------------- */

static void test_bad_values(void)
{
    char bad[160];
    snprintf(bad, sizeof bad, "%s/no/such/dir/x.log", dir);
    CHECK(init("loud", NULL, NULL, NULL, NULL) == -1);
    CHECK(init(NULL, "xml", NULL, NULL, NULL) == -1);
    CHECK(init(NULL, "JSON", NULL, NULL, NULL) == -1);
    CHECK(init(NULL, NULL, NULL, NULL, "1000") == -1);
    CHECK(init(NULL, NULL, NULL, NULL, "65535") == -1);
    CHECK(init(NULL, NULL, NULL, NULL, "268435457") == -1);
    CHECK(init(NULL, NULL, NULL, NULL, "1MiB") == -1);
    CHECK(init(NULL, NULL, NULL, NULL, "-1") == -1);
    CHECK(init(NULL, NULL, NULL, bad, NULL) == -1);
    CHECK(init(NULL, NULL, bad, NULL, NULL) == -1);
    CHECK(init("debug", "json", NULL, "off", "65536") == 0);
    CHECK(!log_access_on());
    CHECK(init("error", "text", NULL, "stderr", "268435456") == 0);
    CHECK(log_access_on());
    CHECK(init(NULL, NULL, NULL, NULL, NULL) == 0);
    CHECK(!log_access_on());
}

/* ---- JSON: escaping parsed back ---------------------------------------------- */

typedef struct esc_case {
    const char *in, *want; /* want: the msg as JSON gives it back (NULL: in) */
} esc_case;

#define FFFD "\xef\xbf\xbd"
static const esc_case esc_cases[] = {
    {"plain message", NULL},
    {"quote \" backslash \\ slash / brace } bracket ]", NULL},
    {"ctl \x01\x02\x1f del \x7f tab\t nl\n cr\r bs\b ff\f", NULL},
    {"utf8 \xc3\xa9 \xe2\x82\xac \xf0\x9d\x84\x9e \xf4\x8f\xbf\xbf", NULL},
    {"bad \xff\xfe|\xc3 |\xe2\x82 |\xc0\xaf|\xed\xa0\x80|\xf4\x90\x80\x80|\x80",
     "bad " FFFD FFFD "|" FFFD " |" FFFD FFFD " |" FFFD FFFD "|" FFFD FFFD FFFD
     "|" FFFD FFFD FFFD FFFD "|" FFFD},
    {"{\"injected\":true}\n{\"level\":\"error\"", NULL},
};

static void test_json(void)
{
    char path[128], big[10000], ctl[3001];
    char **lines;
    size_t n, ncase = sizeof esc_cases / sizeof esc_cases[0];
    path_of(path, sizeof path, "json.log");
    CHECK(init("debug", "json", path, NULL, NULL) == 0);
    for (size_t i = 0; i < ncase; i++)
        log_info("%s", esc_cases[i].in);
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    log_warn("%s", big);
    memset(ctl, 1, sizeof ctl - 1);
    ctl[sizeof ctl - 1] = '\0';
    log_error("%s", ctl);
    log_msg_ctx(LOG_DEBUG, "0123456789abcdef0123456789abcdef", 42, "with context %d", 7);
    log_msg_ctx(LOG_INFO, NULL, 0, "without context");
    log_msg_ctx(LOG_INFO, "rid\"\n", -1, "hostile rid");
    lines = read_lines(path, &n);
    CHECK(n == ncase + 5);
    for (size_t i = 0; i < n; i++) {
        json_t *j = parse(lines[i]);
        CHECK(j != NULL);
        CHECK(printable(lines[i]));
        if (!j) continue;
        CHECK(ts_ok(jstr(j, "ts")));
        CHECK(jstr(j, "component") && strcmp(jstr(j, "component"), "test") == 0);
        CHECK(jstr(j, "level") != NULL && jstr(j, "msg") != NULL);
        if (i < ncase) {
            const char *want = esc_cases[i].want ? esc_cases[i].want : esc_cases[i].in;
            CHECK(jstr(j, "msg") && strcmp(jstr(j, "msg"), want) == 0);
            if (jstr(j, "msg") && strcmp(jstr(j, "msg"), want) != 0)
                fprintf(stderr, "  case %zu: got %s\n", i, lines[i]);
            CHECK(strcmp(jstr(j, "level"), "info") == 0);
            CHECK(json_object_size(j) == 4);
        } else if (i == ncase) { /* cut, never past the line bound */
            CHECK(strcmp(jstr(j, "level"), "warn") == 0);
            CHECK(strlen(lines[i]) < 8192);
            CHECK(strlen(jstr(j, "msg")) > 3000);
            CHECK(strcmp(jstr(j, "msg") + strlen(jstr(j, "msg")) - 3, "...") == 0);
        } else if (i == ncase + 1) { /* 3000 escapes, cut between two of them */
            const char *m = jstr(j, "msg");
            size_t ml = strlen(m);
            CHECK(strlen(lines[i]) < 8192);
            CHECK(ml > 500 && strcmp(m + ml - 3, "...") == 0);
            for (size_t k = 0; k + 3 < ml; k++)
                CHECK(m[k] == 1);
        } else if (i == ncase + 2) {
            CHECK(strcmp(jstr(j, "level"), "debug") == 0);
            CHECK(strcmp(jstr(j, "msg"), "with context 7") == 0);
            CHECK(jstr(j, "request_id") &&
                  strcmp(jstr(j, "request_id"), "0123456789abcdef0123456789abcdef") == 0);
            CHECK(json_integer_value(json_object_get(j, "account_id")) == 42);
        } else if (i == ncase + 3) {
            CHECK(json_object_get(j, "request_id") == NULL);
            CHECK(json_object_get(j, "account_id") == NULL);
        } else {
            CHECK(jstr(j, "request_id") && strcmp(jstr(j, "request_id"), "rid\"\n") == 0);
            CHECK(json_object_get(j, "account_id") == NULL);
        }
        json_decref(j);
    }
    free_lines(lines);
}

/* ---- text: today's lines, made printable ------------------------------------- */

static void test_text(void)
{
    char path[128];
    char **lines;
    size_t n;
    path_of(path, sizeof path, "text.log");
    CHECK(init("warn", "text", path, NULL, NULL) == 0);
    log_info("below the level: not written");
    log_warn("routes reload failed: keeping the current routes");
    log_error("two\nlines \x01 and \xff, \"quoted\" \\ \xc3\xa9");
    log_msg_ctx(LOG_WARN, "abc", 9, "ctx");
    lines = read_lines(path, &n);
    CHECK(n == 3);
    if (n == 3) {
        /* "2024-05-01T12:34:56.789Z test warn: msg" */
        CHECK(strlen(lines[0]) > 25 && lines[0][24] == ' ');
        lines[0][24] = '\0';
        CHECK(ts_ok(lines[0]));
        CHECK(strcmp(lines[0] + 25,
                     "test warn: routes reload failed: keeping the current routes") == 0);
        CHECK(strcmp(lines[1] + 25,
                     "test error: two\\nlines \\x01 and \\xff, \"quoted\" \\ \xc3\xa9") == 0);
        CHECK(strcmp(lines[2] + 25, "test warn: ctx request_id=abc account_id=9") == 0);
        for (size_t i = 0; i < n; i++)
            CHECK(printable(lines[i]));
    }
    free_lines(lines);
}

/* ---- the writer: order, counts ------------------------------------------------ */

#define ORDER_THREADS 3
#define ORDER_LINES 20000

static void *order_thread(void *arg)
{
    long t = (long)arg;
    for (int i = 0; i < ORDER_LINES; i++)
        log_info("order %ld %d", t, i);
    return NULL;
}

static void test_order(void)
{
    char path[128];
    char **lines;
    size_t n;
    pthread_t th[ORDER_THREADS];
    int next[ORDER_THREADS] = {0};
    unsigned long long w0, d0;
    int bad = 0;
    path_of(path, sizeof path, "order.log");
    /* Large enough that a regular file never makes the writer drop. */
    CHECK(init("info", "text", path, NULL, "67108864") == 0);
    w0 = log_written(LOG_SINK_LOG);
    d0 = log_dropped(LOG_SINK_LOG);
    CHECK(log_start() == 0);
    for (long t = 0; t < ORDER_THREADS; t++)
        pthread_create(&th[t], NULL, order_thread, (void *)t);
    for (int t = 0; t < ORDER_THREADS; t++)
        pthread_join(th[t], NULL);
    log_stop();
    lines = read_lines(path, &n);
    CHECK(n == ORDER_THREADS * ORDER_LINES);
    CHECK(log_written(LOG_SINK_LOG) - w0 == n);
    CHECK(log_dropped(LOG_SINK_LOG) == d0);
    for (size_t i = 0; i < n; i++) {
        const char *p = strstr(lines[i], "test info: order ");
        long t;
        int k;
        if (!p || sscanf(p, "test info: order %ld %d", &t, &k) != 2 || t < 0 ||
            t >= ORDER_THREADS || k != next[t]) {
            bad++;
            continue;
        }
        next[t]++;
    }
    CHECK(bad == 0);
    for (int t = 0; t < ORDER_THREADS; t++)
        CHECK(next[t] == ORDER_LINES);
    /* Synchronous again after log_stop. */
    log_info("after stop");
    free_lines(lines);
    lines = read_lines(path, &n);
    CHECK(n == ORDER_THREADS * ORDER_LINES + 1 && strstr(lines[n - 1], "after stop"));
    free_lines(lines);
}

/* ---- a sink that does not keep up: callers drop, never wait ------------------- */

typedef struct reader {
    int fd;
    atomic_int done;
    char *buf;
    size_t len, cap;
} reader;

static void *reader_run(void *arg)
{
    reader *r = arg;
    for (;;) {
        struct pollfd p = {.fd = r->fd, .events = POLLIN};
        int rc = poll(&p, 1, 300);
        ssize_t k;
        if (rc == 0 && atomic_load(&r->done)) break;
        if (rc <= 0) continue;
        if (r->len + 65536 > r->cap) {
            char *grown = realloc(r->buf, r->cap ? r->cap * 2 : 1 << 20);
            if (!grown) break;
            r->buf = grown;
            r->cap = r->cap ? r->cap * 2 : 1 << 20;
        }
        k = read(r->fd, r->buf + r->len, 65536);
        if (k > 0) r->len += (size_t)k;
        if (k == 0) break;
    }
    return NULL;
}

#define DROP_LINES 20000

static void test_drop(void)
{
    char path[128], pad[101];
    reader rd = {.fd = -1};
    pthread_t th;
    unsigned long long d0, w0, dropped, seen = 0, reports = 0, written;
    int last = -1, ordered = 1;
    path_of(path, sizeof path, "fifo");
    CHECK(mkfifo(path, 0600) == 0);
    /* The read end first, so that opening the write end does not wait. */
    rd.fd = open(path, O_RDONLY | O_NONBLOCK);
    CHECK(rd.fd >= 0);
    CHECK(init("info", "text", path, NULL, "65536") == 0);
    d0 = log_dropped(LOG_SINK_LOG);
    w0 = log_written(LOG_SINK_LOG);
    CHECK(log_start() == 0);
    memset(pad, 'x', 100);
    pad[100] = '\0';
    /* Nobody reads: the FIFO (64 KiB) and the buffer (64 KiB) fill up, the
     * writer blocks in write(2) and the rest is dropped. A caller that
     * waited would hang here (the alarm ends the test). */
    alarm(60);
    for (int i = 0; i < DROP_LINES; i++)
        log_info("drop %d %s", i, pad);
    alarm(0);
    dropped = log_dropped(LOG_SINK_LOG) - d0;
    CHECK(dropped > 0);
    CHECK(dropped < DROP_LINES);
    /* Now read it all: log_stop writes what is buffered. */
    pthread_create(&th, NULL, reader_run, &rd);
    log_stop();
    atomic_store(&rd.done, 1);
    pthread_join(th, NULL);
    written = log_written(LOG_SINK_LOG) - w0;
    for (char *p = rd.buf, *end = rd.buf + rd.len; p && p < end;) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *m;
        int k;
        if (!nl) break;
        *nl = '\0';
        if ((m = strstr(p, "test info: drop ")) && sscanf(m, "test info: drop %d", &k) == 1) {
            if (k <= last) ordered = 0;
            last = k;
            seen++;
        } else if (strstr(p, "log lines and 0 access lines dropped")) {
            reports++;
        }
        p = nl + 1;
    }
    CHECK(ordered);
    /* Every line is either written, in order, or counted as dropped. */
    CHECK(seen + (log_dropped(LOG_SINK_LOG) - d0) == DROP_LINES);
    CHECK(seen > 0);
    /* The writer's own report and log_stop's summary say how many. */
    CHECK(reports >= 1);
    CHECK(written >= seen);
    free(rd.buf);
    CHECK(init(NULL, NULL, NULL, NULL, NULL) == 0); /* closes the FIFO's write end */
    close(rd.fd);
}

/* ---- the access log ----------------------------------------------------------- */

static const char *access_keys[] = {"ts",      "request_id", "account_id", "key_id",
                                    "route",   "method",     "path",       "status",
                                    "charged", "outcome",    "total_ms",   "upstream_ms",
                                    "wait_ms", "bytes_in",   "bytes_out"};

static void test_access(void)
{
    char path[128], lpath[128];
    char **lines;
    size_t n;
    struct stat st;
    log_access_rec full = {"0123456789abcdef0123456789abcdef",
                           17,
                           "a1b2c3d4e5f6",
                           "devices",
                           "GET",
                           "/v1/devices/42",
                           200,
                           3,
                           "charged",
                           12.5,
                           10.25,
                           0.0,
                           120,
                           4096};
    log_access_rec none = {"ffffffffffffffffffffffffffffffff",
                           0,
                           NULL,
                           NULL,
                           "POST",
                           "/x\"y\\z\x01\xff",
                           401,
                           0,
                           "unauthorized",
                           0.1234,
                           0,
                           0,
                           0,
                           57};
    path_of(path, sizeof path, "access.log");
    path_of(lpath, sizeof lpath, "access-side.log");
    umask(022);
    CHECK(init("info", "text", lpath, "off", NULL) == 0);
    CHECK(!log_access_on());
    log_access(&full); /* nothing, nowhere */
    CHECK(init("info", "text", lpath, path, NULL) == 0);
    CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0640);
    CHECK(log_access_on());
    log_access(&full);
    log_access(&none);
    CHECK(log_start() == 0);
    for (int i = 0; i < 1000; i++) {
        char rid[40];
        log_access_rec r = full;
        snprintf(rid, sizeof rid, "%032d", i);
        r.request_id = rid;
        log_access(&r);
    }
    log_stop();
    lines = read_lines(path, &n);
    CHECK(n == 1002);
    for (size_t i = 0; i < n; i++) {
        json_t *j = parse(lines[i]);
        CHECK(j != NULL);
        CHECK(printable(lines[i]));
        if (!j) continue;
        CHECK(json_object_size(j) == sizeof access_keys / sizeof access_keys[0]);
        for (size_t k = 0; k < sizeof access_keys / sizeof access_keys[0]; k++)
            CHECK(json_object_get(j, access_keys[k]) != NULL);
        CHECK(ts_ok(jstr(j, "ts")));
        if (i == 0) {
            CHECK(strcmp(jstr(j, "request_id"), full.request_id) == 0);
            CHECK(json_integer_value(json_object_get(j, "account_id")) == 17);
            CHECK(strcmp(jstr(j, "key_id"), "a1b2c3d4e5f6") == 0);
            CHECK(strcmp(jstr(j, "route"), "devices") == 0);
            CHECK(strcmp(jstr(j, "method"), "GET") == 0);
            CHECK(strcmp(jstr(j, "path"), "/v1/devices/42") == 0);
            CHECK(json_integer_value(json_object_get(j, "status")) == 200);
            CHECK(json_integer_value(json_object_get(j, "charged")) == 3);
            CHECK(strcmp(jstr(j, "outcome"), "charged") == 0);
            CHECK(json_real_value(json_object_get(j, "total_ms")) == 12.5);
            CHECK(json_real_value(json_object_get(j, "upstream_ms")) == 10.25);
            CHECK(json_number_value(json_object_get(j, "wait_ms")) == 0);
            CHECK(json_integer_value(json_object_get(j, "bytes_in")) == 120);
            CHECK(json_integer_value(json_object_get(j, "bytes_out")) == 4096);
        } else if (i == 1) {
            CHECK(json_is_null(json_object_get(j, "account_id")));
            CHECK(json_is_null(json_object_get(j, "key_id")));
            CHECK(json_is_null(json_object_get(j, "route")));
            CHECK(strcmp(jstr(j, "path"), "/x\"y\\z\x01" FFFD) == 0);
            CHECK(json_real_value(json_object_get(j, "total_ms")) == 0.123);
        } else {
            char rid[40];
            snprintf(rid, sizeof rid, "%032d", (int)i - 2);
            CHECK(jstr(j, "request_id") && strcmp(jstr(j, "request_id"), rid) == 0);
        }
        json_decref(j);
    }
    free_lines(lines);
    /* The log went to its own file, the access lines not with it. */
    lines = read_lines(lpath, &n);
    CHECK(n == 0);
    free_lines(lines);
}

/* ---- reopen after a rename (logrotate) -------------------------------------- */

static int count_in(const char *path, const char *what)
{
    size_t n;
    char **l = read_lines(path, &n);
    int k = 0;
    for (size_t i = 0; i < n; i++)
        k += strstr(l[i], what) != NULL;
    free_lines(l);
    return k;
}

static void test_reopen(void)
{
    char lp[128], ap[128], lp1[128], ap1[128], lp2[128], ap2[128];
    log_access_rec r = {"0123456789abcdef0123456789abcdef",
                        1,
                        "k",
                        "r",
                        "GET",
                        "/a",
                        200,
                        1,
                        "charged",
                        1,
                        1,
                        0,
                        1,
                        1};
    struct stat st;
    path_of(lp, sizeof lp, "r.log");
    path_of(ap, sizeof ap, "r-access.log");
    path_of(lp1, sizeof lp1, "r.log.1");
    path_of(ap1, sizeof ap1, "r-access.log.1");
    path_of(lp2, sizeof lp2, "r.log.2");
    path_of(ap2, sizeof ap2, "r-access.log.2");
    CHECK(init("info", "text", lp, ap, NULL) == 0);
    log_info("first");
    r.path = "/first";
    log_access(&r);
    /* Synchronous: reopens at once. */
    CHECK(rename(lp, lp1) == 0 && rename(ap, ap1) == 0);
    log_reopen();
    CHECK(stat(ap, &st) == 0 && (st.st_mode & 0777) == 0640);
    log_info("second");
    r.path = "/second";
    log_access(&r);
    /* Through the writer: on its next pass. */
    CHECK(log_start() == 0);
    CHECK(rename(lp, lp2) == 0 && rename(ap, ap2) == 0);
    log_reopen();
    for (int i = 0; i < 200 && (stat(lp, &st) != 0 || stat(ap, &st) != 0); i++)
        usleep(10000);
    CHECK(stat(lp, &st) == 0 && stat(ap, &st) == 0);
    log_info("third");
    r.path = "/third";
    log_access(&r);
    log_stop();
    CHECK(count_in(lp1, "first") == 1 && count_in(lp1, "second") == 0);
    CHECK(count_in(ap1, "/first") == 1 && count_in(ap1, "/second") == 0);
    CHECK(count_in(lp2, "second") == 1 && count_in(lp2, "third") == 0);
    CHECK(count_in(ap2, "/second") == 1 && count_in(ap2, "/third") == 0);
    CHECK(count_in(lp, "third") == 1 && count_in(ap, "/third") == 1);
}

/* ---- two sinks on one descriptor: lines stay whole ---------------------------- */

#define MIX_LINES 20000

static void *mix_access(void *arg)
{
    log_access_rec r = {"0123456789abcdef0123456789abcdef",
                        5,
                        "abcdefabcdef",
                        "route-x",
                        "GET",
                        "/some/path/of/a/decent/length",
                        200,
                        1,
                        "charged",
                        1.5,
                        1.0,
                        0,
                        99,
                        1234};
    (void)arg;
    for (int i = 0; i < MIX_LINES; i++)
        log_access(&r);
    return NULL;
}

static void test_shared_fd(void)
{
    char path[128];
    char **lines;
    size_t n, bad = 0;
    int saved = dup(2), fd;
    pthread_t th;
    unsigned long long d0 = log_dropped(LOG_SINK_LOG) + log_dropped(LOG_SINK_ACCESS);
    unsigned long long w0 = log_written(LOG_SINK_LOG) + log_written(LOG_SINK_ACCESS);
    path_of(path, sizeof path, "stderr.log");
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0 && saved >= 0);
    fflush(stderr);
    dup2(fd, 2);
    close(fd);
    /* Small rings: they wrap many times. */
    CHECK(init("info", "json", "stderr", "stderr", "65536") == 0);
    CHECK(log_start() == 0);
    pthread_create(&th, NULL, mix_access, NULL);
    for (int i = 0; i < MIX_LINES; i++)
        log_info("a log line among access lines, number %d", i);
    pthread_join(th, NULL);
    log_stop();
    dup2(saved, 2);
    close(saved);
    lines = read_lines(path, &n);
    CHECK(n > MIX_LINES / 10);
    for (size_t i = 0; i < n; i++) {
        json_t *j = json_loads(lines[i], 0, NULL);
        if (!j || !jstr(j, "ts")) bad++;
        json_decref(j);
    }
    CHECK(bad == 0);
    if (bad) fprintf(stderr, "  %zu of %zu lines are not whole\n", bad, n);
    /* Every line of both sinks is written or dropped (the stop summary too). */
    CHECK(log_written(LOG_SINK_LOG) + log_written(LOG_SINK_ACCESS) - w0 == n);
    CHECK(n + log_dropped(LOG_SINK_LOG) + log_dropped(LOG_SINK_ACCESS) - d0 >= 2 * MIX_LINES);
    free_lines(lines);
}

static void test_limit(void)
{
    log_limit l = {0};
    int ok = 0;
    for (int i = 0; i < 25; i++)
        ok += log_limit_ok(&l, 5000, 10);
    CHECK(ok == 10 && l.suppressed == 15);
    CHECK(log_limit_ok(&l, 6000, 10) == 1 && l.suppressed == 0);
}

/* ---- what a line costs its caller (not a test) ----------------------------- */

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

typedef struct bench_arg {
    int n, access;
} bench_arg;

static void *bench_thread(void *arg)
{
    const bench_arg *b = arg;
    log_access_rec r = {"0123456789abcdef0123456789abcdef",
                        5,
                        "abcdefabcdef",
                        "devices",
                        "GET",
                        "/v1/devices/42/readings",
                        200,
                        1,
                        "charged",
                        1.5,
                        1.0,
                        0,
                        99,
                        1234};
    for (int i = 0; i < b->n; i++) {
        if (b->access)
            log_access(&r);
        else
            log_info("request %s: upstream connect to address %d failed: %s", r.request_id, i,
                     "Connection refused");
    }
    return NULL;
}

static void bench_round(const char *what, int threads, int access, int async)
{
    pthread_t th[8];
    bench_arg a = {200000, access};
    double t0;
    unsigned long long d0 = log_dropped(access ? LOG_SINK_ACCESS : LOG_SINK_LOG);
    if (async) log_start();
    t0 = now_s();
    for (int t = 0; t < threads; t++)
        pthread_create(&th[t], NULL, bench_thread, &a);
    for (int t = 0; t < threads; t++)
        pthread_join(th[t], NULL);
    printf("%-44s %d thread(s): %6.0f ns a line (dropped %llu of %d)\n", what, threads,
           (now_s() - t0) * 1e9 / a.n, log_dropped(access ? LOG_SINK_ACCESS : LOG_SINK_LOG) - d0,
           a.n * threads);
    if (async) log_stop();
}

static int bench(void)
{
    init("info", "text", "/dev/null", "/dev/null", NULL);
    bench_round("text line, synchronous, /dev/null", 1, 0, 0);
    bench_round("text line, writer thread, /dev/null", 1, 0, 1);
    bench_round("text line, writer thread, /dev/null", 2, 0, 1);
    bench_round("access line, writer thread, /dev/null", 1, 1, 1);
    bench_round("access line, writer thread, /dev/null", 2, 1, 1);
    init("info", "json", "/dev/null", "/dev/null", NULL);
    bench_round("json line, writer thread, /dev/null", 1, 0, 1);
    init("warn", "text", "/dev/null", "/dev/null", NULL);
    bench_round("info line below LOG_LEVEL=warn", 1, 0, 1);
    return 0;
}

int main(int argc, char **argv)
{
    snprintf(dir, sizeof dir, "/tmp/test_log.XXXXXX");
    if (argc > 1 && strcmp(argv[1], "bench") == 0) return bench();
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    test_bad_values();
    test_json();
    test_text();
    test_order();
    test_drop();
    test_access();
    test_reopen();
    test_shared_fd();
    test_limit();
    init(NULL, NULL, NULL, NULL, NULL);
    if (!getenv("KEEP_TEST_LOG")) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", dir);
    }
    if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
    return failures ? 1 : 0;
}
