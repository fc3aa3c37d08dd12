/*
 * serve/srv_int.h — declarations shared by the files of serve/ only.
 */
#ifndef SRV_INT_H
#define SRV_INT_H

#include "srv.h"

typedef enum srv_task {
    SRV_TASK_PASSKEY,
    SRV_TASK_NIAH_MULTIKEY,
    SRV_TASK_VT,
    SRV_TASK_COUNT,
} srv_task_t;

/* Builds one task prompt of exactly `length` bytes including the answer
 * (the model adds BOS), with the needle at relative depth 0..1; `seed`
 * picks keys and values.  *prompt is malloc'd; answer gets " 12345".
 * Returns 0, KVS_ERANGE (length too small for the needles) or KVS_ENOMEM. */
int srv_task_make(srv_task_t task, uint32_t length, double depth, uint64_t seed, char **prompt,
                  char answer[8]);
const char *srv_task_name(srv_task_t t);
int srv_task_parse(const char *s, srv_task_t *out);

#endif /* SRV_INT_H */
