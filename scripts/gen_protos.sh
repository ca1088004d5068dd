#!/usr/bin/env bash
# Regenerate the Python code of protos/ (committed, so installs need no protoc).
set -euo pipefail
cd "$(dirname "$0")/.."
# Use the repository's .venv when there is one: its python and its
# protoc-gen-mypy plugins (dev extras). Otherwise whatever `python` is.
if [[ -x .venv/bin/python ]]; then
  PATH="$PWD/.venv/bin:$PATH"
fi
python -m grpc_tools.protoc -I . \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  protos/sinkserve/v1/sinkserve.proto
