/* log.h: one-line structured logs to stderr, shared by every binary.
 * Owns formatting only; callers decide what is worth logging and must never
 * pass secrets (API keys, tokens, passwords) to it. */
#ifndef POINTGATE_LOG_H
#define POINTGATE_LOG_H

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

/* Set once at start from LOG_LEVEL (debug|info|warn|error); configuration. */
void log_init(const char *component);
void log_msg(enum log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

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
