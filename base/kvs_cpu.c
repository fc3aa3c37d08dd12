/*
 * base/kvs_cpu.c — how many CPUs this process may keep busy, for the
 * default thread counts of the server, the CPU backend and the sampling
 * pool: the affinity mask's CPUs, fewer under a cgroup CPU quota (a
 * container's --cpus, a pod's limits.cpu), which the kernel enforces by
 * throttling, not by hiding CPUs.
 */
#include "kvs.h"

#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Reads up to two integers from path; "max" reads as -1.  How many. */
static int
read_pair(const char *path, long long *a, long long *b)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    char buf[64] = {0};
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *end;
    if (strncmp(buf, "max", 3) == 0) {
        *a = -1;
        end = buf + 3;
    } else {
        *a = strtoll(buf, &end, 10);
        if (end == buf)
            return 0;
    }
    char *p = end;
    *b = strtoll(p, &end, 10);
    return end == p ? 1 : 2;
}

/* CPUs a quota of q microseconds per period p allows, rounded up; 0 when
 * none is set. */
static uint32_t
quota_cpus(long long q, long long p)
{
    if (q <= 0 || p <= 0)
        return 0;
    long long n = (q + p - 1) / p;
    return n > 65536 ? 65536 : (uint32_t)n;
}

static uint32_t
min_nz(uint32_t a, uint32_t b)
{
    return a == 0 ? b : b == 0 ? a : a < b ? a : b;
}

/* cgroup v2: cpu.max of the process's cgroup and every ancestor (the
 * tightest wins), under root; the path may be "/" inside a cgroup
 * namespace, where root is the container's own cgroup. */
static uint32_t
v2_quota(const char *root, const char *path)
{
    char dir[4096], file[4200];
    snprintf(dir, sizeof dir, "%s", path);
    uint32_t best = 0;
    for (;;) { /* dir, its parents, then root itself (dir "") */
        size_t n = strlen(dir);
        while (n > 0 && dir[n - 1] == '/')
            dir[--n] = '\0';
        snprintf(file, sizeof file, "%s%s/cpu.max", root, dir);
        long long q, p;
        if (read_pair(file, &q, &p) == 2)
            best = min_nz(best, quota_cpus(q, p));
        if (n == 0)
            return best;
        char *slash = strrchr(dir, '/');
        *(slash ? slash : dir) = '\0';
    }
}

/* cgroup v1: cpu.cfs_quota_us / cpu.cfs_period_us of the cpu controller,
 * mounted as cpu,cpuacct or cpu, at the process's path or its root. */
static uint32_t
v1_quota(const char *root, const char *ctl, const char *path)
{
    static const char *const mounts[] = {"cpu,cpuacct", "cpuacct,cpu", "cpu"};
    /* The controller list names "cpu" itself (not cpuset, cpuacct). */
    bool cpu = false;
    for (const char *c = ctl; c != NULL && !cpu; c = strchr(c, ',') ? strchr(c, ',') + 1 : NULL)
        cpu = strncmp(c, "cpu", 3) == 0 && (c[3] == ',' || c[3] == '\0');
    if (!cpu)
        return 0;
    uint32_t best = 0;
    for (size_t m = 0; m < sizeof mounts / sizeof mounts[0]; m++) {
        for (int at = 0; at < 2; at++) {
            char qf[4200], pf[4200];
            const char *p = at == 0 && strcmp(path, "/") != 0 ? path : "";
            snprintf(qf, sizeof qf, "%s/%s%s/cpu.cfs_quota_us", root, mounts[m], p);
            snprintf(pf, sizeof pf, "%s/%s%s/cpu.cfs_period_us", root, mounts[m], p);
            long long q, per, unused;
            if (read_pair(qf, &q, &unused) >= 1 && read_pair(pf, &per, &unused) >= 1)
                best = min_nz(best, quota_cpus(q, per));
        }
    }
    return best;
}

uint32_t
kvs__cpu_count_in(uint32_t affinity, const char *cg_root, const char *self_cgroup)
{
    uint32_t quota = 0;
    const char *line = self_cgroup;
    while (line != NULL && *line != '\0') {
        const char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        char buf[4096];
        if (len < sizeof buf) {
            memcpy(buf, line, len);
            buf[len] = '\0';
            /* id:controllers:path */
            char *c1 = strchr(buf, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
            if (c2 != NULL) {
                *c2 = '\0';
                const char *ctl = c1 + 1, *path = c2 + 1;
                uint32_t q =
                    ctl[0] == '\0' ? v2_quota(cg_root, path) : v1_quota(cg_root, ctl, path);
                quota = min_nz(quota, q);
            }
        }
        line = nl ? nl + 1 : NULL;
    }
    uint32_t n = affinity ? affinity : 1;
    return quota && quota < n ? quota : n;
}

static uint32_t cpu_count;
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;

static void
cpu_count_init(void)
{
    cpu_set_t set;
    long n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set)
                                                         : sysconf(_SC_NPROCESSORS_ONLN);
    char self[8192] = {0};
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (f != NULL) {
        size_t k = fread(self, 1, sizeof self - 1, f);
        self[k] = '\0';
        fclose(f);
    }
    cpu_count = kvs__cpu_count_in(n > 0 ? (uint32_t)n : 1, "/sys/fs/cgroup", self);
}

/* The server, the backend and the sampling pool all ask at start-up. */
uint32_t
kvs_cpu_count(void)
{
    pthread_once(&cpu_once, cpu_count_init);
    return cpu_count;
}
