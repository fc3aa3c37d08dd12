/*
 * cache/kv.h — the paged KV cache: a pool of fixed-size blocks in backend
 * memory, reference counts, and per-sequence block tables exported to
 * kernels as CSR views.
 *
 *   kv_pool  : n_blocks blocks x block_tokens tokens, every layer and KV head
 *              (memory layout documented in kernels/kern.h)
 *   kv_table : one sequence: block ids in order, KV length, next position,
 *              and the RoPE position of every entry
 *
 * Blocks are reference-counted and owned by nobody; a fork shares the full
 * blocks of its parent and copies the partial last block.  A block whose
 * count drops to 0 returns to the free list.
 *
 * Callers: sched/ (reserve, append, fork, release, export), tests.
 * Thread: engine only; nothing here locks.
 */
#ifndef KV_H
#define KV_H

#include "base/kvs.h"
#include "kernels/kern.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct kv_pool kv_pool_t;
typedef struct kv_table kv_table_t;

typedef struct kv_pool_cfg {
    uint32_t n_layers;
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t block_tokens; /* tokens per block, a power of two, 1..1024 (default 16) */
    uint32_t n_blocks;     /* blocks in the pool, >= 1 */
    kern_dtype_t dtype;    /* KERN_F32 or KERN_F16 */
} kv_pool_cfg_t;

/* Bytes of backend memory one block takes (all layers, K and V). */
size_t kv_pool_block_bytes(const kv_pool_cfg_t *cfg);

/* Allocates the pool's memory (zeroed) from `be`.  Returns 0, KVS_EINVAL
 * (a zero size, block_tokens not a power of two, a dtype other than F32/F16,
 * NULL be, or more than 2^31 token slots, since slots are int32) or
 * KVS_ENOMEM (including sizes that overflow).  The backend must outlive the
 * pool. */
int kv_pool_new(const kv_pool_cfg_t *cfg, kern_backend_t *be, kv_pool_t **out);
void kv_pool_free(kv_pool_t *pool); /* NULL is a no-op; tables must be freed first */

const kv_pool_cfg_t *kv_pool_cfg(const kv_pool_t *pool);
/* The view kernels read and write; valid for the pool's lifetime. */
const kern_kv_t *kv_pool_kv(const kv_pool_t *pool);
uint32_t kv_pool_n_free(const kv_pool_t *pool);
uint32_t kv_pool_refcount(const kv_pool_t *pool, int32_t block);
/* Checks every invariant (refcounts match table references, free list
 * consistent, no block both free and used).  Returns true when they hold.
 * Expensive: for tests and assert() only. */
bool kv_pool_check(const kv_pool_t *pool);

/* A new, empty sequence.  Returns 0 or KVS_ENOMEM. */
int kv_table_new(kv_pool_t *pool, kv_table_t **out);
/* Drops every block reference and frees the table.  NULL is a no-op. */
void kv_table_free(kv_table_t *t);

/* Makes room for n more entries.  0: the next n appends will succeed;
 * KVS_EAGAIN: not enough free blocks now (wait or preempt);
 * KVS_ENOSPC: the sequence could never fit in this pool.  Reservation
 * allocates the blocks (and copies a shared partial last block so the
 * appends never write into a block another table reads). */
int kv_table_reserve(kv_table_t *t, uint32_t n);
/* Assigns slots for n entries at RoPE positions pos[0..n) (host arrays),
 * writing slot = block * block_tokens + offset into slots[].  Requires a
 * prior successful reserve of at least n.  Returns 0, KVS_ENOSPC when not
 * reserved (or when it would write into a shared, partly filled block), or
 * KVS_EINVAL (NULL arrays, a negative position or INT32_MAX). */
int kv_table_append(kv_table_t *t, const int32_t *pos, uint32_t n, int32_t *slots);
/* Drops entries from the end so that n_tokens remain, releasing blocks no
 * longer used, including those reserved ahead.  KVS_EINVAL if n > len. */
int kv_table_truncate(kv_table_t *t, uint32_t n_tokens);

/* A new table sharing t's full blocks (refcount + 1) and with a private
 * copy of t's partial last block (copied with kern_kv_copy).  Returns 0,
 * KVS_EAGAIN (no free block for the copy), KVS_ENOMEM, or an error from
 * kern_kv_copy (e.g. KVS_EDEVICE); on failure nothing changes.  Reserve can
 * pass kern_kv_copy errors through the same way. */
int kv_table_fork(const kv_table_t *t, kv_table_t **out);

uint32_t kv_table_len(const kv_table_t *t);      /* KV entries */
uint32_t kv_table_n_blocks(const kv_table_t *t); /* blocks held, incl. reserved ahead */
const int32_t *kv_table_blocks(const kv_table_t *t);
const int32_t *kv_table_positions(const kv_table_t *t); /* [len] */
/* Next RoPE position (max position + 1, or 0); differs from len once
 * entries are dropped or positions skip. */
int32_t kv_table_next_pos(const kv_table_t *t);

/* Writes the CSR page table of n tables into caller arrays:
 * indptr[n + 1], indices[sum of kv_table_n_blocks], last_len[n].  Only the
 * first ceil(len / block_tokens) blocks of each table are exported.  Tables
 * must be non-empty (asserted).  The returned view borrows the arrays. */
kern_page_table_t kv_tables_export(kv_table_t *const *tables, uint32_t n, int32_t *indptr,
                                   int32_t *indices, int32_t *last_len);

#endif /* KV_H */
