/* resolve.c: see resolve.h. */
#include "gateway/resolve.h"

#include "common/log.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

int resolve_is_numeric(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

int resolve_addrs(const char *host, int port, struct sockaddr_storage *addrs, socklen_t *lens,
                  int max)
{
    struct addrinfo hints, *res = NULL;
    char serv[16];
    int n = 0, err;

    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    snprintf(serv, sizeof serv, "%d", port);
    err = getaddrinfo(host, serv, &hints, &res);
    if (err != 0) {
        log_error("cannot resolve %s: %s", host, gai_strerror(err));
        return -1;
    }
    for (const struct addrinfo *ai = res; ai && n < max; ai = ai->ai_next) {
        if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
            ai->ai_addrlen > sizeof addrs[0])
            continue;
        memcpy(&addrs[n], ai->ai_addr, ai->ai_addrlen);
        lens[n++] = ai->ai_addrlen;
    }
    freeaddrinfo(res);
    if (n == 0) log_error("cannot resolve %s: no IPv4 or IPv6 address", host);
    return n > 0 ? n : -1;
}

int resolve_host(const char *host, char *out, size_t cap)
{
    struct sockaddr_storage a;
    socklen_t len;
    const void *ip;

    if (resolve_is_numeric(host)) {
        if (strlen(host) >= cap) return -1;
        memcpy(out, host, strlen(host) + 1);
        return 0;
    }
    if (resolve_addrs(host, 0, &a, &len, 1) != 1) return -1;
    ip = a.ss_family == AF_INET6 ? (const void *)&((const struct sockaddr_in6 *)&a)->sin6_addr
                                 : (const void *)&((const struct sockaddr_in *)&a)->sin_addr;
    if (!inet_ntop(a.ss_family, ip, out, (socklen_t)cap)) {
        log_error("cannot format the address of %s", host);
        return -1;
    }
    log_info("resolved %s to %s (once: a new address needs a restart)", host, out);
    return 0;
}
