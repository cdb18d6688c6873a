/* resolve.c: see resolve.h. */
#include "gateway/resolve.h"

#include "billing/log.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

int resolve_is_numeric(const char *host)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

int resolve_host(const char *host, char *out, size_t cap)
{
    struct addrinfo hints, *res = NULL;
    const void *addr;
    int rc = -1, err;

    if (resolve_is_numeric(host)) {
        if (strlen(host) >= cap) return -1;
        memcpy(out, host, strlen(host) + 1);
        return 0;
    }
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    err = getaddrinfo(host, NULL, &hints, &res);
    if (err != 0) {
        log_error("cannot resolve %s: %s", host, gai_strerror(err));
        goto out;
    }
    addr = res->ai_family == AF_INET6
               ? (const void *)&((const struct sockaddr_in6 *)res->ai_addr)->sin6_addr
               : (const void *)&((const struct sockaddr_in *)res->ai_addr)->sin_addr;
    if (!inet_ntop(res->ai_family, addr, out, (socklen_t)cap)) {
        log_error("cannot format the address of %s", host);
        goto out;
    }
    log_info("resolved %s to %s (once: a new address needs a restart)", host, out);
    rc = 0;
out:
    if (res) freeaddrinfo(res);
    return rc;
}
