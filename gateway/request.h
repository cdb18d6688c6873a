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
/* The body is in (server_body): authenticate, reserve, proxy, settle (an
 * early request: proxy, settle). The request answers through
 * server_reply_send, now or later, and then frees itself. */
void request_body_done(gw_request *r);
/* C's body is not here yet: authenticate and reserve first, without it.
 * Once the request holds its price it calls server_want_body (and the
 * server, having read the body, request_body_done); or it answers without
 * the body (401, 402, 503, ...). */
void request_early(gw_request *r);
/* The client left (close, reset or half-close). A call already written to
 * the upstream runs on to its answer or timeout and is settled by it (the
 * server drops the answer); anything earlier is dropped and its hold
 * released (cost 0). Either way the request answers, now or later. */
void request_gone(gw_request *r);
/* The server closes the connection of a request that has not answered
 * (body never completed, worker teardown): free it without an answer. */
void request_discard(gw_request *r);
/* Shutdown past its grace: fail every suspended request that has not been
 * written to the upstream (holds released, cost 0). Calls at the upstream
 * go on to their answer or timeout: the drain waits for them. */
void request_abort_all(struct worker *w);
/* Worker teardown (the loop has stopped): fail every suspended request,
 * upstream calls included, and free the per-worker request state. */
void request_teardown(struct worker *w);

#endif
