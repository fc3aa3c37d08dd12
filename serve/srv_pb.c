/*
 * serve/srv_pb.c — protobuf-c messages to and from gRPC byte buffers, for
 * the server (srv_grpc.c) and the C client (srv_client.c), and the check
 * that no string field of a request holds a NUL byte.
 */
#include "srv_int.h"

#include <grpc/byte_buffer_reader.h>
#include <string.h>

grpc_byte_buffer *
srv_pb_to_bb(const ProtobufCMessage *msg)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1); /* takes its own ref */
    grpc_slice_unref(s);
    return bb;
}

ProtobufCMessage *
srv_bb_to_pb(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *d, char *why, size_t cap)
{
    if (why != NULL)
        snprintf(why, cap, "cannot parse %s", d->short_name);
    if (bb == NULL)
        return NULL;
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return NULL;
    /* Requests may arrive in several slices: one contiguous copy. */
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    const uint8_t *p = GRPC_SLICE_START_PTR(s);
    size_t n = GRPC_SLICE_LENGTH(s);
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, n, p);
    char field[128];
    if (m != NULL && why != NULL && srv_pb_nul_field(d, p, n, field, sizeof field)) {
        snprintf(why, cap, "%s: holds a NUL byte, which string fields may not", field);
        protobuf_c_message_free_unpacked(m, NULL);
        m = NULL;
    }
    grpc_slice_unref(s);
    return m;
}

static bool
read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t x = 0;
    for (unsigned shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return true;
        }
    }
    return false;
}

/* Appends "." (past the root) and name at path[at], cut to cap; the new
 * length. */
static size_t
path_push(char *path, size_t cap, size_t at, const char *name)
{
    int k = snprintf(path + at, cap - at, "%s%s", at ? "." : "", name);
    return k < 0 ? at : at + (size_t)k < cap ? at + (size_t)k : cap - 1;
}

static bool
nul_walk(const ProtobufCMessageDescriptor *d, const uint8_t *p, const uint8_t *end, char *path,
         size_t cap, size_t at, unsigned depth)
{
    if (depth > 64) /* deeper than any message of ours nests */
        return false;
    while (p < end) {
        uint64_t key, n;
        if (!read_varint(&p, end, &key))
            return false;
        switch (key & 7) {
        case 0:
            if (!read_varint(&p, end, &n))
                return false;
            break;
        case 1:
        case 5: {
            size_t w = (key & 7) == 1 ? 8 : 4;
            if ((size_t)(end - p) < w)
                return false;
            p += w;
            break;
        }
        case 2: {
            if (!read_varint(&p, end, &n) || n > (uint64_t)(end - p))
                return false;
            const ProtobufCFieldDescriptor *f =
                key >> 3 <= UINT32_MAX
                    ? protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3))
                    : NULL;
            if (f != NULL && f->type == PROTOBUF_C_TYPE_STRING && memchr(p, 0, n) != NULL) {
                path_push(path, cap, at, f->name);
                return true;
            }
            if (f != NULL && f->type == PROTOBUF_C_TYPE_MESSAGE &&
                nul_walk(f->descriptor, p, p + n, path, cap, path_push(path, cap, at, f->name),
                         depth + 1))
                return true;
            p += n;
            break;
        }
        default: /* groups, which protobuf-c refuses anyway */
            return false;
        }
    }
    return false;
}

bool
srv_pb_nul_field(const ProtobufCMessageDescriptor *d, const uint8_t *buf, size_t len, char *path,
                 size_t cap)
{
    if (cap == 0)
        return false;
    path[0] = '\0';
    if (nul_walk(d, buf, buf + len, path, cap, 0, 0))
        return true;
    path[0] = '\0';
    return false;
}
