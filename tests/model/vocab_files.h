/*
 * tests/model/vocab_files.h — the tokenizer-only GGUF files of
 * shared/data/vocab (../shared/data/vocab next to the repository, or
 * $KVS_VOCAB_DIR), for the tests that tokenize with real vocabularies:
 * test_tokenizer and test_srv_tasks.  The files live outside the
 * repository, so a test that needs them skips where they are absent.
 * Header-only; include after cmocka.h.
 */
#ifndef KVS_TESTS_VOCAB_FILES_H
#define KVS_TESTS_VOCAB_FILES_H

#include "model/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static inline bool
vocab_files_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* The repository: three levels above <repo>/tests/<dir>/this-file. */
static inline const char *
vocab_files_repo(void)
{
    static char repo[1024];
    if (repo[0] == '\0') {
        snprintf(repo, sizeof repo, "%s", __FILE__);
        for (int up = 0; up < 3; up++) {
            char *slash = strrchr(repo, '/');
            if (slash == NULL) {
                snprintf(repo, sizeof repo, ".");
                break;
            }
            *slash = '\0';
        }
    }
    return repo;
}

static inline const char *
vocab_files_dir(void)
{
    static char dir[1100];
    if (dir[0] == '\0') {
        const char *env = getenv("KVS_VOCAB_DIR");
        if (env && *env)
            snprintf(dir, sizeof dir, "%s", env);
        else
            snprintf(dir, sizeof dir, "%s/../shared/data/vocab", vocab_files_repo());
    }
    return dir;
}

/* Loads ggml-vocab-<name>.gguf; NULL when the file is absent, a failed
 * test when it does not load. */
static inline model_vocab_t *
vocab_files_load(const char *name)
{
    char path[1200], err[256] = "";
    snprintf(path, sizeof path, "%s/ggml-vocab-%s.gguf", vocab_files_dir(), name);
    if (!vocab_files_exists(path))
        return NULL;
    model_gguf_t *g;
    int rc = model_gguf_open(path, &g, err, sizeof err);
    if (rc) {
        fprintf(stderr, "%s: %s\n", path, err);
        fail();
    }
    model_vocab_t *v;
    rc = model_vocab_new(g, &v, err, sizeof err);
    if (rc) {
        fprintf(stderr, "%s: %s (%s)\n", path, err, kvs_err_name(rc));
        fail();
    }
    model_gguf_close(g);
    return v;
}

/* Skips the calling test where the vocab directory is absent. */
#define VOCAB_FILES_SKIP_WITHOUT()                                                  \
    do {                                                                            \
        if (!vocab_files_exists(vocab_files_dir())) {                               \
            fprintf(stderr, "skipped: no vocab directory %s (set KVS_VOCAB_DIR)\n", \
                    vocab_files_dir());                                             \
            skip();                                                                 \
        }                                                                           \
    } while (0)

#endif
