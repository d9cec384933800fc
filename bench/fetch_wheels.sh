#!/usr/bin/env bash
# Downloads into .whl/ the wheels bench/gpu_check.sh installs on the GPU machine (whose image has
# torch, triton, cupy-cuda13x, numpy, scipy, matplotlib, h5py, tqdm, tensorboard, torchvision, but
# not these). Run it here, with registry access, before a device session; carry .whl/ with it.
#
#   bash bench/fetch_wheels.sh            # download (pip download --no-deps, CPython 3.12, manylinux x86_64)
#   bash bench/fetch_wheels.sh --print    # print the pinned list, one requirement a line
#   PYVER=3.11 bash bench/fetch_wheels.sh # for another Python on the GPU machine
#
# The list below is the one source of truth; gpu_check.sh's header repeats it for the reader and
# `gpu_check.sh --dry-run` (run in CI) fails when the two disagree. Versions = what CI tests with.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each SpikingJelly version is downloaded by its own pip call (pip refuses two versions of one
# project in one resolution); gpu_check.sh installs 2.0.0 into the main site and leaves 0.0.0.0.14
# to the harness, which installs it into .peers/sj014.
WHEELS=(
    "spikingjelly==2.0.0"        # SpikingJelly 2.0.0: peer, and oracle in the GPU tests
    "spikingjelly==0.0.0.0.14"   # SpikingJelly 0.0.0.0.14: the cupy peer (own --target dir)
    "loguru==0.7.3"              # imported by spikingjelly 2.0.0
    "pytest==9.2.0"
    "pluggy==1.7.0"
    "iniconfig==2.3.1"
    "packaging==26.4"
    "pygments==2.21.0"
    "pytest-benchmark==5.3.1"    # pyproject's addopts passes --benchmark-disable
    "py-cpuinfo2==10.1.1"        # pytest-benchmark's dependency
    "ninja==1.13.2"              # effst's native extension is built with ninja on first use
    "pyyaml==6.0.4"              # effst's CLI configs
    "scikit-learn==1.9.1"        # effst.data (digits)
    "joblib==1.6.0"
    "threadpoolctl==3.8.0"
    "narwhals==2.29.0"
)

if [ "${1:-}" = "--print" ]; then
    for w in "${WHEELS[@]}"; do echo "$w"; done
    exit 0
fi

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PYVER=${PYVER:-3.12}
ABI="cp${PYVER/./}"
mkdir -p .whl
for w in "${WHEELS[@]}"; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
        --python-version "$PYVER" --implementation cp --abi "$ABI" --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any "$w" 2>&1 | grep -v '^WARNING: Location' || true
done
missing=0
for w in "${WHEELS[@]}"; do
    name=${w%%==*}; version=${w##*==}
    pattern="$(echo "$name" | tr '-' '_' )-${version}-"
    if ! ls .whl/ 2>/dev/null | tr 'A-Z' 'a-z' | grep -q "^$(echo "$pattern" | tr 'A-Z' 'a-z')"; then
        echo "fetch_wheels: MISSING $w" >&2
        missing=1
    fi
done
ls -la .whl
du -sh .whl
exit $missing
