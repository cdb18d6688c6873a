/* server_int.h: what the server's two files share, and nothing else
 * includes: the bounds and timeouts, a connection (server_conn.c) and the
 * server that owns its lists (server.c). See server.h for the interface
 * request.c and worker.c use. */
#ifndef GATEWAY_SERVER_INT_H
#define GATEWAY_SERVER_INT_H

#include "common/buf.h"
#include "common/log.h"
#include "gateway/http1.h"
#include "gateway/http1req.h"
#include "gateway/server.h"

#include <event2/event_struct.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <time.h>

/* The whole request head (request line and headers), as MHD's connection
 * memory allowed before: past it, 431. */
#define SERVER_HEAD_MAX (16 * 1024)
#define SERVER_MAX_FIELDS 128
#define SERVER_BUF_MIN 4096
/* Free input space kept past a head before request.c sees it (the buffer
 * cannot move afterwards): room to read the body and to notice a client
 * that leaves, and for pipelined bytes. */
#define SERVER_ROOM 4096
#define SERVER_IDLE_TIMEOUT_MS 60000 /* a keep-alive connection between requests */
#define SERVER_IO_TIMEOUT_MS 30000   /* an answer being written must make progress */
#define SERVER_LINGER_MS 5000        /* draining a client's unread bytes before close */
#define SERVER_ACCEPT_BATCH 64       /* accepts per wake-up: others' events get a turn */
#define SERVER_COPY_BODY_MAX 16384   /* smaller bodies are copied behind the head: one send */
#define SERVER_KEEP_BODY_CAP 65536   /* larger body buffers are freed after their request */
#define SERVER_BACKOFF_MS 100        /* out of descriptors: pause accepting */
/* Requests answered from one connection's buffer before the others get a
 * turn: a client pipelining instant answers (404s) must not hold the loop. */
#define SERVER_BURST 32
/* Lines per worker per second about a client's misbehaviour (then a summary). */
#define SERVER_LOG_PER_SEC 10

enum server_state { CS_IDLE, CS_HEAD, CS_BODY, CS_BUSY, CS_WRITE, CS_LINGER };
/* Timeout lists; L_NONE (requests in flight, answers being written without
 * a partial write yet) has no deadline. */
enum server_list { L_IDLE, L_HEAD, L_IO, L_BODY, L_LINGER, L_NONE, L_COUNT };

struct server_conn {
    server *s;
    TAILQ_ENTRY(server_conn) link; /* in s->lists[list] */
    int list;
    uint64_t since_ms; /* when it entered that list */
    int fd;
    enum server_state state;
    struct event rev, wev;
    struct event cev; /* close watcher while reads are paused (see server_read_pause) */
    int reading;      /* rev is added */
    int watching;     /* cev is added */
    int eof;          /* no more bytes will come (closed, reset, or half-closed) */
    int gone;         /* the client left while its request was in flight */
    int in_cb;        /* inside a request_* call: server_reply_send only marks */
    int replied;      /* an answer is ready in out */
    int reply_failed;
    int close_after; /* this answer ends the connection */
    int body_unread; /* answered before the whole body was read */
    int head_req;    /* HEAD: the answer has no body */
    int want_body;   /* request.c holds the price of an early request: read its body */
    /* Input: the current request's head at [0, head_len), then unparsed
     * body bytes or pipelined requests. */
    char *in;
    size_t in_len, in_cap, scan, head_len, skip;
    http1req req;
    http1req_field fields[SERVER_MAX_FIELDS];
    struct gw_request *r;
    /* The body: de-chunked (bp), or Content-Length bytes (body_need). */
    int chunked;
    http1_parser bp;
    struct buf body; /* bounded at max_body */
    size_t body_need;
    /* The answer: head (and a small body) in out, a large body in wbody.
     * out has no bound of its own: what request.c writes into the head,
     * and a body only up to SERVER_COPY_BODY_MAX. */
    struct buf out;
    size_t out_sent;
    char *wbody;
    size_t wbody_len, wbody_sent;
    unsigned status;
    int64_t reply_length;
    struct sockaddr_storage peer;
};

struct server {
    struct worker *w;
    const gw_config *cfg;
    struct event_base *base;
    int lfd;
    struct event *lev;                                        /* listening socket readable */
    struct event *backoff;                                    /* re-enables lev after EMFILE */
    struct event *tick;                                       /* the timeout sweep */
    TAILQ_HEAD(server_conn_list, server_conn) lists[L_COUNT]; /* each ordered by since_ms */
    uint64_t timeout_ms[L_COUNT];
    int nconns, nwriting;
    int early_close; /* the backend reports a peer's close (EV_CLOSED) */
    int stopping;
    log_limit log; /* lines about clients (see SERVER_LOG_PER_SEC) */
    time_t date_s;
    char date[64];
    size_t date_len;
};

/* ---- server_conn.c, for server.c ---- */

/* Takes FD (accepted, non-blocking) as a new connection of S; closes FD
 * when out of memory. */
void server_conn_new(server *s, int fd, const struct sockaddr_storage *peer);
/* Closes C and frees it: no answer, whatever its state. */
void server_close(server_conn *c);
/* C's body deadline has passed (at NOW): 408, or closed. 0: C is gone. */
int server_body_timeout(server_conn *c, uint64_t now);

#endif
