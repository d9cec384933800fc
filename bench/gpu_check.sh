#!/usr/bin/env bash
# bench/gpu_check.sh — the one prepared call of a GPU device session (ends within 8 min).
#
#   bash bench/gpu_check.sh              # on the GPU machine (repo root, $OUT = output folder)
#   bash bench/gpu_check.sh --dry-run    # anywhere, CPU only: the same steps at CI size (CI runs it)
#
# Steps, each under `timeout` so one hang cannot eat the session; every step runs even when an
# earlier one failed, and the summary at the end says which did what:
#   1. install the carried wheels from .whl/ into /tmp/site (PYTHONPATH; effst itself runs from
#      the repo via PYTHONPATH, no pip install). spikingjelly 0.0.0.0.14 is NOT installed there:
#      the harness installs it into its own --target dir .peers/sj014 (and 2.0.0 into .peers/sj2)
#      from the same .whl/ folder, so the two versions never share a site.
#   2. print versions (python, torch, CUDA, triton, cupy, spikingjelly, effst, nvidia-smi)
#   3. effst bench all --device cuda: neuron (eager wall + kernel time, both peers), overhead,
#      sparse, train-step (eager, CUDA graphs, SpikingJelly 2.0.0 and 0.0.0.0.14 cupy, token
#      selection); each suite under its own budget, keeping the rows it finished; then the tables
#      and plots re-rendered from the JSON (survives a killed bench)
#   4. the GPU tests: EFFST_TEST_DEVICE=cuda pytest -m "gpu and not compile", then the
#      torch.compile ones (-m "gpu and compile"), after the bench so its rows always exist
#   5. bench/profile_host.py (where a tiny call's host time goes; into the log), and with
#      EFFST_GPU_TUNE=1 bench/tune_slif.py (the sLIF backward's launch-parameter sweep,
#      $OUT/tune/tune_slif.json; the GPU tests then get 35 s less)
# Budgets, sized from the H200 runs of 2026-11-29 and 2026-11-30 (2026-11-30 with these steps:
# neuron 75 s, overhead > 10 s (its budget then; SpikingJelly's row was cut), sparse 52 s,
# train-step 35 s; pytest -m gpu > 110 s in one step with the compile tests first): the step
# limits sum to 437 s (+3 s kill grace each), so the script ends within 8 minutes even when
# every step hangs; bench (235 s) + tests (110 + 45 s) < 7 min.
# Writes to $OUT (at most 8 files come back): gpu_check.log, bench.json, bench.md,
# neuron_time_vs_T.png, overhead.png, sparse_vs_sparsity.png, train_step.png, tune/tune_slif.json.
#
# Wheels to carry in .whl/ (bench/fetch_wheels.sh downloads exactly these; CPython 3.12,
# manylinux x86_64; the dry run fails if this list and fetch_wheels.sh's disagree):
# WHEEL spikingjelly==2.0.0
# WHEEL spikingjelly==0.0.0.0.14
# WHEEL loguru==0.7.3
# WHEEL pytest==9.2.0
# WHEEL pluggy==1.7.0
# WHEEL iniconfig==2.3.1
# WHEEL packaging==26.4
# WHEEL pygments==2.21.0
# WHEEL pytest-benchmark==5.3.1
# WHEEL py-cpuinfo2==10.1.1
# WHEEL ninja==1.13.2
# WHEEL pyyaml==6.0.4
# WHEEL scikit-learn==1.9.1
# WHEEL joblib==1.6.0
# WHEEL threadpoolctl==3.8.0
# WHEEL narwhals==2.29.0
# The image already has torch 2.11, triton 3.6, cupy-cuda13x, numpy, scipy, matplotlib, h5py,
# tqdm, tensorboard, torchvision. Not needed: SciencePlots, torchaudio (spikingjelly 2.0.0 declares
# them; its neuron code does not import them).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
    esac
done

if [ -z "${OUT:-}" ]; then
    if [ "$DRY" = 1 ]; then OUT=$(mktemp -d /tmp/effst-gpu-check-dry.XXXXXX); else
        echo "gpu_check.sh: \$OUT is not set (the device tool sets it; or pass OUT=dir)" >&2; exit 2; fi
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python3}
SITE=${EFFST_SITE:-/tmp/site}

