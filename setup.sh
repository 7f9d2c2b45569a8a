#!/usr/bin/env bash
# Create .venv and install squall with its test tools. Idempotent: a second run installs nothing new.
# torch is installed first and pinned to the CPU build that lies on this kind of machine's disk;
# squall itself does not pin torch (clusters bring their own build).
#
# Prints one line per stage with the time since the start, and pip's own lines for what it
# downloads and installs (``Requirement already satisfied`` lines are left out, so a second run
# is short). SQUALL_SETUP_QUIET=1 prints the stage lines only.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
start=$SECONDS
stage() { printf '[setup %3ds] %s\n' "$((SECONDS - start))" "$*"; }

# pip's output without the lines for what is there already, and without its note about scripts
# installed outside PATH; -q when asked for quiet. pip's exit status is kept (pipefail).
pip() {
    local quiet=()
    [ "${SQUALL_SETUP_QUIET:-0}" = 1 ] && quiet=(-q)
    PYTHONUNBUFFERED=1 .venv/bin/python -m pip --disable-pip-version-check "${quiet[@]}" "$@" 2>&1 \
        | { grep --line-buffered -v -e '^Requirement already satisfied' -e '^WARNING: Location' \
                -e '^  WARNING: The script' -e '^  Consider adding this directory' || true; } \
        | sed -u 's/^/    /'
}

if [ -x .venv/bin/python ]; then
    stage "virtual environment .venv exists ($(.venv/bin/python --version 2>&1))"
else
    stage "creating the virtual environment .venv with $("$python" --version 2>&1)"
    "$python" -m venv .venv
fi

if .venv/bin/python -c "import torch" 2>/dev/null; then
    stage "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') already installed"
else
    # The CPU wheel is ~200 MB: installing it takes about a minute on 2 cores.
    stage "installing torch ${SQUALL_TORCH_VERSION:-2.13.0} (CPU build; about a minute)"
    pip install "torch==${SQUALL_TORCH_VERSION:-2.13.0}"
fi

# mlflow, matplotlib, zarr, hydra, triton and the test tools: about 2 minutes on a fresh
# 2-core machine, most of it unpacking mlflow's dependencies; seconds when they are there.
stage "installing squall and its dependencies (pyproject.toml; ~2 minutes the first time)"
pip install -e '.[dev]'

stage "checking the installation"
.venv/bin/python -c "import squall, torch, triton, mlflow, hydra, zarr, submitit, matplotlib" \
    || { stage "error: the installed packages do not import (see above)"; exit 1; }
stage "done: .venv is ready (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
