#!/usr/bin/env bash
# One run on a GPU machine with no network: build in place, run the CUDA
# tests, run them again under compute-sanitizer, benchmark the copy engine,
# and print a short table last. Everything lands under $OUT (default ./out).
#
#   OUT=/tmp/out bash bench/gpu_suite.sh
#
# The GPU image has no network and lacks xxhash (a runtime dependency). On the
# CPU machine first run
#   pip download xxhash --python-version 3.12 --only-binary=:all: \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu-wheels
# and name .gpu-wheels in the device call's `carry`; this script installs from it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "card"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
  --format=csv | tee "$OUT/card.csv"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/card.csv"

step "offline wheels"
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --no-index --find-links .gpu-wheels xxhash 2>&1 | tail -2
fi
python3 -c "import xxhash" || { echo "xxhash missing: see the header of this script"; exit 1; }

step "build (CUDA required)"
export CACHEDATTN_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
if ! python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
python3 -m cachedattn info | tee "$OUT/features.json"

step "CUDA tests"
python3 -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer memcheck"
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
if [ -x "$SAN" ]; then
  # No caching allocator: out-of-bounds accesses into torch buffers are caught too.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 300 "$SAN" --tool memcheck --error-exitcode 9 \
    python3 -m pytest tests/test_cuda.py -q -x -p no:cacheprovider >"$OUT/sanitizer.log" 2>&1
  san_rc=$?
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -3
  [ "$san_rc" -eq 0 ] || { echo "compute-sanitizer exit $san_rc"; status=1; }
else
  echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"
fi

step "copy-engine benchmarks"
CACHEDATTN_BENCH_SUMMARY="$OUT/cuda_summary.json" python3 -m pytest bench/test_cuda_copy.py -q -p no:cacheprovider \
  --benchmark-json="$OUT/cuda_bench.json" >"$OUT/cuda_bench.log" 2>&1 || status=1

step "summary"
python3 - "$OUT/cuda_summary.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except Exception as e:
    sys.exit(f"no benchmark summary: {e}")
for r in rows:
    print(f"{r['case']:<48} {r['GB/s']:8.2f} GB/s")
PY
exit $status
