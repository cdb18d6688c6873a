/* spill.c: spill files and their replay (see spill.h).
 *
 * Writing: plain write(2) of whole lines, no stdio buffer, so that what was
 * handed over is in the kernel's page cache when the call returns (a crash
 * of the process loses nothing; a crash of the host before the final fsync
 * may: the price of not waiting for the disk on the loop when the resend
 * queue overflows while running).
 *
 * Replay: items are sent in file order, a round at a time: up to
 * SPILL_ROUND settles together (hotclient batches them), or one lease op
 * alone (a lease's ops must apply in seq order). A round whose items all
 * got an answer moves on; one with a failure (Redis away) is sent again,
 * after SPILL_RETRY_MS, skipping the items answered already. Every item
 * is idempotent (settle.lua `late`/`release` by rid, lease.lua by seq), so
 * sending one twice, or a file twice after a crash, changes nothing. */
#include "gateway/spill.h"

#include "common/log.h"
#include "gateway/idem.h"

#include <sodium.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SPILL_PATH_MAX 1200
#define SPILL_LINE_MAX 512 /* a record is at most 256 bytes (lease.c) */
#define SPILL_ROUND 1024
#define SPILL_RETRY_MS 500
#define SPILL_RETRY_MAX_MS 5000
#define SPILL_FILE_MAX ((off_t)1 << 30) /* a file larger than this is not ours */
/* "Give back everything": lease.lua reads numbers as Lua doubles, exact only
 * below 2^53. */
#define SPILL_GIVE_BACK_ALL ((int64_t)1 << 50)

struct spill_file {
    char dir[SPILL_PATH_MAX];
    int tag;
    int fd;
    int failed; /* could not create the file: every append fails */
    char path[SPILL_PATH_MAX + 64];
    long items;
    int snap; /* a snapshot's: written under a temporary name, renamed by spill_snap_commit */
};

struct spill_snap {
    char dir[SPILL_PATH_MAX];
    int tag;
    char path[SPILL_PATH_MAX + 64]; /* its name once committed ("" before) */
    int fd;                         /* the committed file, locked while we live */
};

/* mkdir -p DIR (mode 0700: the files name accounts and their charges). */
static int spill_mkdirs(const char *dir)
{
    char p[SPILL_PATH_MAX];
    size_t n = strlen(dir);
    if (n == 0 || n >= sizeof p) return -1;
    memcpy(p, dir, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (p[i] != '/' && p[i] != '\0') continue;
        p[i] = '\0';
        if (mkdir(p, 0700) != 0 && errno != EEXIST) return -1;
        p[i] = i < n ? '/' : '\0';
    }
    return 0;
}

static int spill_sync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc;
    if (fd < 0) return -1;
    rc = fsync(fd);
    close(fd);
    return rc;
}

spill_file *spill_file_new(const char *dir, int tag)
{
    spill_file *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    if (strlen(dir) >= sizeof f->dir - 64) {
        free(f);
        return NULL;
    }
    snprintf(f->dir, sizeof f->dir, "%s", dir);
    f->tag = tag;
    f->fd = -1;
    return f;
}

/* Creates the file: a temporary name, locked, then renamed, so that no
 * replayer can take it before the lock is ours. */
