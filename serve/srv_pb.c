/*
 * serve/srv_pb.c — protobuf-c messages to and from gRPC byte buffers, for
 * the server (srv_grpc.c) and the C client (srv_client.c).
 */
#include "srv_int.h"

#include <grpc/byte_buffer_reader.h>

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
srv_bb_to_pb(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *d)
{
    if (bb == NULL)
        return NULL;
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb))
        return NULL;
    /* Requests may arrive in several slices: one contiguous copy. */
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    ProtobufCMessage *m =
        protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    return m;
}
