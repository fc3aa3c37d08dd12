/*
 * base/kvs_log.c — leveled logging to stderr.  Each line is formatted into
 * one buffer and written with one write(2) so lines from different threads
 * do not interleave.  Called from every thread.
 */
#include "kvs.h"

#include <stdio.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static _Atomic int log_level = KVS_LOG_INFO;

void
kvs_log_set_level(kvs_log_level_t level)
{
    atomic_store(&log_level, (int)level);
}

kvs_log_level_t
kvs_log_get_level(void)
{
    return (kvs_log_level_t)atomic_load_explicit(&log_level, memory_order_relaxed);
}

int
kvs_log_parse_level(const char *s, kvs_log_level_t *out)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(s, names[i]) == 0) {
            *out = (kvs_log_level_t)i;
            return 0;
        }
    }
    return KVS_EINVAL;
}

void
kvs_log(kvs_log_level_t level, const char *fmt, ...)
{
    static const char tag[] = {'E', 'W', 'I', 'D'};
    if ((int)level > atomic_load_explicit(&log_level, memory_order_relaxed))
        return;

    char buf[2048];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(buf, sizeof buf, "%c %02d:%02d:%02d.%03ld ", tag[level & 3], tm.tm_hour,
                     tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof buf - 2)
        len = sizeof buf - 2;
    buf[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, buf, len);
    (void)w;
}
