/*
 * base/kvs_arena.c — a bump allocator for memory that lives exactly as long
 * as one owner (a request, a parsed file).  Chunks are malloc'd on demand;
 * large allocations get a chunk of their own.  Cleanups run LIFO on free,
 * so non-memory resources share the arena's single release point.  Also
 * kvs_memdup, the plain copy beside it.
 *
 *   arena -> chunk -> chunk -> ...      (newest first)
 *            [hdr|used.....|free]
 */
#include "kvs.h"

#include <stdlib.h>

typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t size; /* usable bytes after the header */
    size_t used;
    _Alignas(16) unsigned char data[];
} arena_chunk_t;

typedef struct arena_cleanup {
    struct arena_cleanup *next;
    void (*fn)(void *);
    void *arg;
} arena_cleanup_t;

struct kvs_arena {
    arena_chunk_t *chunks;
    arena_cleanup_t *cleanups;
    size_t chunk_bytes;
    size_t used;
};

int
kvs_arena_new(size_t chunk_bytes, kvs_arena_t **out)
{
    kvs_arena_t *a = calloc(1, sizeof *a);
    if (a == NULL)
        return KVS_ENOMEM;
    a->chunk_bytes = chunk_bytes ? chunk_bytes : 16384;
    *out = a;
    return 0;
}

void
kvs_arena_free(kvs_arena_t *a)
{
    if (a == NULL)
        return;
    for (arena_cleanup_t *c = a->cleanups; c; c = c->next)
        c->fn(c->arg);
    arena_chunk_t *ch = a->chunks;
    while (ch) {
        arena_chunk_t *next = ch->next;
        free(ch);
        ch = next;
    }
    free(a);
}

void *
kvs_arena_alloc(kvs_arena_t *a, size_t bytes)
{
    size_t need = (bytes + 15) & ~(size_t)15;
    if (need < bytes)
        return NULL;
    arena_chunk_t *ch = a->chunks;
    if (ch == NULL || ch->size - ch->used < need) {
        size_t size = need > a->chunk_bytes ? need : a->chunk_bytes;
        if (size > SIZE_MAX - sizeof(arena_chunk_t))
            return NULL;
        arena_chunk_t *n = malloc(sizeof(arena_chunk_t) + size);
        if (n == NULL)
            return NULL;
        n->size = size;
        n->used = 0;
        /* A dedicated big chunk goes behind the current one so the current
         * chunk's free tail stays usable. */
        if (ch != NULL && need > a->chunk_bytes) {
            n->next = ch->next;
            ch->next = n;
        } else {
            n->next = ch;
            a->chunks = n;
        }
        ch = n;
    }
    void *p = ch->data + ch->used;
    ch->used += need;
    a->used += need;
    return p;
}

void *
kvs_arena_calloc(kvs_arena_t *a, size_t n, size_t size)
{
    size_t bytes;
    if (kvs_mul_size(n, size, &bytes))
        return NULL;
    void *p = kvs_arena_alloc(a, bytes);
    if (p)
        memset(p, 0, bytes);
    return p;
}

char *
kvs_arena_strdup(kvs_arena_t *a, const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = kvs_arena_alloc(a, n);
    if (p)
        memcpy(p, s, n);
    return p;
}

int
kvs_arena_cleanup_add(kvs_arena_t *a, void (*fn)(void *), void *arg)
{
    arena_cleanup_t *c = kvs_arena_alloc(a, sizeof *c);
    if (c == NULL)
        return KVS_ENOMEM;
    c->fn = fn;
    c->arg = arg;
    c->next = a->cleanups;
    a->cleanups = c;
    return 0;
}

size_t
kvs_arena_used(const kvs_arena_t *a)
{
    return a->used;
}

void *
kvs_memdup(const void *p, size_t n)
{
    void *q = p ? malloc(n ? n : 1) : NULL;
    if (q)
        memcpy(q, p, n);
    return q;
}