static int spill_create(spill_file *f)
{
    char tmp[SPILL_PATH_MAX + 64], fin[SPILL_PATH_MAX + 64];
    struct timespec ts;
    int fd = -1;
    if (f->fd >= 0) return 0;
    if (f->failed) return -1;
    if (f->snap) {
        /* Not a spill-*.log name: no replayer looks at it before the rename. */
        snprintf(tmp, sizeof tmp, "%s/.snap-%ld-%d", f->dir, (long)getpid(), f->tag);
        if (spill_mkdirs(f->dir) != 0) goto fail;
        fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || flock(fd, LOCK_EX) != 0) goto fail;
        f->fd = fd;
        snprintf(f->path, sizeof f->path, "%s", tmp);
        return 0;
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(tmp, sizeof tmp, "%s/.tmp-%ld-%d", f->dir, (long)getpid(), f->tag);
    snprintf(fin, sizeof fin, "%s/spill-%ld-%d-%lld.log", f->dir, (long)getpid(), f->tag,
             (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
    if (spill_mkdirs(f->dir) != 0) goto fail;
    /* Read-write: spill_file_handoff reads it back through this descriptor. */
    fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) goto fail;
    if (flock(fd, LOCK_EX) != 0 || rename(tmp, fin) != 0) goto fail;
    f->fd = fd;
    snprintf(f->path, sizeof f->path, "%s", fin);
    log_warn("spilling undelivered settles to %s", fin);
    return 0;
fail:
    log_error("spill: cannot create a file in %s: %s", f->dir, strerror(errno));
    if (fd >= 0) {
        unlink(tmp);
        close(fd);
    }
    f->failed = 1;
    return -1;
}

static int spill_write(spill_file *f, const char *buf, size_t len)
{
    size_t off = 0;
    if (spill_create(f) != 0) return -1;
    while (off < len) {
        ssize_t w = write(f->fd, buf + off, len - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            log_error("spill: write failed: %s", strerror(errno));
            if (f->snap) f->failed = 1; /* an incomplete snapshot must not replace the last */
            return -1;
        }
        off += (size_t)w;
    }
    return 0;
}

int spill_settle(spill_file *f, const hot_settle_args *a)
{
    char line[SPILL_LINE_MAX], key[IDEM_HEX] = "", fp[IDEM_HEX] = "";
    int n;
    /* A call with an Idempotency-Key carries the key's hash and its
     * fingerprint: the replay stores its marker (an answer not kept) or
     * clears it. */
    if (a->has_idem) {
        idem_hex(a->idem.key, key);
        idem_hex(a->idem.fp, fp);
    }
    /* A commit replays as `late`: the hold may be swept by then. */
    n = snprintf(line, sizeof line, "S %s %" PRId64 " %" PRId64 " %s %ld%s%s%s%s\n", a->rid,
                 a->account, a->charge, a->commit ? "late" : "release", a->status,
                 a->has_idem ? " " : "", key, a->has_idem ? " " : "", fp);
    if (n < 0 || (size_t)n >= sizeof line || spill_write(f, line, (size_t)n) != 0) {
        log_error("spill: settle rid=%s account=%" PRId64 " charge=%" PRId64 " lost", a->rid,
                  a->account, a->charge);
        return -1;
    }
    f->items++;
    return 0;
}

int spill_lease_op(spill_file *f, int64_t account, const char *lid, int64_t seq, int64_t charge,
                   int nrec, const char *const *recs, const size_t *lens)
{
    /* One write for the whole op: a crash cuts it whole or not at all
     * (a cut op is recognised by its missing records and skipped). */
    size_t cap = 96 + (size_t)nrec * (SPILL_LINE_MAX / 2 + 3), len;
    char *buf = malloc(cap);
    int n, rc = -1;
    if (!buf) goto out;
    n = snprintf(buf, cap, "L %" PRId64 " %s %" PRId64 " %" PRId64 " %d\n", account, lid, seq,
                 charge, nrec);
    if (n < 0 || (size_t)n >= cap) goto out;
    len = (size_t)n;
    for (int i = 0; i < nrec; i++) {
        if (lens[i] > SPILL_LINE_MAX / 2 || memchr(recs[i], '\n', lens[i])) goto out;
        memcpy(buf + len, "R ", 2);
        memcpy(buf + len + 2, recs[i], lens[i]);
        len += 2 + lens[i];
        buf[len++] = '\n';
    }
    if (spill_write(f, buf, len) != 0) goto out;
    f->items++;
    rc = 0;
out:
    if (rc != 0)
        log_error("spill: lease %s op %" PRId64 " of account %" PRId64
                  " (%d records, charge %" PRId64 ") lost",
                  lid, seq, account, nrec, charge);
    free(buf);
    return rc;
}

int spill_lease_close(spill_file *f, int64_t account, const char *lid, int64_t seq)
{
    char line[SPILL_LINE_MAX];
    int n = snprintf(line, sizeof line, "C %" PRId64 " %s %" PRId64 "\n", account, lid, seq);
    if (n < 0 || (size_t)n >= sizeof line || spill_write(f, line, (size_t)n) != 0) return -1;
    f->items++;
    return 0;
}

long spill_count(const spill_file *f)
{
    return f ? f->items : 0;
}

int spill_file_close(spill_file *f)
{
    int rc = 0;
    if (!f) return 0;
    if (f->fd >= 0) {
        if (fsync(f->fd) != 0 || spill_sync_dir(f->dir) != 0) {
            log_error("spill: fsync failed in %s: %s", f->dir, strerror(errno));
            rc = -1;
        }
        log_warn("spill: %ld items written to %s", f->items, f->dir);
        close(f->fd); /* drops the lock */
    }
    free(f);
    return rc;
}

/* ---- snapshots ---------------------------------------------------------- */

spill_snap *spill_snap_new(const char *dir, int tag)
{
    spill_snap *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    if (strlen(dir) >= sizeof s->dir - 64) {
        free(s);
        return NULL;
    }
    snprintf(s->dir, sizeof s->dir, "%s", dir);
    s->tag = tag;
    s->fd = -1;
    return s;
}

spill_file *spill_snap_begin(spill_snap *s)
{
    spill_file *f = spill_file_new(s->dir, s->tag);
    if (f) f->snap = 1;
    return f;
}

int spill_snap_commit(spill_snap *s, spill_file *f)
{
    int rc = 0;
    if (!f) return -1;
    if (f->failed) {
        /* Items this one should hold were lost (logged): the previous
         * snapshot, if any, is better than none. */
        if (f->fd >= 0) {
            unlink(f->path);
            close(f->fd);
        }
        free(f);
        return -1;
    }
    if (f->items == 0 || f->fd < 0) {
        /* Nothing undelivered any more: the last snapshot goes. */
        if (f->fd >= 0) {
            unlink(f->path);
            close(f->fd);
        }
        if (s->fd >= 0) {
            if (unlink(s->path) != 0)
                log_error("spill %s: cannot delete it: %s", s->path, strerror(errno));
            close(s->fd);
            s->fd = -1;
        }
        free(f);
        return rc;
    }
    if (s->fd < 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        snprintf(s->path, sizeof s->path, "%s/spill-%ld-%d-%lld-stop.log", s->dir, (long)getpid(),
                 s->tag, (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
    }
    /* On disk before it replaces the last one, which stays whole until the
     * rename: a crash leaves one complete snapshot or the other. */
    if (fsync(f->fd) != 0 || rename(f->path, s->path) != 0 || spill_sync_dir(s->dir) != 0) {
        log_error("spill: cannot write the snapshot %s: %s", s->path, strerror(errno));
        unlink(f->path);
        close(f->fd);
        rc = -1;
    } else {
        log_info("spill: %ld undelivered items in %s", f->items, s->path);
        if (s->fd >= 0) close(s->fd); /* the replaced one: unlinked by the rename */
        s->fd = f->fd;                /* still locked: no replayer takes it while we live */
    }
    free(f);
    return rc;
}

void spill_snap_free(spill_snap *s)
{
    if (!s) return;
    if (s->fd >= 0) close(s->fd); /* unlocks it for the next start */
    free(s);
}

/* ---- replay ------------------------------------------------------------- */

enum spill_kind { SPILL_SETTLE, SPILL_LEASE, SPILL_CLOSE };

typedef struct spill_item {
    enum spill_kind kind;
    int file;
    int done;
    int failed; /* in this round */
    hot_settle_args settle;
    int64_t account, seq, charge;
    char lid[34];
    int nrec;    /* records (SPILL_LEASE) */
    char **recs; /* nrec record texts */
    size_t *lens;
    struct spill_replay *r;
} spill_item;

typedef struct spill_src {
    char path[SPILL_PATH_MAX + 300];
    int fd;       /* locked */
    int first, n; /* its items */
} spill_src;

struct spill_replay {
    spill_item *items;
    int n, cap;
    spill_src *files;
    int nfiles, capfiles;
    int at;          /* first item of the current round */
    int round_end;   /* one past its last */
    int outstanding; /* sent in this round, not answered */
    long left;
    int stopped;
    int freeing;
    int retry_ms; /* backs off while rounds fail (an item Redis keeps refusing) */
    hotclient *hc;
    struct event *timer;
};

static spill_item *spill_add_item(spill_replay *r)
{
    if (r->n == r->cap) {
        int cap = r->cap ? r->cap * 2 : 256;
        spill_item *it = realloc(r->items, (size_t)cap * sizeof *it);
        if (!it) return NULL;
        r->items = it;
        r->cap = cap;
    }
    memset(&r->items[r->n], 0, sizeof r->items[0]);
    r->items[r->n].r = r;
    r->items[r->n].file = r->nfiles - 1;
    return &r->items[r->n++];
}

static void spill_item_free(spill_item *it)
{
    for (int i = 0; i < it->nrec && it->recs; i++)
        free(it->recs[i]);
    free(it->recs);
    free(it->lens);
    it->recs = NULL;
    it->lens = NULL;
}

static int spill_valid_id(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n >= max) return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'z') ||
              (s[i] >= 'A' && s[i] <= 'Z')))
            return 0;
    return 1;
}

