/* sweeper.c: releases holds whose deadline has passed.
 *
 * A hold outlives its deadline only when the gateway that took it died (or
 * lost Redis) between reserve and settle: the call's outcome is unknown, and
 * unknown is not billable, so the hold is released at cost 0 through
 * settle.lua (outcome "expire"), which also records it in the outbox and,
 * in the same step, leaves the hold's swept mark (pg:{A}:swept:<rid>, and
 * pg:{A}:swept:L<id> for a whole lease): a gateway that answered the call
 * but could only spill its settle replays it later as outcome "late", which
 * the mark lets charge once, from the available points. Racing a settle
 * from a live gateway is harmless: settle is idempotent by reservation id
 * and whichever runs first wins. Deadlines never move, so the scan needs no
 * atomicity with the release.
 *
 * The deadline is the last part of each hold's value in the account's holds
 * hash, so the scan reads those hashes (one per account with open holds;
 * Redis drops an empty hash) rather than a deadline index that every call
 * would have to maintain: holds live for the length of a call, so the
 * hashes are short, and the sweep runs once a second while the index would
 * cost two more writes on every call.
 *
 * Two kinds of holds are left alone: guard holds of negative adjustments
 * (only a push of the adjusted credited total may end one: credit.lua), and
 * any hold during SWEEP_RECOVERY_MS after Redis was unreachable (gateways'
 * queued settles land first). */
#include "billing/hot.h"
#include "common/hotkeys.h"
#include "common/log.h"
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

void worker_rest(atomic_int *stop, long ms, billing_metrics *m, int slot)
{
    bm_beat(m, slot);
    while (ms > 0 && !atomic_load(stop)) {
        long step = ms > 250 ? 250 : ms;
        worker_sleep(stop, step);
        bm_beat(m, slot);
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

/* The deadline of a hold value "amount|route|deadline"; -1 if it has none. */
static int64_t sweeper_deadline(const char *value)
{
    const char *bar = strrchr(value, '|');
    char *end;
    long long dl;
    if (!bar || bar == strchr(value, '|')) return -1;
    dl = strtoll(bar + 1, &end, 10);
    return end != bar + 1 && *end == '\0' ? (int64_t)dl : -1;
}

/* Releases the expired holds of one account's holds hash. */
static int sweeper_account(hot_conn *h, const char *holdskey, int64_t now, int *released,
                           billing_metrics *m)
{
    const char *open = strchr(holdskey, '{');
    const char *argv[2] = {"HGETALL", holdskey};
    redisReply *r;
    int64_t account;
    int rc = 0;

    if (!open) return 0;
    account = strtoll(open + 1, NULL, 10);
    r = hot_command_argv(h, 2, argv, NULL);
    if (!r) return -1;
    for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i + 1 < r->elements; i += 2) {
        const char *rid = r->element[i]->str, *value = r->element[i + 1]->str;
        int64_t deadline;
        int settled;
        int64_t charged, available;
        if (!rid || !value) continue;
        deadline = sweeper_deadline(value);
        if (deadline < 0) {
            log_error("sweeper: hold %s of account %" PRId64 " has no deadline (\"%s\"); left", rid,
                      account, value);
            continue;
        }
        if (deadline > now) continue;
        /* A negative adjustment's guard (route "_adjustment"): released only
         * with the credited total it guards, by the repair pass (credit.lua);
         * released here, calls could spend points the adjustment removed
         * before its total reaches Redis. */
        if (strchr(value, '|')[1] == '_') continue;
        if (hot_settle(h, account, rid, 0, "expire", 0, &settled, &charged, &available) != 0) {
            rc = -1;
            break;
        }
        if (settled == HOT_STATUS_UNUSABLE) {
            log_error("sweeper: hold %s of account %" PRId64 " cannot be released: its data in "
                      "Redis is unusable (see the Redis log)",
                      rid, account);
        } else if (settled) {
            (*released)++;
            bm_sweeper_release(m, strtoll(value, NULL, 10)); /* the hold's amount */
            log_info("sweeper: released expired hold %s of account %" PRId64, rid, account);
        }
    }
    freeReplyObject(r);
    return rc;
}

/* One pass over every account that has open holds. */
static int sweeper_pass(hot_conn *h, int *released, billing_metrics *m)
{
    char cursor[32] = "0";
    int64_t now;
    if (sweeper_now_ms(h, &now) != 0) return -1;
    do {
        const char *argv[6] = {"SCAN", cursor, "MATCH", "pg:{*}:holds", "COUNT", "1000"};
        redisReply *r = hot_command_argv(h, 6, argv, NULL);
        if (!r) return -1;
        if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
            freeReplyObject(r);
            return -1;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        for (size_t i = 0; i < r->element[1]->elements; i++) {
            bm_beat(m, BM_BEAT_SWEEPER); /* a long pass is a turning loop */
            if (sweeper_account(h, r->element[1]->element[i]->str, now, released, m) != 0) {
                freeReplyObject(r);
                return -1;
            }
        }
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
    return 0;
}

static int64_t sweeper_mono_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

void *sweeper_run(void *arg)
{
    worker_args *w = arg;
    hot_conn *h = hot_open(w->cfg->redis_url);
    int64_t quiet_until = 0;
    if (!h) return NULL;
    while (!atomic_load(w->stop)) {
        int released = 0;
        bm_beat(w->metrics, BM_BEAT_SWEEPER);
        /* After Redis was unreachable, expire nothing for SWEEP_RECOVERY_MS:
         * holds whose deadline passed during the outage mostly belong to
         * calls that ended meanwhile, whose gateways are about to resend
         * their settles (reconnect backoff, Redis LOADING its data); expired
         * first, a billable call would cost nothing. */
        if (sweeper_mono_ms() < quiet_until) {
            if (hot_ping(h) != 0) quiet_until = sweeper_mono_ms() + w->cfg->sweep_recovery_ms;
        } else if (sweeper_pass(h, &released, w->metrics) != 0) {
            log_warn("sweeper: pass failed; no expiry until %lld ms after Redis answers again",
                     (long long)w->cfg->sweep_recovery_ms);
            quiet_until = sweeper_mono_ms() + w->cfg->sweep_recovery_ms;
        }
        worker_rest(w->stop, (long)w->cfg->sweep_interval_ms, w->metrics, BM_BEAT_SWEEPER);
    }
    hot_close(h);
    return NULL;
}
