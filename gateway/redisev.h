/* redisev.h: hiredis' async API on a libevent loop, without epoll churn.
 * Owns the events of one redisAsyncContext (freed with it by hiredis). Does
 * not own the context, its callbacks or any reconnection: hotclient.c does.
 *
 * hiredis' own libevent adapter (0.14) uses a one-shot read event, re-added
 * after every read, and adds/deletes a write event around every write:
 * about four epoll_ctl calls per batch of replies. Here the read event is
 * persistent, and a write is first tried from a deferred event at the end of
 * the current loop pass (so all commands issued in one pass go out in one
 * send); only a write that cannot finish (or a connect in progress) waits
 * for EV_WRITE. */
#ifndef GATEWAY_REDISEV_H
#define GATEWAY_REDISEV_H

#include <event2/event.h>
#include <hiredis/async.h>

/* Attaches AC (just created, not yet attached) to BASE. WRITING is a flag
 * owned by the caller, set while a write runs: it outlives the context,
 * which a write may free. 0 on success, -1 (nothing attached) otherwise. */
int redisev_attach(struct event_base *base, redisAsyncContext *ac, int *writing);

#endif