# Per-step time limits (seconds): see the header. The bench's suite budgets (290 s) plus its
# start-up (imports, CUDA init, copy bandwidth: ~10 s) fit inside its step limit.
# Order: the bench first (its rows are the evidence a session exists to record), then the GPU
# tests (fast ones, then the torch.compile ones, which spend most of their time compiling), then
# the sLIF launch-parameter sweep and the host-cost profile. Sizes from the H200 runs of
# 2026-11-29/30 (neuron ~105 s, sparse ~40 s plus models, pytest -m gpu > 110 s in one step).
# The GPU tests need more than 65 s (2026-11-30: cut there, before the bf16 covering set, the
# native CUDA build and the token kernels), so the sweep runs only on request (EFFST_GPU_TUNE=1;
# its results of 2026-11-30 are in bench/RESULTS.md) and the tests get its time.
T_INSTALL=10; T_VERSIONS=12; T_BENCH=235; T_RENDER=10; T_TESTS=110; T_TESTS_COMPILE=45
T_TUNE=0; T_PROFILE=15; KILL_GRACE=3
if [ "${EFFST_GPU_TUNE:-0}" = 1 ]; then T_TUNE=35; T_TESTS=75; fi
SUITE_TIMEOUTS="neuron=85,overhead=20,sparse=55,train-step=60"
if [ "$DRY" = 1 ]; then
    # CPU at CI size: same steps and flags; the limits only guard against hangs (a 2-core CPU
    # is much slower than an H200 at the same suites)
    DEVICE=cpu; QUICK=--quick; TEST_DEVICE=cpu; SITE="$OUT/site"
    T_TESTS=300; T_TESTS_COMPILE=300; T_BENCH=1500; T_RENDER=60; T_TUNE=60; T_PROFILE=60
    SUITE_TIMEOUTS="neuron=400,overhead=200,sparse=400,train-step=600,native-cpu=300"
else
    DEVICE=cuda; QUICK=; TEST_DEVICE=cuda
    # the native CUDA sLIF kernel was measured on 2026-11-30 (bench/RESULTS.md): slower than
    # Triton, so backend='auto' never picks it on CUDA; its rows would not fit the neuron budget
    NEURON_BACKENDS="--effst-backends triton"
fi

SCRIPT="$REPO/bench/gpu_check.sh"
export DRY SITE PY TEST_DEVICE SCRIPT OUT

declare -a SUMMARY=()
FAILED=0
step() {  # step NAME LIMIT OK_CODES COMMAND...  (OK_CODES: space-separated exit codes that count as done)
    local name=$1 limit=$2 ok_codes=$3; shift 3
    local start=$SECONDS rc
    echo; echo "=== [$name] (limit ${limit}s) $*"
    if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a process
        timeout --kill-after=$KILL_GRACE "$limit" bash -c "$1"; rc=$?
    else
        timeout --kill-after=$KILL_GRACE "$limit" "$@"; rc=$?
    fi
    local took=$((SECONDS - start)) verdict=FAILED
    for c in $ok_codes; do [ "$rc" = "$c" ] && verdict=ok; done
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && verdict="TIMED OUT"
    [ "$verdict" = ok ] || FAILED=1
    SUMMARY+=("$name: $verdict (exit $rc, ${took}s)")
    echo "=== [$name] $verdict (exit $rc, ${took}s)"
}

