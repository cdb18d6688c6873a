/* log.h: one-line structured logs, shared by every binary: the log (stderr,
 * or LOG_FILE) and the access log (ACCESS_LOG), written by one writer
 * thread off the callers' threads once log_start has run.
 * Owns formatting, escaping, the bounded buffers and the writer; callers
 * decide what is worth logging and must never pass secrets (API keys,
 * tokens, passwords) to it. Messages may hold client-controlled bytes: they
 * are escaped (JSON) or made printable (text), never written raw. */
#ifndef POINTGATE_LOG_H
#define POINTGATE_LOG_H

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

/* Set once at start from LOG_LEVEL (debug|info|warn|error), LOG_FORMAT
 * (text|json), ACCESS_LOG (off|stderr|PATH), LOG_FILE (unset: stderr) and
 * LOG_BUFFER_BYTES (65536..268435456, default 1048576); configuration.
 * Until log_start, lines are written at once (start-up errors, CLI
 * commands). -1 (with a message on stderr) when a variable has a bad value
 * or a file cannot be opened. May be called again while not started. */
int log_init(const char *component);
/* Starts the writer thread: from then on a line is copied into a bounded
 * buffer and written off the caller's thread; when the buffer is full the
 * line is dropped and counted (log_dropped), never waited for. -1 if the
 * thread cannot start (lines then stay synchronous). */
int log_start(void);
/* Writes what is buffered and joins the writer (at exit); lines are
 * synchronous again afterwards. A sink that stays blocked for 5 s is given
 * up on: log_stop returns and what it holds is lost. */
void log_stop(void);
/* Asks the writer to reopen ACCESS_LOG's file (and LOG_FILE's, if set) on
 * its next pass: logrotate's SIGHUP/SIGUSR1. Any thread; never blocks on
 * I/O (before log_start it reopens at once). Not async-signal-safe: call it
 * from a sigwait loop, not from a signal handler. */
void log_reopen(void);

enum log_sink { LOG_SINK_LOG, LOG_SINK_ACCESS, LOG_SINKS };
/* Lines dropped because the sink could not keep up (or failed), since the start. */
unsigned long long log_dropped(enum log_sink sink);
/* Lines written, since the start. */
unsigned long long log_written(enum log_sink sink);

/* pointgate_log_lines_total{sink} and pointgate_log_lines_dropped_total{sink}
 * (family and sample lines) into a scrape's text (common/metrics.h). */
struct promtext;
void log_metrics(struct promtext *p);

void log_msg(enum log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The same with the request's id (NULL: none) and account (<= 0: none) as
 * their own fields (`request_id`, `account_id` in JSON). */
void log_msg_ctx(enum log_level lvl, const char *request_id, long long account_id, const char *fmt,
                 ...) __attribute__((format(printf, 4, 5)));

/* One call, for the access log (one JSON line each; nothing when
 * ACCESS_LOG=off: check log_access_on() first to skip building it). */
typedef struct log_access_rec {
    const char *request_id; /* 32 hex */
    long long account_id;   /* <= 0: unknown (no key, bad key) */
    const char *key_id;     /* NULL: none */
    const char *route;      /* route id, NULL: none */
    const char *method;
    const char *path; /* the normalised target, no query; NULL: none */
    int status;
    long long charged;   /* points */
    const char *outcome; /* the metrics' outcome label */
    double total_ms, upstream_ms, wait_ms;
    long long bytes_in, bytes_out;
} log_access_rec;
int log_access_on(void);
void log_access(const log_access_rec *r);

/* A bound on lines that outsiders can cause (clients disconnecting): at
 * most PER_SEC lines a second pass one limiter; the rest are counted, and
 * the first line let through in a later second is preceded by one saying
 * how many were suppressed. The state is the caller's (one per worker
 * thread, zeroed to start): no lock, and a suppressed line costs no I/O. */
typedef struct log_limit {
    unsigned long long second; /* the current window, in seconds of NOW_MS */
    unsigned n;                /* lines let through in it */
    unsigned long suppressed;  /* lines refused since the last report */
} log_limit;
/* 1: the caller may log its line now; 0: it is suppressed (counted). */
int log_limit_ok(log_limit *l, unsigned long long now_ms, unsigned per_sec);

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
