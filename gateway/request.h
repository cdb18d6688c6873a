/* request.h: the life of one client request, as a state machine driven by
 * the server (server.c: head, body, client gone), Redis replies, upstream
 * completion and timers, all on the worker's loop. Owns the request's
 * memory, its hold (reserve/settle) and what its answer says. Does not own
 * any connection, the HTTP framing of the answer (server.c) or the loop
 * (worker.c). */
#ifndef GATEWAY_REQUEST_H
#define GATEWAY_REQUEST_H

#include "gateway/server.h"

struct worker;
typedef struct gw_request gw_request;

/* C's request head is in (server_method, server_target, server_header):
 * the checks that need nothing else. Returns the request, which then waits
 * for request_body_done; or NULL, either because it already answered
 * (server_reply_send was called, the request is freed) or out of memory
 * (nothing answered). */
gw_request *request_head(struct worker *w, server_conn *c);
/* The body is in (server_body): authenticate, reserve, proxy, settle. The
 * request answers through server_reply_send, now or later, and then frees
 * itself. */
void request_body_done(gw_request *r);
/* The client left while the request was in flight: abort the upstream call
 * and release the hold (cost 0). The request still answers (the server
 * drops the answer). */
void request_gone(gw_request *r);
/* The server closes the connection of a request that has not answered
 * (body never completed, worker teardown): free it without an answer. */
void request_discard(gw_request *r);
/* Shutdown past its grace: fail every suspended request now (holds released). */
void request_abort_all(struct worker *w);

#endif
