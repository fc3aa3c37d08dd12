/*
 * base/kvs_err.c — error names and messages from the KVS_ERRNO_MAP table,
 * and the always-on assertion failure path.  Called from everywhere.
 */
#include "kvs.h"

#include <stdio.h>
#include <stdlib.h>

const char *
kvs_strerror(int err)
{
    if (err == 0)
        return "success";
    switch (err) {
#define KVS__ERR_MSG(name, val, msg) \
    case KVS_E##name:                \
        return msg;
        KVS_ERRNO_MAP(KVS__ERR_MSG)
#undef KVS__ERR_MSG
    }
    return "unknown error";
}

const char *
kvs_err_name(int err)
{
    if (err == 0)
        return "OK";
    switch (err) {
#define KVS__ERR_NAME(name, val, msg) \
    case KVS_E##name:                 \
        return "KVS_E" #name;
        KVS_ERRNO_MAP(KVS__ERR_NAME)
#undef KVS__ERR_NAME
    }
    return "KVS_E?";
}

void
kvs__assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "kvserve: assertion failed: %s (%s:%d)\n", expr, file, line);
    fflush(stderr);
    abort();
}
