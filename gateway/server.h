/* server.h: the gateway's HTTP/1.1 server, on one worker's libevent loop.
 *
 * Owns the worker's listening socket (GATEWAY_LISTEN, SO_REUSEPORT: one per
 * worker), accepting within the connection limit, and each client
 * connection: reading and parsing request heads (http1req.c) and bodies
 * (http1.c: Content-Length or chunked, bounded by MAX_BODY_BYTES), the
 * protocol's own answers (400, 413, 417, 431, 501, 505, 100 Continue),
 * keep-alive and pipelining (one request at a time, in order), noticing a
 * client that goes away while its request is in flight, the connection
 * timeouts, and writing answers (status line, Date, framing, the request's
 * headers and body in one send). Does not own what a request means: at a
 * complete head it hands the connection to request.c (request_head), which
 * reads the head and body through the accessors below and answers through
 * server_reply_*. Single-threaded: used only by its worker's thread.
 *
 * Lifetime: pointers returned by the accessors stay valid until the answer
 * is sent (the input buffer is not moved while a request exists). The
 * connection outlives its request: after a client left, it stays (closed
 * for I/O, still counted against MAX_CONNECTIONS) until request.c answers
 * (for a call at the upstream: its answer or timeout), and the answer is
 * dropped.
 *
 * Bodies: one whose bytes are all here with the head is read at once and
 * handed over with request_body_done. Otherwise the request goes first
 * (request_early: key and reserve) while the socket is watched only for a
 * close; only when request.c calls server_want_body is 100 Continue sent
 * and the body read, within GATEWAY_BODY_TIMEOUT_MS in all (408 past it). */
#ifndef GATEWAY_SERVER_H
#define GATEWAY_SERVER_H

#include "gateway/config.h"

#include <event2/event.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct worker;
typedef struct server server;
typedef struct server_conn server_conn;

/* Binds and listens on CFG's GATEWAY_LISTEN (SO_REUSEPORT) and starts
 * accepting on W's loop. 0, or -1 after logging why. */
int server_new(struct worker *w, const gw_config *cfg, server **out);
/* Closes every connection (requests still attached are discarded with
 * request_discard) and the listener, and frees S. */
void server_free(server *s);
/* Graceful stop: no more accepting (the listening socket is closed), idle
 * keep-alive connections are closed, and every later answer closes its
 * connection. Requests in progress go on. */
void server_quiesce(server *s);
/* Connections with an answer still being written (drain waits for them). */
int server_writing(const server *s);

/* ---- the current request of C, for request.c ----------------------- */

const char *server_method(const server_conn *c);
/* The raw request target, as the client sent it (printable ASCII). */
const char *server_target(const server_conn *c);
/* The first header named NAME (ignoring case), NUL-terminated, or NULL. */
const char *server_header(const server_conn *c, const char *name);
/* Header I (0 <= I < server_header_count), in the order received. */
size_t server_header_count(const server_conn *c);
void server_header_at(const server_conn *c, size_t i, const char **name, const char **value);
/* The client's address (never NULL; family AF_UNSPEC if unknown). */
const struct sockaddr *server_peer(const server_conn *c);
/* The request body (de-chunked), complete once request_body_done ran. */
const char *server_body(const server_conn *c, size_t *len);

/* request_early's request holds its price (or carries an Idempotency-Key,
 * whose fingerprint needs the body before the reserve): send 100 Continue
 * (if asked for) and read the body, then request_body_done. From the loop,
 * never from inside this call. */
void server_want_body(server_conn *c);

/* ---- answering ------------------------------------------------------- */

/* Starts C's answer with STATUS; headers follow. Starts over if called
 * again before server_reply_send. Failures (out of memory) are remembered:
 * server_reply_send then closes the connection without an answer. */
void server_reply_begin(server_conn *c, unsigned status);
/* Adds "NAME: VALUE" (both already checked by the caller: our own names,
 * or an upstream's headers that http1.c checked). */
void server_reply_header(server_conn *c, const char *name, const char *value);
/* HEAD answers: the Content-Length to announce (the GET answer's), where
 * the body given to server_reply_send would be empty. */
void server_reply_length(server_conn *c, int64_t len);
/* Ends the answer with BODY[0..LEN) and sends it. BODY is copied unless
 * TAKE, in which case it was malloc'd and the server frees it (always,
 * even when the client is gone). The request is detached from C: the
 * server makes no more request_* calls for it. Content-Length, Date and
 * Connection are the server's: the caller adds none of them. */
void server_reply_send(server_conn *c, char *body, size_t len, int take);

#endif
