/*
 * base/kvs_mpsc.c — Vyukov's intrusive multi-producer single-consumer queue.
 * Producers (any thread) do one atomic exchange; the consumer (the loop or
 * engine thread) pops without locks.  Used for the submit/cancel and the
 * token/finish queues between the loop and engine threads.
 */
#include "kvs.h"

void
kvs_mpsc_init(kvs_mpsc_t *q)
{
    atomic_store_explicit(&q->stub.next, NULL, memory_order_relaxed);
    atomic_store_explicit(&q->head, &q->stub, memory_order_relaxed);
    q->tail = &q->stub;
}

void
kvs_mpsc_push(kvs_mpsc_t *q, kvs_mpsc_node_t *n)
{
    atomic_store_explicit(&n->next, NULL, memory_order_relaxed);
    kvs_mpsc_node_t *prev = atomic_exchange_explicit(&q->head, n, memory_order_acq_rel);
    atomic_store_explicit(&prev->next, n, memory_order_release);
}

kvs_mpsc_node_t *
kvs_mpsc_pop(kvs_mpsc_t *q)
{
    kvs_mpsc_node_t *tail = q->tail;
    kvs_mpsc_node_t *next = atomic_load_explicit(&tail->next, memory_order_acquire);
    if (tail == &q->stub) {
        if (next == NULL)
            return NULL;
        q->tail = next;
        tail = next;
        next = atomic_load_explicit(&next->next, memory_order_acquire);
    }
    if (next) {
        q->tail = next;
        return tail;
    }
    kvs_mpsc_node_t *head = atomic_load_explicit(&q->head, memory_order_acquire);
    if (tail != head)
        return NULL; /* a producer is between its exchange and its link */
    kvs_mpsc_push(q, &q->stub);
    next = atomic_load_explicit(&tail->next, memory_order_acquire);
    if (next) {
        q->tail = next;
        return tail;
    }
    return NULL;
}
