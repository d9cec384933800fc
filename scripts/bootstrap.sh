#!/usr/bin/env bash
# Creates ./.venv with everything effst needs on a CPU machine (idempotent; re-run is cheap).
# Versions are pinned to what the GPU machine runs (triton 3.6) and what CI's disk offers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.effst-bootstrap
want=$(cat scripts/requirements-cpu.txt scripts/bootstrap.sh pyproject.toml setup.py | sha1sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -m pip install -q -r scripts/requirements-cpu.txt 2>&1 | grep -v '^WARNING: Location' || true
    # SpikingJelly 2.0.0 declares torchvision/torchaudio/SciencePlots, none of which its neuron
    # code needs and which would replace the pinned torch: install it without them.
    .venv/bin/python -m pip install -q --no-deps spikingjelly==2.0.0 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -c "import torch, triton, numpy, spikingjelly, effst" \
        || { echo "bootstrap: the environment did not come up (see the pip output above)" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
# Build (or find up to date in its cache) the native sLIF extension now rather than inside the
# first test or training step; a failure leaves backend='auto' on the reference, with a warning.
.venv/bin/python -m effst.ops.slif_native >/dev/null \
    || echo "bootstrap: the native sLIF extension did not build; backend='auto' will use the reference" >&2
