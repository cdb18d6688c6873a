/* metrics.c: metric primitives and the Prometheus text format (metrics.h).
 * Owns no metric: only how one is observed, merged and written. */
#include "common/metrics.h"

#include <dirent.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

const metric_hist_spec metric_latency_us = {
    14,
    {100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000, 2500000,
     10000000},
    1e6,
};

static int metric_bucket(const metric_hist_spec *s, int64_t v)
{
    int i = 0;
    while (i < s->n && v > s->bound[i])
        i++;
    return i; /* s->n is +Inf */
}

void metric_observe(metric_hist *h, const metric_hist_spec *s, int64_t v)
{
    if (v < 0) v = 0;
    metric_add(&h->bucket[metric_bucket(s, v)], 1);
    metric_add(&h->sum, (uint64_t)v);
}

void metric_observe_shared(metric_hist *h, const metric_hist_spec *s, int64_t v)
{
    if (v < 0) v = 0;
    metric_add_shared(&h->bucket[metric_bucket(s, v)], 1);
    metric_add_shared(&h->sum, (uint64_t)v);
}

void metric_hist_merge(metric_hist_sum *out, const metric_hist *h, const metric_hist_spec *s)
{
    for (int i = 0; i <= s->n; i++)
        out->bucket[i] += metric_get(&h->bucket[i]);
    out->sum += metric_get(&h->sum);
}

void promtext_init(promtext *p)
{
    buf_init(&p->b, SIZE_MAX); /* bounded by the metrics there are */
    p->oom = 0;
}

void promtext_free(promtext *p)
{
    buf_free(&p->b);
    p->oom = 0;
}

int promtext_done(const promtext *p)
{
    return p->oom ? -1 : 0;
}

