/* spill.h: durable spill files of settles and lease ops that Redis did not
 * take, and their replay at the next start.
 * Owns the files in GATEWAY_SPILL_DIR: writing one per worker and process
 * run (an overflow of the resend queue while running, then whatever is
 * undelivered when a graceful stop's drain times out), their fsync, and
 * their replay through a worker's hotclient, idempotently by reservation
 * id and lease seq (settle.lua's outcome `late`, lease.lua's close `late`:
 * docs/ARCHITECTURE.md). Does not decide what is undelivered (hotclient.c
 * and lease.c hand it over).
 *
 * A file is `spill-<pid>-<worker>-<ms>.log`, text, one item a line:
 *   S <rid> <account> <charge> <late|release> <status>
 *   L <account> <lid> <seq> <charge> <n>  then n lines `R <field>`: the op's
 *                                         outbox fields ("c", then a record)
 *   C <account> <lid> <seq>                    the op that closes the lease
 * It is created under a temporary name, locked (flock) and renamed, so a
 * replayer never sees it unlocked before it is complete; a replayer takes
 * the same lock (two gateways sharing the directory never both replay a
 * file) and deletes the file only once Redis answered every item in it. A
 * line cut short by a crash (no newline) is ignored. */
#ifndef GATEWAY_SPILL_H
#define GATEWAY_SPILL_H

#include "gateway/hotclient.h"

#include <event2/event.h>
#include <stddef.h>
#include <stdint.h>

typedef struct spill_file spill_file;
typedef struct spill_replay spill_replay;

/* A writer for DIR; the file is created on the first append. TAG names the
 * writer (the worker's index). NULL when out of memory. */
spill_file *spill_file_new(const char *dir, int tag);
/* Each appends one item with a single write(2) (in the page cache at once:
 * a crash of the process does not lose it; spill_file_close fsyncs).
 * 0, or -1 after logging (the item is then lost: logged with its rid). */
int spill_settle(spill_file *f, const hot_settle_args *a);
int spill_lease_op(spill_file *f, int64_t account, const char *lid, int64_t seq, int64_t charge,
                   int nrec, const char *const *recs, const size_t *lens);
int spill_lease_close(spill_file *f, int64_t account, const char *lid, int64_t seq);
/* Items written so far. */
long spill_count(const spill_file *f);
/* fsyncs the file and the directory, unlocks and frees. 0, or -1 if a sync
 * failed (logged). F may be NULL. */
int spill_file_close(spill_file *f);

/* Hands F's file over to a replay of its own (*OUT; NULL if F wrote
 * nothing): its lock and descriptor move with it, and F's next append
 * creates a new file. For a worker that spilled while running and whose
 * Redis is back. Reads the file back (page cache): short. */
int spill_file_handoff(spill_file *f, spill_replay **out);
/* Loads every spill file of DIR that no other process holds (creating DIR
 * if missing); blocking file I/O: call before the loop runs. *OUT is NULL
 * when there is nothing to replay. -1 on a fatal error (logged). */
int spill_replay_load(const char *dir, spill_replay **out);
/* Replays through HC on BASE's loop as soon as Redis answers, in the
 * files' order; deletes each file once all its items were answered. */
int spill_replay_start(spill_replay *r, struct event_base *base, hotclient *hc);
/* Items not yet answered (the drain waits for them while Redis is up). */
long spill_replay_left(const spill_replay *r);
/* Sends no more (stop); callbacks of items in flight may still run. */
void spill_replay_stop(spill_replay *r);
/* After hotclient_free (whose callbacks may still reach it): files not
 * finished stay, unlocked, for the next start. R may be NULL. */
void spill_replay_free(spill_replay *r);

#endif
