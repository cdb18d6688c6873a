/* redisev.c: see redisev.h. */
#include "gateway/redisev.h"

#include <stdlib.h>

typedef struct redisev {
    redisAsyncContext *ac;
    int *writing;
    struct event *rev; /* persistent */
    struct event *wev; /* one-shot: the socket is writable again */
    struct event *flush;
    int reading;
} redisev;

static void redisev_on_read(evutil_socket_t fd, short what, void *arg)
{
    redisev *e = arg;
    redisAsyncHandleRead(e->ac); /* may free E (disconnect) */
}

static void redisev_on_write(evutil_socket_t fd, short what, void *arg)
{
    redisev *e = arg;
    int *writing = e->writing;
    *writing = 1;                 /* a write that does not finish now waits for EV_WRITE */
    redisAsyncHandleWrite(e->ac); /* may free E */
    *writing = 0;
}

static void redisev_add_read(void *priv)
{
    redisev *e = priv;
    if (e->reading) return;
    if (event_add(e->rev, NULL) == 0) e->reading = 1;
}

static void redisev_del_read(void *priv)
{
    redisev *e = priv;
    if (!e->reading) return;
    event_del(e->rev);
    e->reading = 0;
}

static void redisev_add_write(void *priv)
{
    redisev *e = priv;
    if (*e->writing || !(e->ac->c.flags & REDIS_CONNECTED))
        event_add(e->wev, NULL);
    else if (!event_pending(e->flush, EV_TIMEOUT, NULL))
        event_active(e->flush, EV_TIMEOUT, 0);
}

static void redisev_del_write(void *priv)
{
    redisev *e = priv;
    event_del(e->wev);
    event_del(e->flush);
}

static void redisev_cleanup(void *priv)
{
    redisev *e = priv;
    if (e->rev) event_free(e->rev);
    if (e->wev) event_free(e->wev);
    if (e->flush) event_free(e->flush);
    free(e);
}

int redisev_attach(struct event_base *base, redisAsyncContext *ac, int *writing)
{
    redisev *e;
    if (ac->ev.data) return -1;
    e = calloc(1, sizeof *e);
    if (!e) return -1;
    e->ac = ac;
    e->writing = writing;
    e->rev = event_new(base, ac->c.fd, EV_READ | EV_PERSIST, redisev_on_read, e);
    e->wev = event_new(base, ac->c.fd, EV_WRITE, redisev_on_write, e);
    e->flush = event_new(base, -1, 0, redisev_on_write, e);
    if (!e->rev || !e->wev || !e->flush || event_add(e->wev, NULL) != 0) {
        redisev_cleanup(e);
        return -1;
    }
    ac->ev.data = e;
    ac->ev.addRead = redisev_add_read;
    ac->ev.delRead = redisev_del_read;
    ac->ev.addWrite = redisev_add_write;
    ac->ev.delWrite = redisev_del_write;
    ac->ev.cleanup = redisev_cleanup;
    /* As hiredis' adapter: the connect completes when writable (WEV above). */
    redisev_add_read(e);
    return 0;
}
