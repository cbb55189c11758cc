#!/usr/bin/env bash
# One run on a GPU machine with no network, at most 6 minutes (SUITE_BUDGET_S, default 360), so that a
# rerun fits in the 15 minutes of device time a lent machine comes with. Steps run most valuable first;
# the budget clamp stops STARTING steps once too little is left for a step's minimum (it never stretches
# a step), and cuts each step's timeout to what remains:
#
#   1. build in place for sm_90 (everything else needs it)
#   2. the GPU-path tests on the card, fp32: equivalence through the native copy engine (turns, restart
#      from disk, read buffer, the chunk-boundary sweep), the tests that take the `gpu` fixture
#      (tests/conftest.py) with CACHEDATTN_GPU_TESTS=1, their [cuda] cases only
#   3. compute-sanitizer memcheck, then initcheck, on a short cached turn (PYTORCH_NO_CUDA_MEMORY_CACHING=1,
#      so torch buffers are separate allocations). racecheck/synccheck see only hazards inside kernels:
#      stream ordering is the CPU race detector's job (docs/gpu-ordering.md)
#   4. the chunk-boundary sweep in bf16 (CACHEDATTN_TEST_DTYPE=bfloat16)
#   5. the CUDA unit tests (kernels, copy engine)
#   6. issue 12's figures: H2D GB/s by piece size (bench/test_cuda_copy.py), TTFT vs recompute and ideal at
#      1K/4K/16K (bench/test_gpu_ttft.py), peak GPU memory by read-ahead (bench/gpu_memory.py)
#
# Everything lands under $OUT (default ./out), at most 8 files (the device tool brings back 8):
#   suite.log  build.log  sanitizer.log  cuda_bench.json  cuda_summary.json  ttft.json  ttft_summary.json
#   memory.json
#
#   OUT=/tmp/out bash bench/gpu_suite.sh                 # on the card
#   SUITE_SKIP="ttft memory" bash bench/gpu_suite.sh     # leave steps out (names: see `run_step` calls)
#   SUITE_DRY=cpu bash bench/gpu_suite.sh                # CPU dry run: no build, the fake engine, CPU dry
#                                                        # paths of every step (what CI can check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/suite.log") 2>&1
TEE_PID=$!
# Every exit, early ones too: suite.log is complete before the tool collects $OUT.
trap 'exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT
export PYTHONUNBUFFERED=1
BUDGET="${SUITE_BUDGET_S:-360}"
SKIP=" ${SUITE_SKIP:-} "
DRY="${SUITE_DRY:-}"
T0=$SECONDS
status=0
PYTEST=(python3 -m pytest -q -p no:cacheprovider -rfEs)

remaining() { echo $((BUDGET - (SECONDS - T0))); }

# run_step NAME CAP MIN CMD...: runs CMD with a timeout of min(CAP, remaining) seconds, only if at least
# MIN seconds remain; a failing or timed-out step marks the suite failed. $STEP_T is the timeout given.
run_step() {
  local name=$1 cap=$2 min=$3 left
  shift 3
  left=$(remaining)
  echo
  echo "=== $name ($(date +%T), $((SECONDS - T0)) s in, $left s left)"
  if [[ "$SKIP" == *" $name "* ]]; then echo "(skipped: SUITE_SKIP)"; return 0; fi
  if [ "$left" -lt "$min" ]; then echo "(not started: budget spent, $left s left < $min s)"; return 0; fi
  STEP_T=$cap
  [ "$left" -lt "$cap" ] && STEP_T=$left
  export STEP_T
  "$@"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "step $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"
    status=1
  fi
  return 0
}

card() {
  if [ -n "$DRY" ]; then echo "dry run on the CPU: $(nproc) cores"; python3 -c "import torch; print('torch', torch.__version__)"; return 0; fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max \
    --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  if [ -d .gpu-wheels ]; then python3 -m pip install -q --no-index --find-links .gpu-wheels xxhash 2>&1 | tail -2; fi
  python3 -c "import xxhash, pytest_benchmark" || { echo "xxhash or pytest-benchmark missing (carry .gpu-wheels)"; return 1; }
}

build() {
  if [ -n "$DRY" ]; then echo "dry run: the extension already in the tree is used"; python3 -m cachedattn info; return 0; fi
  # In place, no pip install: the tree is a copy, nothing else imports it.
  export CACHEDATTN_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90-real"
  if ! timeout "$STEP_T" python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "BUILD FAILED"; return 1
  fi
  grep -E "copy engine|warning" "$OUT/build.log" | head -20
  python3 -m cachedattn info
  # Every CUDA test and benchmark skips without a GPU: a suite of skips must not pass as a GPU run.
  python3 -c "from cachedattn import native; import sys; sys.exit(0 if native.cuda_available() else 'no usable GPU: ' + native.cuda_unavailable_reason())"
}

# The GPU-path tests taking the `gpu` fixture; on the card their [cuda] cases, dry: a few [fake] ones.
GPU_PATH_TESTS=(tests/transfer/test_gpu_path.py tests/transfer/test_chunk_boundaries.py)
gpu_path_k() { if [ -n "$DRY" ]; then echo "fake-llama-1] or fake-full-1]"; else echo "cuda"; fi; }

gpu_path() {
  CACHEDATTN_GPU_TESTS=1 timeout "$STEP_T" "${PYTEST[@]}" "${GPU_PATH_TESTS[@]}" -k "$(gpu_path_k)" 2>&1 | tail -25
  return "${PIPESTATUS[0]}"
}

