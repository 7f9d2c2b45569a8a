#!/usr/bin/env bash
# Create .venv and install squall with its test tools. Idempotent: a second run installs nothing new.
# torch is installed first and pinned to the CPU build that lies on this kind of machine's disk;
# squall itself does not pin torch (clusters bring their own build).
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==${SQUALL_TORCH_VERSION:-2.13.0}"
pip install -e '.[dev]'