/* Parses TEXT (the whole file, NUL-terminated) into R's items. Lines that
 * do not parse are logged and skipped; an op missing records (cut by a
 * crash) too. */
static int spill_parse(spill_replay *r, const char *path, char *text)
{
    char *line = text, *nl;
    while ((nl = strchr(line, '\n')) != NULL) {
        char rid[64], lid[64], outcome[16], key[IDEM_HEX + 1], fp[IDEM_HEX + 1];
        long long acct, charge, seq;
        long status;
        int nrec, nf = 0;
        spill_item *it;
        *nl = '\0';
        /* 5 fields, or 7 with a key's hash and fingerprint (64 hex each). A
         * malformed pair is dropped, never the charge: its marker then
         * expires with its hold. */
        if (line[0] == 'S' &&
            (nf = sscanf(line, "S %63s %lld %lld %15s %ld %65s %65s", rid, &acct, &charge, outcome,
                         &status, key, fp)) >= 5 &&
            spill_valid_id(rid, 33) && (!strcmp(outcome, "late") || !strcmp(outcome, "release"))) {
            if (!(it = spill_add_item(r))) return -1;
            if (nf == 7 && strlen(key) == IDEM_HEX - 1 && strlen(fp) == IDEM_HEX - 1 &&
                sodium_hex2bin(it->settle.idem.key, sizeof it->settle.idem.key, key, IDEM_HEX - 1,
                               NULL, NULL, NULL) == 0 &&
                sodium_hex2bin(it->settle.idem.fp, sizeof it->settle.idem.fp, fp, IDEM_HEX - 1,
                               NULL, NULL, NULL) == 0)
                it->settle.has_idem = 1;
            else if (nf > 5)
                log_error("spill %s: settle %s: malformed idempotency key, replayed without it",
                          path, rid);
            it->kind = SPILL_SETTLE;
            it->settle.account = acct;
            memcpy(it->settle.rid, rid, strlen(rid) + 1);
            it->settle.charge = charge;
            it->settle.commit = !strcmp(outcome, "late") ? HOT_SETTLE_LATE : HOT_SETTLE_RELEASE;
            it->settle.status = status;
            it->settle.replay = 1;
        } else if (line[0] == 'L' &&
                   sscanf(line, "L %lld %63s %lld %lld %d", &acct, lid, &seq, &charge, &nrec) ==
                       5 &&
                   spill_valid_id(lid, 34) && nrec >= 0 && nrec <= 2 * HOT_LEASE_RECORDS_MAX &&
                   seq > 0) {
            int got = 0;
            if (!(it = spill_add_item(r))) return -1;
            it->kind = SPILL_LEASE;
            it->account = acct;
            it->seq = seq;
            it->charge = charge;
            memcpy(it->lid, lid, strlen(lid) + 1);
            it->recs = calloc((size_t)nrec + 1, sizeof *it->recs);
            it->lens = calloc((size_t)nrec + 1, sizeof *it->lens);
            if (!it->recs || !it->lens) return -1;
            line = nl + 1;
            while (got < nrec && (nl = strchr(line, '\n')) != NULL && line[0] == 'R' &&
                   line[1] == ' ') {
                *nl = '\0';
                it->lens[got] = strlen(line + 2);
                if (!(it->recs[got] = strdup(line + 2))) return -1;
                got++;
                line = nl + 1;
            }
            it->nrec = got;
            if (got < nrec) {
                log_error("spill %s: lease %s op %lld cut short (%d of %d records): skipped", path,
                          lid, seq, got, nrec);
                spill_item_free(it);
                r->n--;
            }
            continue; /* LINE is already past the op */
        } else if (line[0] == 'C' && sscanf(line, "C %lld %63s %lld", &acct, lid, &seq) == 3 &&
                   spill_valid_id(lid, 34) && seq > 0) {
            if (!(it = spill_add_item(r))) return -1;
            it->kind = SPILL_CLOSE;
            it->account = acct;
            it->seq = seq;
            memcpy(it->lid, lid, strlen(lid) + 1);
        } else if (line[0] != '\0') {
            log_error("spill %s: a line that does not parse: skipped", path);
        }
        line = nl + 1;
    }
    if (*line) log_warn("spill %s: a last line cut short (a crash while writing): skipped", path);
    return 0;
}

