/* log.h: one-line structured logs to stderr, shared by every binary.
 * Owns formatting only; callers decide what is worth logging and must never
 * pass secrets (API keys, tokens, passwords) to it. */
#ifndef POINTGATE_LOG_H
#define POINTGATE_LOG_H

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

/* Set once at start from LOG_LEVEL (debug|info|warn|error); configuration. */
void log_init(const char *component);
void log_msg(enum log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
