#!/usr/bin/env bash
# Regenerate protocol/*_pb2.py and *_pb2.pyi from the .proto files.
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
    protocol/venue.proto protocol/consumer.proto protocol/control.proto
