#!/usr/bin/env bash
# Regenerate the Python gRPC stubs committed next to headrace/api/v1/*.proto.
# Usage: scripts/gen_proto.sh   (needs grpcio-tools: pip install 'headrace[dev]')
# The .proto files sit at their import path, so generated imports are headrace.api.v1.*;
# the wire package (headrace.v1) and service names do not depend on where they sit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
find headrace/api/v1 -name '*_pb2*' -delete
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
  $(find headrace/api/v1 -name '*.proto' | sort)
echo "generated: $(ls headrace/api/v1/*_pb2*.py* | tr '\n' ' ')"