sanitizer() {
  local san
  san="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
  # A short cached turn: two turns of the tiny llama through the native engine, read-ahead 1.
  local one="tests/transfer/test_gpu_path.py::test_gpu_branch_matches_recompute[cuda-llama-1]"
  if [ -n "$DRY" ] || [ ! -x "$san" ]; then
    echo "compute-sanitizer not run ($([ -n "$DRY" ] && echo 'dry run' || echo 'not found')): the selected test on its own:" \
      | tee "$OUT/sanitizer.log"
    one="${one/cuda/fake}"
    timeout "$STEP_T" "${PYTEST[@]}" "$one" 2>&1 | tail -3 | tee -a "$OUT/sanitizer.log"
    return "${PIPESTATUS[0]}"
  fi
  local half=$((STEP_T / 2)) rc=0
  {
    for tool in memcheck initcheck; do
      echo "--- $tool"
      CACHEDATTN_GPU_TESTS=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$half" "$san" --tool "$tool" \
        --error-exitcode 9 "${PYTEST[@]}" -x "$one"
      echo "$tool exit $?"
    done
  } >"$OUT/sanitizer.log" 2>&1
  grep -E "ERROR SUMMARY|passed|failed|exit [0-9]+" "$OUT/sanitizer.log" | tail -8
  grep -qE "^(memcheck|initcheck) exit [1-9]" "$OUT/sanitizer.log" && rc=1
  return $rc
}

bf16_sweep() {
  CACHEDATTN_GPU_TESTS=1 CACHEDATTN_TEST_DTYPE=bfloat16 timeout "$STEP_T" "${PYTEST[@]}" \
    tests/transfer/test_chunk_boundaries.py -k "$(gpu_path_k)" 2>&1 | tail -15
  return "${PIPESTATUS[0]}"
}

cuda_tests() {
  if [ -n "$DRY" ]; then echo "dry run: the CUDA tests skip without a card; collection only:"; fi
  # Only the files that hold CUDA tests: collecting all of tests/ would need every optional package.
  local files
  files=$(grep -rlE "mark\.cuda|pytestmark = pytest\.mark\.cuda" tests --include="test_*.py" | sort)
  echo "$files"
  if [ -n "$DRY" ]; then timeout "$STEP_T" "${PYTEST[@]}" $files --collect-only 2>&1 | tail -2; return "${PIPESTATUS[0]}"; fi
  CACHEDATTN_EXPECT_CUDA_BUILD=1 timeout "$STEP_T" "${PYTEST[@]}" $files tests/test_build.py 2>&1 | tail -30
  return "${PIPESTATUS[0]}"
}

h2d_bandwidth() {
  if [ -n "$DRY" ]; then echo "dry run: bench/test_cuda_copy.py needs a card (collection only)"; \
    timeout "$STEP_T" "${PYTEST[@]}" bench/test_cuda_copy.py --collect-only 2>&1 | tail -1; return 0; fi
  CACHEDATTN_BENCH_SUMMARY="$OUT/cuda_summary.json" timeout "$STEP_T" "${PYTEST[@]}" bench/test_cuda_copy.py \
    --benchmark-max-time=0.3 --benchmark-min-rounds=3 --benchmark-columns=median,iqr,rounds \
    --benchmark-json="$OUT/cuda_bench.json" 2>&1 | tail -40
  return "${PIPESTATUS[0]}"
}

ttft() {
  local dry_env=()
  [ -n "$DRY" ] && dry_env=(CACHEDATTN_TTFT_DRY=cpu)
  env "${dry_env[@]}" CACHEDATTN_BENCH_SUMMARY="$OUT/ttft_summary.json" timeout "$STEP_T" "${PYTEST[@]}" \
    bench/test_gpu_ttft.py --benchmark-json="$OUT/ttft.json" 2>&1 | tail -40
  return "${PIPESTATUS[0]}"
}

memory() {
  local dry_env=()
  [ -n "$DRY" ] && dry_env=(CACHEDATTN_MEM_DRY=cpu)
  env "${dry_env[@]}" timeout "$STEP_T" python3 bench/gpu_memory.py --out "$OUT/memory.json"
}

#        name        cap  min  (seconds)
run_step card         30    5 card || true
[ "$status" -eq 0 ] || { echo "no usable card or packages: stop"; exit 1; }
run_step build       150   60 build
[ "$status" -eq 0 ] || { echo "suite exit 1 after $((SECONDS - T0)) s (build failed)"; exit 1; }
run_step gpu_path     60   20 gpu_path
run_step sanitizer    80   30 sanitizer
run_step bf16_sweep   40   15 bf16_sweep
run_step cuda_tests   50   20 cuda_tests
run_step h2d_bandwidth 30  15 h2d_bandwidth
run_step ttft         90   45 ttft
run_step memory       40   20 memory

echo
echo "=== summary"
for f in "$OUT/cuda_summary.json" "$OUT/ttft_summary.json" "$OUT/memory.json"; do
  [ -f "$f" ] || continue
  python3 - "$f" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in rows:
    extra = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in ("suite", "case"))
    print(f"{str(r.get('case', '')):<40} {extra}")
PY
done
echo "suite exit $status after $((SECONDS - T0)) s"
exit $status