/* Takes FD (locked, of PATH, SIZE bytes) into R: reads it from its start
 * and appends its items. FD is R's from here on, also on failure. */
static int spill_adopt(spill_replay *r, int fd, const char *path, off_t size)
{
    char *text = NULL;
    size_t off = 0;
    spill_src *src;
    int rc = -1;
    if (r->nfiles == r->capfiles) {
        int cap = r->capfiles ? r->capfiles * 2 : 8;
        spill_src *f = realloc(r->files, (size_t)cap * sizeof *f);
        if (!f) {
            close(fd);
            return -1;
        }
        r->files = f;
        r->capfiles = cap;
    }
    src = &r->files[r->nfiles++];
    snprintf(src->path, sizeof src->path, "%s", path);
    src->fd = fd;
    src->first = r->n;
    src->n = 0;
    text = malloc((size_t)size + 1);
    if (!text) goto out;
    while (off < (size_t)size) {
        ssize_t n = pread(fd, text + off, (size_t)size - off, (off_t)off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        off += (size_t)n;
    }
    text[off] = '\0';
    if (spill_parse(r, path, text) != 0) goto out;
    src->n = r->n - src->first;
    r->left += src->n;
    log_warn("spill %s: %d items to replay", path, src->n);
    rc = 0;
out:
    free(text);
    return rc;
}

/* Reads one file if nobody holds it; appends its items. */
static int spill_load_file(spill_replay *r, const char *path)
{
    struct stat st;
    /* No symlink: a name planted in a shared directory must not make us
     * read (and then delete) another file. */
    int fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        if (errno != ENOENT) log_error("spill %s: cannot open it: %s", path, strerror(errno));
        return 0; /* gone meanwhile, or not a file of ours */
    }
    /* A replayed item moves points (a release frees a hold at cost 0, a
     * late settle charges): only files this gateway's user wrote. Anyone
     * else able to write in the directory (GATEWAY_SPILL_DIR set to a
     * shared one) could otherwise give calls away. Left in place, logged. */
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid()) {
        log_error("spill %s: not a regular file of uid %ld: left alone (check who wrote it)", path,
                  (long)geteuid());
        close(fd);
        return 0;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        log_info("spill %s: held by another process, left to it", path);
        close(fd);
        return 0;
    }
    /* Another replayer may have finished and deleted it while we waited. */
    if (fstat(fd, &st) != 0 || st.st_nlink == 0 || st.st_size > SPILL_FILE_MAX) {
        close(fd);
        return 0;
    }
    return spill_adopt(r, fd, path, st.st_size);
}

