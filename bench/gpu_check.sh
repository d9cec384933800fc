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
#      sparse, train-step (effst eager and CUDA graphs, token selection under CUDA graphs and
#      eager, then SpikingJelly 2.0.0 and 0.0.0.0.14 cupy); each suite under its own budget, keeping the rows it finished; then the tables
#      and plots re-rendered from the JSON (survives a killed bench)
#   4. the GPU tests (EFFST_TEST_DEVICE=cuda), after the bench so its rows always exist, in three
#      steps, most important first: gpu-tests-core (CUDA graphs, no host sync, determinism, the
#      bf16 covering set: tests/test_slif_triton.py and tests/test_slif_cuda_graphs.py), then
#      gpu-compile-tests (-m "gpu and compile": torch.compile incl. reduce-overhead), then
#      gpu-tests-rest (every other gpu test, in REST_FIRST's order, then every other test file,
#      the native CUDA file last: alphabetically its 61 tests ran before the token tests of issue 12).
#      Meanwhile the native extension (CPU + CUDA kernels) builds in the background
#      (native-build, 8 compile jobs; after the bench, whose host-bound timings it would disturb),
#      so the native tests and the profile find it built; a build stopped by its limit or by the
#      deadline releases torch's build lock (SIGTERM is turned into an exception).
#      Each test is limited to EFFST_TEST_TIMEOUT s (tests/conftest.py: it fails, the rest go on;
#      one stuck in C code gets its stack printed and ends the step) and each failure's
#      traceback is printed when it happens, so a step cut by its limit still shows why.
#   5. bench/profile_host.py (where a tiny call's host time goes; into the log); its native-CUDA
#      row only when the extension is built (native-build), else EFFST_NATIVE_DISABLE=1 (a first
#      build takes longer than the step: it cut the step on 2026-11-30). With EFFST_GPU_TUNE=1
#      also bench/tune_slif.py (the sLIF backward's launch-parameter sweep,
#      $OUT/tune/tune_slif.json) after the compile tests.
# Time: the script ends DEADLINE (465) s after it starts, whatever hangs. Each step runs under
# min(its own limit, the time left before the deadline minus the floors kept for the steps after
# it), so time a fast step leaves goes to the next ones and a late step still gets its floor.
# Sizes from the H200 runs of 2026-11-29 and 2026-11-30 (install 2 s, versions 10 s; bench
# 179 s: neuron 75 s, overhead > 10 s (cut), sparse 52 s, train-step 35 s, start-up and tables
# 7 s; tests: 79 gpu tests incl. the native CUDA build 41 s on 2026-11-29, 17 of 96 plus
# start-up > 65 s on 2026-11-30, the 2 compile tests 22 s; host profile > 15 s because it
# started the native build). test_gpu_check_budgets_fit_the_device_session checks the sums.
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
        -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
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

# Per-step time limits (seconds) and floors (the least a step keeps when earlier ones ran long):
# see the header. The bench's suite budgets (neuron 85 + overhead 20 + sparse 75 + train-step 60
# = 240 s) plus its start-up and tables (~10 s) fit its limit; sparse has 75 s because it took
# 52 s of 55 on 2026-11-30 and now has the spike-bytes row (a block-sparse Spikformer-4-384
# timed with bf16 and uint8 spikes, ~10-15 s estimated), overhead 20 s because 10 cut
# SpikingJelly's row, train-step 60 s for its 35 s plus the CUDA-graph token rows and the fused
# token kernels' compiles (~10-14 s estimated from the 2026-11-30 per-row times).
DEADLINE=465; KILL_GRACE=3; MIN_STEP=5
T_INSTALL=10; T_VERSIONS=15; T_BENCH=255; T_RENDER=10
T_TESTS_CORE=90; T_TESTS_COMPILE=50; T_TESTS_REST=120; T_TUNE=0; T_PROFILE=25
declare -A FLOOR=([render]=5 [gpu-tests-core]=45 [gpu-compile-tests]=30 [tune-slif]=25
                  [gpu-tests-rest]=30 [host-profile]=15)
T_NATIVE_BUILD=150  # background, from the core tests on; waited for before gpu-tests-rest
TEST_TIMEOUT=45  # per test (EFFST_TEST_TIMEOUT)
if [ "${EFFST_GPU_TUNE:-0}" = 1 ]; then T_TUNE=60; fi  # forward and backward sweeps (tune_slif.py)
SUITE_TIMEOUTS="neuron=85,overhead=20,sparse=75,train-step=60"
if [ "$DRY" = 1 ]; then
    # CPU at CI size: same steps and flags; the limits only guard against hangs (a 2-core CPU
    # is much slower than an H200 at the same suites)
    DEVICE=cpu; QUICK=--quick; TEST_DEVICE=cpu; SITE="$OUT/site"
    DEADLINE=3000; T_TESTS_CORE=300; T_TESTS_COMPILE=300; T_TESTS_REST=300; T_BENCH=1500
    T_RENDER=60; T_TUNE=60; T_PROFILE=60; TEST_TIMEOUT=600; T_NATIVE_BUILD=900
    SUITE_TIMEOUTS="neuron=400,overhead=200,sparse=400,train-step=600,native-cpu=300"
