/* resolve.h: host names to addresses, once, before the event loops run.
 * Owns nothing. getaddrinfo blocks, so the gateway resolves the names of
 * everything it connects to (upstream, Redis, Postgres) at startup and
 * connects to the addresses from then on: a reconnect never blocks a loop on
 * DNS. The trade-off: a dependency that moves to another address needs a
 * gateway restart. */
#ifndef GATEWAY_RESOLVE_H
#define GATEWAY_RESOLVE_H

#include <stddef.h>
#include <sys/socket.h>

/* The IPv4/IPv6 addresses of HOST:PORT in getaddrinfo's order, at most MAX
 * of them, into ADDRS/LENS. Returns how many (>= 1), or -1 (logged, naming
 * HOST) when there is none. */
int resolve_addrs(const char *host, int port, struct sockaddr_storage *addrs, socklen_t *lens,
                  int max);

/* The first address of HOST as numeric text into OUT (CAP bytes); a numeric
 * HOST is copied as is. 0 on success, -1 (logged) otherwise. */
int resolve_host(const char *host, char *out, size_t cap);

/* 1 if HOST is already a numeric IPv4 or IPv6 address. */
int resolve_is_numeric(const char *host);

#endif
