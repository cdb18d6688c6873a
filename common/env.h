/* env.h: reading configuration from the environment, with bounds.
 * Owns parsing and validation of single values; each binary owns which
 * variables it reads. Every getter reports a bad value instead of guessing. */
#ifndef POINTGATE_ENV_H
#define POINTGATE_ENV_H

#include <stdint.h>

/* The value of NAME, or DEF when unset or empty. Never fails. */
const char *env_str(const char *name, const char *def);

/* NAME as an integer in [min, max], DEF when unset. Returns 0, or -1 (and
 * logs) when set but not a number in range. */
int env_int64(const char *name, int64_t def, int64_t min, int64_t max, int64_t *out);

/* Parses a decimal int64 with no trailing garbage; -1 on any error. */
int env_parse_int64(const char *s, int64_t *out);

/* Splits "host:port" into host (at most hostlen-1 chars) and port. -1 if malformed. */
int env_parse_hostport(const char *s, char *host, unsigned hostlen, int *port);

#endif