else
    DEVICE=cuda; QUICK=; TEST_DEVICE=cuda
    # the native CUDA sLIF kernel was measured on 2026-11-30 (bench/RESULTS.md): slower than
    # Triton, so backend='auto' never picks it on CUDA; its rows would not fit the neuron budget
    NEURON_BACKENDS="--effst-backends triton"
fi
# The steps in the order they run (the floors of the later ones are kept back from each step).
PLAN=(install versions bench render gpu-tests-core gpu-compile-tests)
[ "$T_TUNE" -gt 0 ] && PLAN+=(tune-slif)
PLAN+=(native-build gpu-tests-rest host-profile)
# The must-run subset of the GPU tests, in this order: the Triton file first (bf16 covering set,
# determinism), the cached-launch files (CompiledKernel.run bit for bit against kernel[grid],
# sLIF and BlockSparseLinear),
# then the CUDA-graph file, whose last test (bitwise-deterministic parameter
# gradients) was the one running when the 2026-11-30 step was cut.
CORE_TESTS="tests/test_slif_triton.py tests/test_slif_launch_cache.py tests/test_launch_cache.py tests/test_slif_cuda_graphs.py"
# The rest, most important first: issue 12's token selection under CUDA graphs / no host sync and
# its kernels, the spec oracles on compiled kernels, the harness's CUDA rows (incl. the train step
# under CUDA graphs); then every other test file; last the native CUDA kernel's file (61 tests;
# backend='auto' never picks it on CUDA), which alphabetically ran before the token files.
REST_FIRST="tests/test_token_selection.py tests/test_token_kernels.py tests/test_spec_oracles.py tests/test_bench_harness.py"
REST_LAST="tests/test_slif_native.py"

SCRIPT="$REPO/bench/gpu_check.sh"
export DRY SITE PY TEST_DEVICE SCRIPT OUT TEST_TIMEOUT CORE_TESTS REST_FIRST REST_LAST

declare -a SUMMARY=()
FAILED=0
reserve_after() {  # reserve_after NAME: seconds kept back for the steps planned after NAME
    local s found=0 sum=0
    for s in "${PLAN[@]}"; do
        [ "$found" = 1 ] && sum=$((sum + ${FLOOR[$s]:-0} + KILL_GRACE))
        [ "$s" = "$1" ] && found=1
    done
    echo "$sum"
}
step() {  # step NAME LIMIT OK_CODES COMMAND...  (OK_CODES: space-separated exit codes that count as done)
    local name=$1 limit=$2 ok_codes=$3; shift 3
    local start=$SECONDS rc left
    left=$((DEADLINE - SECONDS - $(reserve_after "$name") - KILL_GRACE))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt "$MIN_STEP" ]; then
        echo; echo "=== [$name] SKIPPED: ${limit}s left before the script's ${DEADLINE}s deadline"
        SUMMARY+=("$name: SKIPPED (no time left)"); FAILED=1
        return
    fi
    echo; echo "=== [$name] (limit ${limit}s, at ${SECONDS}s of ${DEADLINE}s) $*"
    export STEP_LIMIT=$limit  # for a step that sizes its own work (tune_slif)
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

run_tests() {  # run_tests MARK_EXPRESSION [PYTEST ARGS...]
    local rc mark=$1; shift
    # -v: one line per test as it finishes, so a step stopped by its limit still shows what passed;
    # failures are printed as they happen (EFFST_TEST_REPORT_NOW, tests/conftest.py);
    # --log-level=WARNING: no DEBUG records of torch.compile in a failure's report
    EFFST_TEST_DEVICE=$TEST_DEVICE EFFST_TEST_REPORT_NOW=1 EFFST_TEST_TIMEOUT=$TEST_TIMEOUT \
        "$PY" -m pytest -m "$mark" -v -rfEs --durations=10 -p no:cacheprovider --log-level=WARNING \
        --benchmark-disable "$@"; rc=$?
    # 5 = no test selected (on the CPU every gpu test is deselected): not a failure of this script
    return $rc
}
run_core_tests() { run_tests "gpu and not compile" $CORE_TESTS; }
run_compile_tests() { run_tests "gpu and compile"; }
rest_test_files() {  # every tests/test_*.py not in CORE_TESTS, in run order (explicit files keep it)
    local f listed=" $CORE_TESTS $REST_FIRST $REST_LAST " files=()
    for f in $REST_FIRST; do files+=("$f"); done
    for f in tests/test_*.py; do [[ "$listed" == *" $f "* ]] || files+=("$f"); done
    for f in $REST_LAST; do files+=("$f"); done
    echo "${files[@]}"
}
run_rest_tests() { run_tests "gpu and not compile" $(rest_test_files); }