static void spill_file_done(spill_replay *r, spill_src *src)
{
    if (src->fd < 0) return;
    /* Every item answered by Redis: now it may go. Unlinked under the lock:
     * a replayer that opened it meanwhile sees st_nlink 0 and skips it. */
    if (unlink(src->path) != 0)
        log_error("spill %s: replayed but cannot delete it: %s", src->path, strerror(errno));
    else
        log_info("spill %s: replayed, deleted", src->path);
    close(src->fd);
    src->fd = -1;
}

static int spill_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int spill_replay_load(const char *dir, spill_replay **out)
{
    spill_replay *r;
    DIR *d;
    struct dirent *e;
    char **names = NULL;
    size_t nn = 0, cap = 0;
    int rc = -1;
    *out = NULL;
    if (spill_mkdirs(dir) != 0) {
        log_error("GATEWAY_SPILL_DIR %s: cannot create it: %s", dir, strerror(errno));
        return -1;
    }
    /* Found now, not at the stop that needs it (a read-only or foreign
     * directory would lose every charge a drain has to spill). */
    {
        char probe[SPILL_PATH_MAX + 64];
        int pfd;
        snprintf(probe, sizeof probe, "%s/.probe-%ld", dir, (long)getpid());
        pfd = open(probe, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (pfd < 0 || write(pfd, "\n", 1) != 1) {
            log_error("GATEWAY_SPILL_DIR %s: cannot write a file in it: %s", dir, strerror(errno));
            if (pfd >= 0) {
                close(pfd);
                unlink(probe);
            }
            return -1;
        }
        close(pfd);
        unlink(probe);
    }
    d = opendir(dir);
    if (!d) {
        log_error("GATEWAY_SPILL_DIR %s: %s", dir, strerror(errno));
        return -1;
    }
    r = calloc(1, sizeof *r);
    if (!r) goto out;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, "spill-", 6) != 0 || len < 10 ||
            strcmp(e->d_name + len - 4, ".log") != 0)
            continue;
        if (nn == cap) {
            size_t c = cap ? cap * 2 : 16;
            char **nm = realloc(names, c * sizeof *nm);
            if (!nm) goto out;
            names = nm;
            cap = c;
        }
        if (!(names[nn] = malloc(strlen(dir) + len + 2))) goto out;
        sprintf(names[nn++], "%s/%s", dir, e->d_name);
    }
    /* Oldest first (the name carries the time after the pid). */
    if (nn) qsort(names, nn, sizeof *names, spill_cmp);
    for (size_t i = 0; i < nn; i++)
        if (spill_load_file(r, names[i]) != 0) goto out;
    rc = 0;