static void promtext_printf(promtext *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void promtext_printf(promtext *p, const char *fmt, ...)
{
    va_list ap;
    if (p->oom) return;
    va_start(ap, fmt);
    if (buf_vprintf(&p->b, fmt, ap) != BUF_OK) p->oom = 1;
    va_end(ap);
}

void promtext_family(promtext *p, const char *name, const char *type, const char *help)
{
    promtext_printf(p, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void promtext_u64(promtext *p, const char *name, const char *labels, uint64_t v)
{
    if (labels && *labels)
        promtext_printf(p, "%s{%s} %" PRIu64 "\n", name, labels, v);
    else
        promtext_printf(p, "%s %" PRIu64 "\n", name, v);
}

void promtext_i64(promtext *p, const char *name, const char *labels, int64_t v)
{
    if (labels && *labels)
        promtext_printf(p, "%s{%s} %" PRId64 "\n", name, labels, v);
    else
        promtext_printf(p, "%s %" PRId64 "\n", name, v);
}

void promtext_double(promtext *p, const char *name, const char *labels, double v)
{
    if (labels && *labels)
        promtext_printf(p, "%s{%s} %.17g\n", name, labels, v);
    else
        promtext_printf(p, "%s %.17g\n", name, v);
}

void promtext_hist(promtext *p, const char *name, const char *labels, const metric_hist_spec *s,
                   const metric_hist_sum *h)
{
    const char *sep = labels && *labels ? "," : "";
    const char *lab = labels ? labels : "";
    uint64_t cum = 0;
    for (int i = 0; i < s->n; i++) {
        cum += h->bucket[i];
        promtext_printf(p, "%s_bucket{%s%sle=\"%.15g\"} %" PRIu64 "\n", name, lab, sep,
                        (double)s->bound[i] / s->scale, cum);
    }
    cum += h->bucket[s->n];
    promtext_printf(p, "%s_bucket{%s%sle=\"+Inf\"} %" PRIu64 "\n", name, lab, sep, cum);
    if (*lab) {
        promtext_printf(p, "%s_sum{%s} %.17g\n", name, lab, (double)h->sum / s->scale);
        promtext_printf(p, "%s_count{%s} %" PRIu64 "\n", name, lab, cum);
    } else {
        promtext_printf(p, "%s_sum %.17g\n", name, (double)h->sum / s->scale);
        promtext_printf(p, "%s_count %" PRIu64 "\n", name, cum);
    }
}

char *promtext_escape(char *out, size_t outlen, const char *v)
{
    size_t o = 0;
    if (outlen == 0) return out;
    for (; *v; v++) {
        const char *rep = NULL;
        char one[2] = {*v, 0};
        if (*v == '\\')
            rep = "\\\\";
        else if (*v == '"')
            rep = "\\\"";
        else if (*v == '\n')
            rep = "\\n";
        else
            rep = one;
        size_t n = strlen(rep);
        if (o + n >= outlen) break;
        memcpy(out + o, rep, n);
        o += n;
    }
    out[o] = 0;
    return out;
}

/* /proc/self/stat's fields after the command (which may hold spaces and
 * parentheses: read from the last ')'). */
static int promtext_stat(unsigned long long *utime, unsigned long long *stime,
                         unsigned long long *start, unsigned long long *vsize, long long *rss)
{
    char buf[2048];
    FILE *f = fopen("/proc/self/stat", "r");
    size_t n;
    const char *s;
    if (!f) return -1;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    s = strrchr(buf, ')');
    if (!s) return -1;
    /* after ") ": state(3) ppid pgrp session tty tpgid flags minflt cminflt
     * majflt cmajflt utime(14) stime(15) cutime cstime priority nice
     * num_threads itrealvalue starttime(22) vsize(23) rss(24) */
    if (sscanf(s + 2,
               "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu %*d %*d %*d %*d %*d %*d "
               "%llu %llu %lld",
               utime, stime, start, vsize, rss) != 5)
        return -1;
    return 0;
}

static double promtext_boot_time(void)
{
    char line[256];
    double bt = -1;
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long long v;
        if (sscanf(line, "btime %llu", &v) == 1) {
            bt = (double)v;
            break;
        }
    }
    fclose(f);
    return bt;
}

static long promtext_open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    long n = 0;
    if (!d) return -1;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* the directory's own descriptor */
}

void promtext_process(promtext *p)
{
    unsigned long long ut, st, start, vsize;
    long long rss;
    long tck = sysconf(_SC_CLK_TCK), page = sysconf(_SC_PAGESIZE), fds = promtext_open_fds();
    struct rlimit rl;
    if (tck > 0 && page > 0 && promtext_stat(&ut, &st, &start, &vsize, &rss) == 0) {
        double bt = promtext_boot_time();
        promtext_family(p, "process_cpu_seconds_total", "counter",
                        "Total user and system CPU time spent in seconds.");
        promtext_double(p, "process_cpu_seconds_total", NULL, (double)(ut + st) / (double)tck);
        promtext_family(p, "process_resident_memory_bytes", "gauge",
                        "Resident memory size in bytes.");
        promtext_i64(p, "process_resident_memory_bytes", NULL, (int64_t)rss * page);
        promtext_family(p, "process_virtual_memory_bytes", "gauge",
                        "Virtual memory size in bytes.");
        promtext_u64(p, "process_virtual_memory_bytes", NULL, (uint64_t)vsize);
        if (bt >= 0) {
            promtext_family(p, "process_start_time_seconds", "gauge",
                            "Start time of the process since unix epoch in seconds.");
            promtext_double(p, "process_start_time_seconds", NULL,
                            bt + (double)start / (double)tck);
        }
    }
    if (fds >= 0) {
        promtext_family(p, "process_open_fds", "gauge", "Number of open file descriptors.");
        promtext_i64(p, "process_open_fds", NULL, fds);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        promtext_family(p, "process_max_fds", "gauge", "Maximum number of open file descriptors.");
        promtext_u64(p, "process_max_fds", NULL, (uint64_t)rl.rlim_cur);
    }
}
