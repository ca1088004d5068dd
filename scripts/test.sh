#!/usr/bin/env bash
# Install what the tests need, then run them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test >&2
exec .venv/bin/python -m pytest "$@"
