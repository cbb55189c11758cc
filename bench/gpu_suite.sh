#!/usr/bin/env bash
# One run on a GPU machine with no network: build in place for sm_90, run the
# CUDA tests, benchmark the copy engine (bandwidth per piece size, the store's
# per-layer pattern, compute slowdown under overlapping copies), the TTFT
# benchmark when bench/test_gpu_ttft.py exists, then compute-sanitizer
# memcheck and racecheck on the copy tests. Everything lands under $OUT
# (default ./out) in at most 8 files (the device tool brings back 8):
#
#   suite.log          every step's output, the summary table last
#   build.log          the full build
#   sanitizer.log      memcheck then racecheck
#   cuda_bench.json    pytest-benchmark's raw numbers for bench/test_cuda_copy.py
#   cuda_summary.json  the summary rows (GB/s, slowdown) with the build's features
#   ttft.json, ttft_summary.json   bench/test_gpu_ttft.py's (when it exists)
#
#   OUT=/tmp/out bash bench/gpu_suite.sh        # whole suite, ~540 s budget
#   SUITE_BUDGET_S=300 SUITE_SKIP="sanitizer ttft" bash bench/gpu_suite.sh
#   SUITE_ALLOW_NO_GPU=1 bash bench/gpu_suite.sh  # dry run of the script on a CPU machine (all skips)
#
# Each step's timeout is cut to what is left of SUITE_BUDGET_S, so the run ends
# inside the device tool's 600 s per command. The image has python3 with torch,
# pytest-benchmark, pybind11, cmake, ninja and xxhash; if a package is missing,
# carry wheels in .gpu-wheels (see /work/.library/device/README.md) and this
# script installs them offline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/suite.log") 2>&1
TEE_PID=$!
# Every exit, early ones too: suite.log is complete before the tool collects $OUT.
trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT
export PYTHONUNBUFFERED=1
BUDGET="${SUITE_BUDGET_S:-540}"
SKIP=" ${SUITE_SKIP:-} "
T0=$SECONDS
status=0
step() { echo; echo "=== $* ($(date +%T), $((SECONDS - T0)) s in)"; }
# left CAP: seconds a step may take, at most CAP and what remains of the budget (at least 10).
left() { local r=$((BUDGET - (SECONDS - T0))); [ "$r" -gt "$1" ] && r=$1; [ "$r" -lt 10 ] && r=10; echo "$r"; }
skipped() { [[ "$SKIP" == *" $1 "* ]] && { echo "(skipped: SUITE_SKIP)"; return 0; }; return 1; }

step "card"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max \
  --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "offline wheels"
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --no-index --find-links .gpu-wheels xxhash 2>&1 | tail -2
fi
python3 -c "import xxhash, pytest_benchmark" || { echo "xxhash or pytest-benchmark missing: see this script's header"; exit 1; }

step "build in place, sm_90 (CUDA required)"
# In place, no pip install: the tree is a copy, nothing else imports it.
export CACHEDATTN_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90-real"
if ! timeout "$(left 300)" python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "copy engine|warning" "$OUT/build.log" | head -20
python3 -m cachedattn info
# Every CUDA test and benchmark skips without a GPU: a suite of skips must not pass as a GPU run.
if [ -z "${SUITE_ALLOW_NO_GPU:-}" ]; then
  python3 -c "from cachedattn import native; import sys; sys.exit(0 if native.cuda_available() else 'no usable GPU: ' + native.cuda_unavailable_reason())" || exit 1
fi

step "CUDA tests"
# Only the files that hold CUDA tests: collecting all of tests/ would need every optional package.
CUDA_TESTS=$(grep -rlE "mark\.cuda|pytestmark = pytest\.mark\.cuda" tests --include="test_*.py" | sort)
echo "$CUDA_TESTS"
CACHEDATTN_EXPECT_CUDA_BUILD=1 timeout "$(left 180)" python3 -m pytest $CUDA_TESTS tests/test_build.py -q -p no:cacheprovider -rs 2>&1 | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "copy-engine benchmarks"
CACHEDATTN_BENCH_SUMMARY="$OUT/cuda_summary.json" timeout "$(left 200)" python3 -m pytest bench/test_cuda_copy.py \
  -q -p no:cacheprovider --benchmark-max-time=0.5 --benchmark-min-rounds=5 --benchmark-columns=median,iqr,rounds \
  --benchmark-json="$OUT/cuda_bench.json" 2>&1 | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "TTFT (bench/test_gpu_ttft.py)"
if skipped ttft; then :
elif [ -f bench/test_gpu_ttft.py ]; then
  CACHEDATTN_BENCH_SUMMARY="$OUT/ttft_summary.json" timeout "$(left 240)" python3 -m pytest bench/test_gpu_ttft.py \
    -q -p no:cacheprovider --benchmark-json="$OUT/ttft.json" 2>&1 | tail -60
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "bench/test_gpu_ttft.py not in this tree: skipped"
fi

step "compute-sanitizer memcheck + racecheck (copy tests)"
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
if skipped sanitizer; then :
elif [ -x "$SAN" ]; then
  # No caching allocator: out-of-bounds accesses into torch buffers are caught too.
  # The GIL test times Python between host waits: the sanitizer's slowdown would fail it for nothing.
  {
    echo "--- memcheck"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(left 150)" "$SAN" --tool memcheck --error-exitcode 9 \
      python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider -k "not gil"
    echo "memcheck exit $?"
    # racecheck checks shared-memory hazards inside the kernels: the segment and RoPE kernels.
    echo "--- racecheck"
    timeout "$(left 90)" "$SAN" --tool racecheck --error-exitcode 9 \
      python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider -k "segment or rope"
    echo "racecheck exit $?"
  } >"$OUT/sanitizer.log" 2>&1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|exit [0-9]+" "$OUT/sanitizer.log" | tail -8
  grep -qE "^(memcheck|racecheck) exit [1-9]" "$OUT/sanitizer.log" && status=1
else
  echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"
fi

step "summary"
for f in "$OUT/cuda_summary.json" "$OUT/ttft_summary.json"; do
  [ -f "$f" ] || continue
  python3 - "$f" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    extra = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in ("suite", "case"))
    print(f"{r.get('case', '?'):<52} {extra}")
PY
done
echo "suite exit $status after $((SECONDS - T0)) s"
exit $status