tune_slif() {  # sweep of the sLIF backward's block/warps/chunk (bench/tune_slif.py); GPU only
    if [ "$DRY" = 1 ]; then echo "dry run: bench/tune_slif.py needs a GPU"; return 0; fi
    mkdir -p "$OUT/tune" && "$PY" bench/tune_slif.py "$OUT/tune" --budget-s $((STEP_LIMIT - 10))
}

profile_host() {  # where a tiny call's host time goes (bench/profile_host.py); text into the log
    # Its native-CUDA row only when the extension is built (native-build): see the header.
    if ! "$PY" -c "import sys; from effst.ops import slif_native as n; \
sys.exit(0 if any(n.cache_dir().glob('effst_native*.so')) else 1)" 2>/dev/null; then
        echo "host-profile: the native extension is not built in this session; EFFST_NATIVE_DISABLE=1 (no native row)"
        export EFFST_NATIVE_DISABLE=1
    fi
    "$PY" bench/profile_host.py --calls 200
}

build_native() {  # the native extension, as the tests' first native call would build it
    MAX_JOBS=${MAX_JOBS:-8} "$PY" - <<'EOF'
import signal, sys, time

def stop(signum, frame):  # an exception, so torch's build lock is released on the way out
    raise KeyboardInterrupt("native build stopped by gpu_check.sh (its limit or the deadline)")

signal.signal(signal.SIGTERM, stop)
start = time.perf_counter()
from effst.ops import slif_native
ok, reason = slif_native.native_status()
took = time.perf_counter() - start
print(f"native extension: {'ready ' + str(slif_native.native_build_info()) if ok else 'UNAVAILABLE: ' + reason}"
      f" ({took:.0f} s; cache {slif_native.cache_dir()})")
sys.exit(0 if ok else 1)
EOF
}
NATIVE_PID=
native_build_start() {  # in the background, output into a file shown when it is waited for
    NATIVE_LOG=$(mktemp /tmp/effst-native-build.XXXXXX)
    NATIVE_START=$SECONDS
    timeout --kill-after=$KILL_GRACE "$T_NATIVE_BUILD" bash -c build_native > "$NATIVE_LOG" 2>&1 &
    NATIVE_PID=$!
    echo; echo "=== [native-build] started in the background (limit ${T_NATIVE_BUILD}s, at ${SECONDS}s of ${DEADLINE}s)"
}
native_build_finish() {  # wait for it, at most until the floors of the steps after it are due
    local until rc verdict=FAILED
    until=$((DEADLINE - $(reserve_after native-build) - KILL_GRACE))
    while kill -0 "$NATIVE_PID" 2>/dev/null && [ "$SECONDS" -lt "$until" ]; do sleep 1; done
    kill -0 "$NATIVE_PID" 2>/dev/null && kill -TERM "$NATIVE_PID"  # timeout passes it on
    wait "$NATIVE_PID"; rc=$?
    [ "$rc" = 0 ] && verdict=ok
    case "$rc" in 124|130|137|143) verdict="TIMED OUT" ;; esac
    [ "$verdict" = ok ] || FAILED=1
    echo; echo "=== [native-build] output:"; cat "$NATIVE_LOG"; rm -f "$NATIVE_LOG"
    SUMMARY+=("native-build: $verdict (exit $rc, $((SECONDS - NATIVE_START))s, in the background)")
    echo "=== [native-build] $verdict (exit $rc, $((SECONDS - NATIVE_START))s)"
}

render_results() {  # quiet: the tables are already in the log when the bench finished
    "$PY" -m effst.benchmarks --render "$OUT/bench.json" > /dev/null
}

export -f install_wheels print_versions run_tests run_core_tests run_compile_tests run_rest_tests rest_test_files \
    tune_slif profile_host render_results build_native

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
    native_build_start
    step gpu-tests-core "$T_TESTS_CORE" "0 5" run_core_tests
    step gpu-compile-tests "$T_TESTS_COMPILE" "0 5" run_compile_tests
    if [ "$T_TUNE" -gt 0 ]; then step tune-slif "$T_TUNE" "0" tune_slif; fi
    native_build_finish
    step gpu-tests-rest "$T_TESTS_REST" "0 5" run_rest_tests
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
