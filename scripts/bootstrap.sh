#!/usr/bin/env bash
# Creates ./.venv with everything effst needs on a CPU machine (idempotent; a re-run with
# nothing changed only checks the native build). Versions are pinned to what the GPU machine
# runs (triton 3.6) and what CI's disk offers. Prints one line per step; pip's own output is
# kept in .venv/bootstrap-pip.log and shown only when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log=.venv/bootstrap-pip.log

step() { echo "bootstrap: $*"; }
fail() { echo "bootstrap: $*" >&2; exit 1; }

# Runs pip quietly into the log; on failure shows the log's tail and stops.
pip_quiet() {
    if ! .venv/bin/python -m pip install --no-input "$@" >>"$log" 2>&1; then
        tail -n 30 "$log" >&2
        fail "pip install $* failed (full output: $log)"
    fi
}

if [ ! -x .venv/bin/python ]; then
    # effst itself needs 3.10; SpikingJelly 2.0.0, the tests' oracle installed below, needs 3.11.
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        || fail "Python >= 3.11 is needed (SpikingJelly 2.0.0); $PY is $( (command -v "$PY" >/dev/null && "$PY" --version 2>&1) || echo "not found") (set PYTHON=/path/to/python3.11)"
    step "creating .venv with $("$PY" --version 2>&1)"
    "$PY" -m venv .venv || fail "'$PY -m venv' failed: install the venv module (Debian/Ubuntu: python3-venv)"
fi
stamp=.venv/.effst-bootstrap
want=$(cat scripts/requirements-cpu.txt scripts/bootstrap.sh pyproject.toml setup.py | sha1sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    : >"$log"
    step "installing pinned packages (torch, triton, numpy, pytest, training extras; a few minutes the first time)"
    pip_quiet -q --upgrade pip
    pip_quiet -q -r scripts/requirements-cpu.txt
    # SpikingJelly 2.0.0 declares torchvision/torchaudio/SciencePlots, none of which its neuron
    # code needs and which would replace the pinned torch: install it without them.
    step "installing SpikingJelly 2.0.0 (test oracle and benchmark peer)"
    pip_quiet -q --no-deps spikingjelly==2.0.0
    step "installing effst (editable)"
    pip_quiet -q --no-deps --no-build-isolation -e .
    .venv/bin/python -c "import torch, triton, numpy, spikingjelly, sklearn, matplotlib, effst.nn" >>"$log" 2>&1 \
        || { tail -n 30 "$log" >&2; fail "the environment did not come up (full output: $log)"; }
    echo "$want" > "$stamp"
else
    step ".venv is up to date"
fi
# Build (or find up to date in its cache) the native sLIF extension now rather than inside the
# first test or training step; a failure leaves backend='auto' on the reference, with a warning.
step "checking the native sLIF extension (built once, about a minute; then cached)"
if ! .venv/bin/python -m effst.ops.slif_native >>"$log" 2>&1; then
    echo "bootstrap: the native sLIF extension did not build (a C++ compiler is needed; see $log);" \
         "backend='auto' will use the slower reference on the CPU" >&2
fi
step "ready: .venv/bin/effst --help, .venv/bin/python -m pytest"
