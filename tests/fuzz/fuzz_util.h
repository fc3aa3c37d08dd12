/*
 * tests/fuzz/fuzz_util.h — what the libFuzzer targets in tests/fuzz/ share:
 * finding the corpus directory among libFuzzer's arguments and writing a
 * target's seeds into it when it is empty (so CI needs no checked-in
 * binary seeds), FUZZ_CHECK for an input's properties, FUZZ_TRY for the
 * seed writers.
 */
#ifndef KVS_FUZZ_UTIL_H
#define KVS_FUZZ_UTIL_H

#include "base/kvs.h"

#include <dirent.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

/* The first corpus directory (libFuzzer's flags all start with '-'), or
 * NULL. */
static inline const char *
fuzz_corpus_dir(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (argv[i][0] != '-')
            return argv[i];
    return NULL;
}

/* Whether dir should get seeds: it is missing (it is made) or an empty
 * directory.  A corpus to keep, or a single input to replay, is not. */
static inline bool
fuzz_wants_seeds(const char *dir)
{
    struct stat st;
    if (dir == NULL)
        return false;
    if (stat(dir, &st) != 0)
        return errno == ENOENT && mkdir(dir, 0755) == 0;
    if (!S_ISDIR(st.st_mode))
        return false;
    DIR *d = opendir(dir);
    if (d == NULL)
        return false;
    bool empty = true;
    struct dirent *e;
    while (empty && (e = readdir(d)) != NULL)
        empty = e->d_name[0] == '.';
    closedir(d);
    return empty;
}

/* When the first corpus directory (among libFuzzer's arguments) is
 * missing or empty, writes n seeds into it: write(path, k) makes
 * <dir>/seed<k><ext>.  A seed that cannot be written is said, not fatal. */
static inline void
fuzz_seed(int argc, char **argv, int n, const char *ext, int (*write)(const char *path, int k))
{
    const char *dir = fuzz_corpus_dir(argc, argv);
    if (!fuzz_wants_seeds(dir))
        return;
    for (int k = 0; k < n; k++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/seed%d%s", dir, k, ext);
        int rc = write(path, k);
        if (rc != 0)
            fprintf(stderr, "%s: cannot write seed %s: %s\n", argv[0], path, kvs_strerror(rc));
    }
}

/* A property of an input that must hold: abort, which libFuzzer reports
 * as a crash and keeps the input of. */
#define FUZZ_CHECK(x)                                                             \
    do {                                                                          \
        if (!(x)) {                                                               \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #x); \
            abort();                                                              \
        }                                                                         \
    } while (0)

/* Seeds are written by a run of calls: each runs while rc is 0. */
#define FUZZ_TRY(x)   \
    do {              \
        if (rc == 0)  \
            rc = (x); \
    } while (0)

#endif
