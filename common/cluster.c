/* cluster.c: hash slots, the slot map and redirections (see cluster.h).
 *
 * The parsers are strict: a map that does not parse is not used (the
 * caller keeps the one it had and retries), because routing an account's
 * script to the wrong master only costs a MOVED, but a half-read map that
 * leaves slots pointing at a node that no longer owns them would cost one
 * on every call until the next refresh. */
#include "common/cluster.h"

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* CRC16-CCITT (XMODEM: polynomial 0x1021, initial 0), the cluster
 * specification's key hash. Bitwise, not table-driven: a key name is a few
 * dozen bytes, hashed once per call, and a 512-byte table would be one more
 * thing to get wrong for no measurable gain. */
static unsigned cluster_crc16(const unsigned char *p, size_t n)
{
    unsigned crc = 0;
    for (size_t i = 0; i < n; i++) {
        crc ^= (unsigned)p[i] << 8;
        for (int b = 0; b < 8; b++)
            crc = crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1;
        crc &= 0xffff;
    }
    return crc;
}

unsigned cluster_keyslot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len);
    if (open) {
        size_t rest = len - (size_t)(open - key) - 1;
        const char *close = memchr(open + 1, '}', rest);
        if (close && close > open + 1) {
            key = open + 1;
            len = (size_t)(close - open - 1);
        }
    }
    return cluster_crc16((const unsigned char *)key, len) % CLUSTER_SLOTS;
}

static void cluster_err(char *err, size_t errlen, const char *msg)
{
    if (errlen > 0) snprintf(err, errlen, "CLUSTER SLOTS: %s", msg);
}

/* The node of entry E ([host, port, id, ...]) as an index into M, added if
 * new; -1 when E is malformed or M is full. */
static int cluster_node_of(cluster_map *m, const redisReply *e, const char *from_host)
{
    const char *host;
    size_t hlen;
    long long port;

    if (e->type != REDIS_REPLY_ARRAY || e->elements < 2) return -1;
    if (e->element[0]->type == REDIS_REPLY_STRING) {
        host = e->element[0]->str;
        hlen = e->element[0]->len;
    } else if (e->element[0]->type == REDIS_REPLY_NIL) {
        host = "";
        hlen = 0;
    } else {
        return -1;
    }
    /* "?" (Redis 7: endpoint unknown) and "": the node we asked. */
    if (hlen == 0 || (hlen == 1 && host[0] == '?')) {
        host = from_host;
        hlen = strlen(from_host);
    }
    if (e->element[1]->type != REDIS_REPLY_INTEGER) return -1;
    port = e->element[1]->integer;
    if (hlen == 0 || hlen >= REDISURL_HOST_MAX || port < 1 || port > 65535) return -1;
    for (int i = 0; i < m->nnodes; i++) {
        if (m->nodes[i].port == port && strlen(m->nodes[i].host) == hlen &&
            memcmp(m->nodes[i].host, host, hlen) == 0)
            return i;
    }
    if (m->nnodes == CLUSTER_NODES_MAX) return -1;
    cluster_node *n = &m->nodes[m->nnodes];
    memset(n, 0, sizeof *n);
    memcpy(n->host, host, hlen);
    n->port = (int)port;
    n->master_idx = m->nnodes;
    if (e->elements >= 3 && e->element[2]->type == REDIS_REPLY_STRING &&
        e->element[2]->len < sizeof n->id)
        memcpy(n->id, e->element[2]->str, e->element[2]->len);
    return m->nnodes++;
}

int cluster_map_parse(const redisReply *r, const char *from_host, cluster_map *m, char *err,
                      size_t errlen)
{
    memset(m, 0, sizeof *m);
    for (int s = 0; s < CLUSTER_SLOTS; s++)
        m->owner[s] = -1;
    if (!r || r->type != REDIS_REPLY_ARRAY) {
        cluster_err(err, errlen, "not an array");
        goto fail;
    }
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *e = r->element[i];
        long long lo, hi;
        int master;

        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
            e->element[0]->type != REDIS_REPLY_INTEGER ||
            e->element[1]->type != REDIS_REPLY_INTEGER) {
            cluster_err(err, errlen, "a range is not [start, end, master, replicas...]");
            goto fail;
        }
        lo = e->element[0]->integer;
        hi = e->element[1]->integer;
        if (lo < 0 || hi < lo || hi >= CLUSTER_SLOTS) {
            cluster_err(err, errlen, "a slot range out of 0..16383");
            goto fail;
        }
        master = cluster_node_of(m, e->element[2], from_host);
        if (master < 0) {
            cluster_err(err, errlen, "a malformed node, or more than 256 nodes");
            goto fail;
        }
        m->nodes[master].master = 1;
        m->nodes[master].master_idx = master;
        for (size_t j = 3; j < e->elements; j++) {
            int rep = cluster_node_of(m, e->element[j], from_host);
            if (rep < 0) {
                cluster_err(err, errlen, "a malformed replica, or more than 256 nodes");
                goto fail;
            }
            if (!m->nodes[rep].master) m->nodes[rep].master_idx = master;
        }
        for (long long s = lo; s <= hi; s++) {
            if (m->owner[s] < 0) m->covered++;
            m->owner[s] = (int16_t)master;
        }
    }
    return 0;
fail:
    m->nnodes = 0;
    m->covered = 0;
    for (int s = 0; s < CLUSTER_SLOTS; s++)
        m->owner[s] = -1;
    return -1;
}

int cluster_map_find(const cluster_map *m, const char *host, int port)
{
    for (int i = 0; i < m->nnodes; i++) {
        if (m->nodes[i].master && m->nodes[i].port == port && strcmp(m->nodes[i].host, host) == 0)
            return i;
    }
    return -1;
}

int cluster_map_masters(const cluster_map *m, int *idx, int cap)
{
    int n = 0;
    for (int i = 0; i < m->nnodes && n < cap; i++) {
        if (m->nodes[i].master) idx[n++] = i;
    }
    return n;
}

int cluster_redirect_parse(const char *err, cluster_redirect *rd)
{
    const char *p, *addr, *colon;
    char *end;
    long slot, port;
    size_t hlen;

    memset(rd, 0, sizeof *rd);
    if (strncmp(err, "MOVED ", 6) == 0) {
        p = err + 6;
    } else if (strncmp(err, "ASK ", 4) == 0) {
        rd->ask = 1;
        p = err + 4;
    } else {
        return 0;
    }
    slot = strtol(p, &end, 10);
    if (end == p || *end != ' ' || slot < 0 || slot >= CLUSTER_SLOTS) return -1;
    addr = end + 1;
    /* host:port, the port after the LAST ':' (an IPv6 host has its own). */
    colon = strrchr(addr, ':');
    if (!colon) return -1;
    port = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end != '\0' || port < 1 || port > 65535) return -1;
    if (addr[0] == '[' && colon > addr && colon[-1] == ']') {
        addr++;
        hlen = (size_t)(colon - 1 - addr);
    } else {
        hlen = (size_t)(colon - addr);
    }
    if (hlen >= sizeof rd->host) return -1;
    memcpy(rd->host, addr, hlen);
    rd->slot = (int)slot;
    rd->port = (int)port;
    return 1;
}
