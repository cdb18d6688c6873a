/* log.c: timestamped, levelled lines on stderr. Configuration is written once
 * at start-up (log_init) and only read afterwards, so no locking is needed;
 * each line is written with a single fprintf, which stdio serialises. */
#include "billing/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static enum log_level log_min = LOG_INFO;
static const char *log_component = "pointgate";

/* Placeholder of the contract in log.h, synchronous: the writer thread,
 * LOG_FORMAT and ACCESS_LOG come with the logging work. */
int log_init(const char *component)
{
    const char *lvl = getenv("LOG_LEVEL");
    log_component = component;
    if (!lvl) return 0;
    if (strcmp(lvl, "debug") == 0)
        log_min = LOG_DEBUG;
    else if (strcmp(lvl, "warn") == 0)
        log_min = LOG_WARN;
    else if (strcmp(lvl, "error") == 0)
        log_min = LOG_ERROR;
    return 0;
}

int log_start(void)
{
    return 0;
}

void log_stop(void) {}

void log_reopen(void) {}

unsigned long long log_dropped(enum log_sink sink)
{
    return 0;
}

unsigned long long log_written(enum log_sink sink)
{
    return 0;
}

int log_access_on(void)
{
    return 0;
}

void log_access(const log_access_rec *r) {}

void log_msg_ctx(enum log_level lvl, const char *request_id, long long account_id, const char *fmt,
                 ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    log_msg(lvl, "%s (request %s, account %lld)", msg, request_id ? request_id : "-", account_id);
}

void log_msg(enum log_level lvl, const char *fmt, ...)
{
    static const char *names[] = {"debug", "info", "warn", "error"};
    char msg[1024];
    char ts[32];
    struct timespec now;
    struct tm tm;
    va_list ap;

    if (lvl < log_min) return;
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s.%03ldZ %s %s: %s\n", ts, now.tv_nsec / 1000000, log_component, names[lvl],
            msg);
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
