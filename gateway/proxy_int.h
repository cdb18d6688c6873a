/* proxy_int.h: what proxy.c and proxy_msg.c share, and nothing else
 * includes: the bounds, and the message side of a call that the
 * connection side calls into. See proxy.h for the interface. */
#ifndef GATEWAY_PROXY_INT_H
#define GATEWAY_PROXY_INT_H

#include "gateway/http1.h"
#include "gateway/proxy.h"

#define PROXY_HEADERS_MAX (64 * 1024)     /* response head, 1xx heads and trailers included */
#define PROXY_REQ_HEADERS_MAX (64 * 1024) /* request header lines from request.c */

/* Keeps a response header of C as "name\0value\0", unless it is one the
 * gateway writes itself or a hop-by-hop one. 0 or -1 (out of memory). */
int proxy_call_keep_header(proxy_call *c, const http1_event *ev);
/* The head is complete: drops the headers C's Connection headers name, and
 * those. Only when conn_listed. */
void proxy_call_drop_listed(proxy_call *c);
/* 1 if METHOD may be sent again after a failure (RFC 9110 9.2.2). */
int proxy_idempotent(const char *m);
/* "Content-Length: N\r\n\r\n" into OUT (48 bytes); its length. */
size_t proxy_length_tail(char *out, size_t n);

#endif
