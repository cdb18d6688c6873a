/* forward.h: the trust boundary for headers, in both directions.
 *
 * Owns which of a client's headers reach the upstream and which headers the
 * gateway adds (X-Forwarded-For, X-Real-IP, X-Account-Id, X-Request-Id),
 * and which of the upstream's answer headers may reach the client. The
 * upstream trusts what the gateway says about the caller (account, request
 * id, address) and the client trusts what it says about the charge, so a
 * header the gateway sets is never passed through from the other side, in
 * any spelling: names compare ignoring case and with '-', '_' and every
 * other byte that is not a letter or digit the same, since servers that
 * map headers to variables (CGI, WSGI, Rack, PHP; lighttpd maps all of
 * them) read X_Account_Id or X.Account.Id as X-Account-Id. Does not own
 * the syntax of headers (the
 * server's parser and http1.c checked it) nor the request's framing. */
#ifndef GATEWAY_FORWARD_H
#define GATEWAY_FORWARD_H

#include "gateway/proxy.h"
#include "gateway/server.h"

#include <stdint.h>

/* Adds to CALL (zeroed, before proxy_start) the client's headers of C that
 * may go on, then X-Forwarded-For (the client's values joined in order, the
 * peer's address last), X-Real-IP (the peer), X-Account-Id (ACCOUNT) and
 * X-Request-Id (RID). 0, or -1 (out of memory, past the call's header
 * bound; logged with RID): nothing may be sent then. */
int forward_headers(const server_conn *c, proxy_call *call, int64_t account, const char *rid);

/* 1 if the upstream's answer header NAME may reach the client: not one the
 * gateway writes itself (X-Request-Id, X-Points-*, X-Billing-*), in any
 * spelling. */
int forward_response_header(const char *name);

#endif
