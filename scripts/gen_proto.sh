#!/usr/bin/env bash
# Regenerate the Python gRPC stubs committed next to proto/headrace/v1/*.proto.
# Usage: scripts/gen_proto.sh   (needs grpcio-tools: pip install 'headrace[dev]')
# Imports in the generated code are rooted at the repository: proto.headrace.v1.*.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
# Generate under a temporary root named "proto" so imports become proto.headrace.v1.*.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/proto"
cp -r proto/headrace "$tmp/proto/"
find "$tmp/proto" -name '*_pb2*' -delete
"$PY" -m grpc_tools.protoc -I "$tmp" --python_out=. --pyi_out=. --grpc_python_out=. \
  $(cd "$tmp" && find proto -name '*.proto' | sort)
echo "generated: $(ls proto/headrace/v1/*_pb2*.py* | tr '\n' ' ')"