out:
    closedir(d);
    for (size_t i = 0; i < nn; i++)
        free(names[i]);
    free(names);
    if (rc != 0) {
        log_error("spill: out of memory loading %s", dir);
        spill_replay_free(r);
        return -1;
    }
    for (int i = 0; i < r->nfiles; i++)
        if (r->files[i].n == 0) spill_file_done(r, &r->files[i]);
    if (r->left == 0) {
        spill_replay_free(r);
        return 0;
    }
    *out = r;
    return 0;
}

static void spill_arm(spill_replay *r, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    if (!r->stopped && !r->freeing && evtimer_add(r->timer, &tv) != 0)
        log_error("spill: cannot arm the replay timer");
}

static void spill_round_answered(spill_replay *r);

static void spill_item_answered(spill_item *it, int rc)
{
    spill_replay *r = it->r;
    if (rc == 0) {
        it->done = 1;
        r->left--;
    } else {
        it->failed = 1;
    }
    r->outstanding--;
    if (r->outstanding == 0) spill_round_answered(r);
}

static void spill_on_settled(void *arg, int rc, const hot_reply *rep)
{
    spill_item_answered(arg, rc);
}

static void spill_on_lease(void *arg, int rc, const hot_lease_reply *v)
{
    spill_item *it = arg;
    if (rc == 0 && v->status < 0)
        log_error("spill: lease %s op %" PRId64 " of account %" PRId64 ": refused (status %" PRId64
                  "), nothing charged",
                  it->lid, it->seq, it->account, v->status);
    spill_item_answered(it, rc);
}

