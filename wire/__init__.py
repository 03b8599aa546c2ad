"""kvshard.wire — the wire contract the service and the client both import: the stubs generated from
proto/kvshard/v1 (kvshard_pb2, kvshard_pb2_grpc), the tensor codec (tensors) and status details (status).
It needs only grpcio, protobuf and numpy, so the SDK stands alone."""
