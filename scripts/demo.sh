#!/usr/bin/env bash
# The main job: MT-Bench as one endless conversation through gateway and worker.
# Extra arguments go to `sinkserve replay` (for example --questions 10).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
exec .venv/bin/sinkserve --log-level WARNING replay "$@"