static void spill_send_round(spill_replay *r)
{
    int end = r->at;
    if (r->stopped || r->freeing || r->outstanding) return;
    while (r->at < r->n && r->items[r->at].done)
        r->at++;
    if (r->at >= r->n) return;
    end = r->at;
    if (r->items[end].kind == SPILL_SETTLE) {
        while (end < r->n && end - r->at < SPILL_ROUND && r->items[end].kind == SPILL_SETTLE)
            end++;
    } else {
        end++;
    }
    r->round_end = end;
    for (int i = r->at; i < end; i++) {
        spill_item *it = &r->items[i];
        int rc;
        if (it->done) continue;
        it->failed = 0;
        if (it->kind == SPILL_SETTLE) {
            rc = hotclient_settle(r->hc, &it->settle, spill_on_settled, it);
        } else {
            const char *recs[2 * HOT_LEASE_RECORDS_MAX];
            size_t lens[2 * HOT_LEASE_RECORDS_MAX];
            hot_lease_args a = {
                .account = it->account, .lid = it->lid, .seq = it->seq, .ttl_ms = 1000, .busy = 0};
            if (it->kind == SPILL_LEASE) {
                for (int k = 0; k < it->nrec; k++) {
                    recs[k] = it->recs[k];
                    lens[k] = it->lens[k];
                }
                a.charge = it->charge;
                a.close = HOT_LEASE_LATE;
                a.nrec = it->nrec;
            } else {
                /* Gives back whatever the lease still holds and drops it
                 * (if the sweeper has not); a no-op once it is gone. */
                a.resize = -SPILL_GIVE_BACK_ALL;
                a.close = 1;
            }
            a.recs = recs;
            a.lens = lens;
            rc = hotclient_lease(r->hc, &a, spill_on_lease, it);
        }
        if (rc == 0)
            r->outstanding++;
        else
            it->failed = 1;
    }
    if (r->outstanding == 0) spill_round_answered(r);
}

/* Every item of the round answered (or could not be sent). */
static void spill_round_answered(spill_replay *r)
{
    int failed = 0;
    if (r->freeing) return;
    for (int i = r->at; i < r->round_end; i++)
        if (!r->items[i].done) failed = 1;
    if (failed) {
        spill_arm(r, r->retry_ms);
        r->retry_ms = r->retry_ms * 2 > SPILL_RETRY_MAX_MS ? SPILL_RETRY_MAX_MS : r->retry_ms * 2;
        return;
    }
    r->retry_ms = SPILL_RETRY_MS;
    r->at = r->round_end;
    for (int f = 0; f < r->nfiles; f++) {
        spill_src *src = &r->files[f];
        int all = 1;
        if (src->fd < 0 || src->first + src->n > r->at) continue;
        for (int i = src->first; i < src->first + src->n; i++)
            if (!r->items[i].done) all = 0;
        if (all) spill_file_done(r, src);
    }
    if (r->left == 0) {
        log_info("spill: replay complete");
        return;
    }
    spill_arm(r, 0); /* from the loop, not from inside a callback */
}

static void spill_on_timer(evutil_socket_t fd, short what, void *arg)
{
    spill_replay *r = arg;
    if (hotclient_epoch(r->hc) == 0) {
        spill_arm(r, SPILL_RETRY_MS); /* not connected yet */
        return;
    }
    spill_send_round(r);
}

int spill_file_handoff(spill_file *f, spill_replay **out)
{
    spill_replay *r;
    struct stat st;
    int fd = f->fd;
    *out = NULL;
    if (fd < 0) return 0;
    if (fstat(fd, &st) != 0) return -1;
    r = calloc(1, sizeof *r);
    if (!r) return -1;
    /* The descriptor and its lock go to the replay; the next append starts
     * a new file. No fsync: the file stays until replayed, and the page
     * cache survives a crash of the process. */
    f->fd = -1;
    f->items = 0;
    if (spill_adopt(r, fd, f->path, st.st_size) != 0) {
        spill_replay_free(r); /* the file stays for the next start */
        return -1;
    }
    *out = r;
    return 0;
}

int spill_replay_start(spill_replay *r, struct event_base *base, hotclient *hc)
{
    r->hc = hc;
    r->retry_ms = SPILL_RETRY_MS;
    r->timer = evtimer_new(base, spill_on_timer, r);
    if (!r->timer) return -1;
    spill_arm(r, 0);
    return 0;
}

long spill_replay_left(const spill_replay *r)
{
    return r ? r->left : 0;
}

void spill_replay_stop(spill_replay *r)
{
    if (!r) return;
    r->stopped = 1;
    if (r->timer) evtimer_del(r->timer);
}

void spill_replay_free(spill_replay *r)
{
    if (!r) return;
    r->freeing = 1;
    if (r->left) log_warn("spill: %ld items not replayed yet: left for the next start", r->left);
    for (int i = 0; i < r->n; i++)
        spill_item_free(&r->items[i]);
    for (int f = 0; f < r->nfiles; f++)
        if (r->files[f].fd >= 0) close(r->files[f].fd);
    if (r->timer) event_free(r->timer);
    free(r->items);
    free(r->files);
    free(r);
}
