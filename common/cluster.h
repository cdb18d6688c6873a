/* cluster.h: the Redis Cluster facts both planes route by: which hash slot
 * a key is in, which master owns a slot (the slot map, from CLUSTER SLOTS),
 * and what a MOVED or ASK redirection says. Owns the CRC16 of the cluster
 * specification, the map's parsing and the redirection grammar; does not
 * own any connection, nor decide when to refresh the map (the gateway's
 * async client and billing's sync one do, on a MOVED, a connection error
 * or a timer).
 *
 * Why our own: Debian ships hiredis without a cluster client, and the part
 * a client needs is small (this file). Everything an account touches
 * carries one hash tag, so a script call never spans two slots and the
 * only routing question is "which node owns this slot now". */
#ifndef POINTGATE_CLUSTER_H
#define POINTGATE_CLUSTER_H

#include "common/redisurl.h"

#include <stddef.h>
#include <stdint.h>

#define CLUSTER_SLOTS 16384
#define CLUSTER_NODES_MAX 256 /* masters and replicas a map may name */

struct redisReply;

/* The slot of KEY[0..LEN): CRC16 (XMODEM) mod 16384 of the key's hash tag,
 * the bytes between its first '{' and the first '}' after it when that is
 * not empty, else of the whole key. */
unsigned cluster_keyslot(const char *key, size_t len);

typedef struct cluster_node {
    char host[REDISURL_HOST_MAX];
    int port;
    char id[41];    /* the node's 40-hex id ("" when the reply had none) */
    int master;     /* owns at least one slot range as its first entry */
    int master_idx; /* a replica: the node index of its master; a master: its own */
} cluster_node;

/* Which node serves each slot, as one CLUSTER SLOTS reply said. */
typedef struct cluster_map {
    int nnodes;
    cluster_node nodes[CLUSTER_NODES_MAX];
    int16_t owner[CLUSTER_SLOTS]; /* node index of the slot's master, -1 unserved */
    int covered;                  /* slots with an owner */
} cluster_map;

/* Fills M from R, the reply to CLUSTER SLOTS. 0, or -1 with the reason in
 * ERR: not the reply's shape, a slot out of range, more nodes than
 * CLUSTER_NODES_MAX. A node named with an empty host (Redis's "?" or "")
 * is the one the reply came from: FROM_HOST. Slots no range names keep -1
 * (the cluster is not fully served: the caller answers 503 for them). */
int cluster_map_parse(const struct redisReply *r, const char *from_host, cluster_map *m, char *err,
                      size_t errlen);

/* The node index of the master at HOST:PORT, or -1. */
int cluster_map_find(const cluster_map *m, const char *host, int port);

/* The masters of M (*N of them, indexes into M->nodes, at most
 * CLUSTER_NODES_MAX): each has its own outbox shards, sweep, repair. */
int cluster_map_masters(const cluster_map *m, int *idx, int cap);

typedef struct cluster_redirect {
    int ask;  /* ASK: this one command, after ASKING, to that node; MOVED: the map is old */
    int slot; /* 0..16383 */
    char host[REDISURL_HOST_MAX];
    int port;
} cluster_redirect;

/* Parses the error reply text ERR ("MOVED 3999 127.0.0.1:6381", "ASK 3999
 * [::1]:6381", or with an empty host: the node that answered, which the
 * caller fills in). 1 when it is a redirection (into *RD), 0 when it is
 * another error, -1 when it starts like one but does not parse. */
int cluster_redirect_parse(const char *err, cluster_redirect *rd);

#endif
