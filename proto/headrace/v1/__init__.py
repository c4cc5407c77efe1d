"""Generated gRPC/protobuf code of the Headrace API (see scripts/gen_proto.sh)."""
