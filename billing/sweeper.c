/* sweeper.c: releases holds whose deadline has passed.
 *
 * A hold outlives its deadline only when the gateway that took it died (or
 * lost Redis) between reserve and settle: the call's outcome is unknown, and
 * unknown is not billable, so the hold is released at cost 0 through
 * settle.lua (outcome "expire"), which also records it in the outbox. Racing
 * a late settle from a live gateway is harmless: settle is idempotent by
 * reservation id and whichever runs first wins. Deadlines never move, so the
 * scan needs no atomicity with the release. */
#include "billing/hot.h"
#include "billing/hotkeys.h"
#include "billing/log.h"
#include "billing/workers.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void worker_sleep(atomic_int *stop, long ms)
{
    while (ms > 0 && !atomic_load(stop)) {
        long step = ms > 50 ? 50 : ms;
        struct timespec ts = {0, step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

/* Redis's own clock, the one the scripts stamp deadlines with. */
static int sweeper_now_ms(hot_conn *h, int64_t *now)
{
    const char *argv[1] = {"TIME"};
    redisReply *r = hot_command_argv(h, 1, argv, NULL);
    int rc = -1;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2) {
        *now = strtoll(r->element[0]->str, NULL, 10) * 1000 +
               strtoll(r->element[1]->str, NULL, 10) / 1000;
        rc = 0;
    }
    if (r) freeReplyObject(r);
    return rc;
}

/* Releases the expired holds of one account's deadline set. */
static int sweeper_account(hot_conn *h, const char *dlkey, int64_t now, int *released)
{
    const char *open = strchr(dlkey, '{');
    char nows[24];
    const char *argv[7];
    redisReply *r;
    int64_t account;
    int rc = 0;

    if (!open) return 0;
    account = strtoll(open + 1, NULL, 10);
    snprintf(nows, sizeof nows, "%" PRId64, now);
    argv[0] = "ZRANGEBYSCORE";
    argv[1] = dlkey;
    argv[2] = "-inf";
    argv[3] = nows;
    argv[4] = "LIMIT";
    argv[5] = "0";
    argv[6] = "1000";
    r = hot_command_argv(h, 7, argv, NULL);
    if (!r) return -1;
    for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
        int settled;
        int64_t charged, available;
        if (hot_settle(h, account, r->element[i]->str, 0, "expire", 0, &settled, &charged,
                       &available) != 0) {
            rc = -1;
            break;
        }
        if (settled) {
            (*released)++;
            log_info("sweeper: released expired hold %s of account %" PRId64, r->element[i]->str,
                     account);
        }
    }
    freeReplyObject(r);
    return rc;
}

/* One pass over every account that has open holds. */
static int sweeper_pass(hot_conn *h, int *released)
{
    char cursor[32] = "0";
    int64_t now;
    if (sweeper_now_ms(h, &now) != 0) return -1;
    do {
        const char *argv[6] = {"SCAN", cursor, "MATCH", "pg:{*}:dl", "COUNT", "1000"};
        redisReply *r = hot_command_argv(h, 6, argv, NULL);
        if (!r) return -1;
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
            freeReplyObject(r);
            return -1;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        for (size_t i = 0; i < r->element[1]->elements; i++) {
            if (sweeper_account(h, r->element[1]->element[i]->str, now, released) != 0) {
                freeReplyObject(r);
                return -1;
            }
        }
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
    return 0;
}

void *sweeper_run(void *arg)
{
    worker_args *w = arg;
    hot_conn *h = hot_open(w->cfg->redis_url);
    if (!h) return NULL;
    while (!atomic_load(w->stop)) {
        int released = 0;
        if (sweeper_pass(h, &released) != 0) log_warn("sweeper: pass failed; will retry");
        worker_sleep(w->stop, (long)w->cfg->sweep_interval_ms);
    }
    hot_close(h);
    return NULL;
}
