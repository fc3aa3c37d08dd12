/*
 * base/kvs_seed.c — the per-process secret that hash tables keyed by
 * untrusted bytes (a model file's token texts, merges and metadata names:
 * model/vocab.c, model/gguf.c) mix into their hashes, so that a crafted
 * file cannot make every key land in one probe run.
 */
#include "kvs.h"

#include <pthread.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

static uint64_t seed;
static pthread_once_t seed_once = PTHREAD_ONCE_INIT;

static void
seed_init(void)
{
    uint64_t s = 0;
    if (getrandom(&s, sizeof s, GRND_NONBLOCK) != (ssize_t)sizeof s) {
        /* No entropy yet (early boot): the clock and the pid still differ
         * between runs, which is what defeats a file prepared in advance. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        s = kvs_mix64((uint64_t)ts.tv_nsec ^ (uint64_t)ts.tv_sec << 30 ^ (uint64_t)getpid() << 48 ^
                      (uint64_t)(uintptr_t)&s);
    }
    seed = s;
}

uint64_t
kvs_hash_seed(void)
{
    pthread_once(&seed_once, seed_init);
    return seed;
}
