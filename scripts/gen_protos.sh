#!/usr/bin/env bash
# Regenerate the Python code of protos/ (committed, so installs need no protoc).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  protos/sinkserve/v1/sinkserve.proto
