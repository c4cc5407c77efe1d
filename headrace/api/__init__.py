"""The gRPC API: generated protobuf and gRPC code (wire package ``headrace.v1``)."""