install_wheels() {
    # The header's list must match fetch_wheels.sh's (the only place that downloads them).
    local header fetch
    header=$(sed -n 's/^# WHEEL //p' "$SCRIPT")
    fetch=$(bash bench/fetch_wheels.sh --print)
    if [ "$header" != "$fetch" ]; then
        echo "gpu_check.sh: the WHEEL list in this header differs from bench/fetch_wheels.sh --print:"
        diff <(echo "$header") <(echo "$fetch")
        return 1
    fi
    local wheels=() w missing=0 name version
    for w in $header; do
        name=${w%%==*}; version=${w##*==}
        if ! ls .whl/ 2>/dev/null | tr 'A-Z' 'a-z' | grep -q "^$(echo "${name//-/_}-${version}-" | tr 'A-Z' 'a-z')"; then
            echo "missing wheel for $w in .whl/"; missing=1
        fi
    done
    if [ "$DRY" = 1 ]; then
        # The dry run checks the list and the split; it does not install CPython-3.12 wheels into CI.
        echo "dry run: would install into $SITE:"
        ls .whl/*.whl 2>/dev/null | grep -v 'spikingjelly-0\.0\.0\.0\.14' || echo "  (no .whl/ here: fine for a dry run)"
        return 0
    fi
    [ "$missing" = 0 ] || echo "gpu_check.sh: some wheels are missing; the steps that need them will report it"
    for w in .whl/*.whl; do
        case "$(basename "$w")" in spikingjelly-0.0.0.0.14-*) ;; *) wheels+=("$w") ;; esac
    done
    [ "${#wheels[@]}" -gt 0 ] || { echo "no wheels in .whl/"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
}

print_versions() {
    "$PY" - <<'EOF'
import importlib, json, os, platform, sys
print("python", sys.version.split()[0], sys.executable)
print("PYTHONPATH", os.environ.get("PYTHONPATH"))
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB", "count", torch.cuda.device_count())
from importlib import metadata
for name, dist in (("triton", "triton"), ("numpy", "numpy"), ("cupy", None), ("spikingjelly", "spikingjelly"),
                   ("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"), ("ninja", "ninja"),
                   ("loguru", "loguru"), ("yaml", "pyyaml"), ("sklearn", "scikit-learn"), ("effst", None)):
    try:
        mod = importlib.import_module(name)
        version = getattr(mod, "__version__", None) or (metadata.version(dist) if dist else "?")
        print(name, version, getattr(mod, "__file__", ""))
    except Exception as exc:
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi: not available"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not on PATH"
    echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p') x $(nproc)"
}

run_tests() {  # run_tests MARK_EXPRESSION
    local rc
    # -v: one line per test as it finishes, so a step stopped by its limit still shows what passed
    EFFST_TEST_DEVICE=$TEST_DEVICE "$PY" -m pytest -m "$1" -v -rfEs --durations=10 -p no:cacheprovider \
        --benchmark-disable; rc=$?
    # 5 = no test selected (on the CPU every gpu test is deselected): not a failure of this script
    return $rc
}
run_fast_tests() { run_tests "gpu and not compile"; }
run_compile_tests() { run_tests "gpu and compile"; }

tune_slif() {  # sweep of the sLIF backward's block/warps/chunk (bench/tune_slif.py); GPU only
    if [ "$DRY" = 1 ]; then echo "dry run: bench/tune_slif.py needs a GPU"; return 0; fi
    mkdir -p "$OUT/tune" && "$PY" bench/tune_slif.py "$OUT/tune" --budget-s $((T_TUNE - 10))
}

profile_host() {  # where a tiny call's host time goes (bench/profile_host.py); text into the log
    "$PY" bench/profile_host.py --calls 200
}

render_results() {  # quiet: the tables are already in the log when the bench finished
    "$PY" -m effst.benchmarks --render "$OUT/bench.json" > /dev/null
}

export T_TUNE
export -f install_wheels print_versions run_tests run_fast_tests run_compile_tests tune_slif \
    profile_host render_results

main() {
    echo "gpu_check.sh $([ "$DRY" = 1 ] && echo '--dry-run ')on $(hostname) at $(date -u +%FT%TZ); repo $REPO; OUT=$OUT"
    step install "$T_INSTALL" "0" install_wheels
    if [ "$DRY" = 0 ]; then
        export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONDONTWRITEBYTECODE=1
    step versions "$T_VERSIONS" "0" print_versions
    step bench "$T_BENCH" "0 3" "$PY" -m effst.benchmarks all --device "$DEVICE" $QUICK --out "$OUT" \
        --suite-timeout "$SUITE_TIMEOUTS" ${NEURON_BACKENDS:-}
    if [ -f "$OUT/bench.json" ]; then  # tables and plots again from the JSON: a killed bench still reports
        step render "$T_RENDER" "0 3" render_results
    else
        SUMMARY+=("render: FAILED (no bench.json)"); FAILED=1
    fi
    step gpu-tests "$T_TESTS" "0 5" run_fast_tests
    step gpu-compile-tests "$T_TESTS_COMPILE" "0 5" run_compile_tests
    if [ "$T_TUNE" -gt 0 ]; then step tune-slif "$T_TUNE" "0" tune_slif; fi
    step host-profile "$T_PROFILE" "0" profile_host
    echo; echo "=== summary"
    printf '  %s\n' "${SUMMARY[@]}"
    echo "files in $OUT:"; ls -la "$OUT"
    local count; count=$(find "$OUT" -maxdepth 1 -type f | wc -l)
    [ "$count" -le 8 ] || echo "WARNING: $count files in \$OUT; only 8 come back"
    [ "$DRY" = 1 ] && rm -rf "$SITE"
    return $FAILED
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
