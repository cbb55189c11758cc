"""`cachedattn serve --engine vllm`: vLLM's OpenAI server with cachedattn's
KV connector, configured from the same flags as the embedded server.

vLLM runs in its own environment (`bash scripts/setup.sh --vllm` makes
.venv-vllm; CACHEDATTN_VLLM_PYTHON or --vllm-python name another), so this
module imports no vLLM: it builds the command line and replaces this
process with it. vLLM does the continuous batching; the connector brings
the host, disk and Redis tiers.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Flags of the embedded server that mean nothing under vLLM (it has its own batching, queue and limits).
EMBEDDED_ONLY = ("readahead", "no_reuse", "max_queue", "max_body_bytes", "default_max_tokens", "chat_template", "threads",
                 "max_batch", "max_batch_tokens")


def cpu_list() -> str:
    """The CPUs this process may run on, as vLLM-CPU's VLLM_CPU_OMP_THREADS_BIND wants them ("0,1,2")."""
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def vllm_python(explicit: str | None) -> Path:
    py = Path(explicit or os.environ.get("CACHEDATTN_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    if not py.exists():
        raise FileNotFoundError(f"--engine vllm: no vLLM environment at {py}: run `bash scripts/setup.sh --vllm`")
    return py


def command(args, directory: Path, name: str, defaults: dict) -> tuple[list[str], dict]:
    """The vLLM server's argv and environment for these `cachedattn serve` arguments."""
    given = [f for f in EMBEDDED_ONLY if getattr(args, f, None) != defaults.get(f)]
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ValueError(f"--engine vllm: {flags} apply to the embedded server only (vLLM batches and queues itself)")
    extra = {"host_bytes": args.host_bytes, "disk_bytes": args.disk_bytes, "eviction": args.eviction}
    if args.disk_dir:
        extra["disk_dir"] = str(Path(args.disk_dir).resolve())
    if args.remote:
        extra["remote"] = args.remote
    kv = {"kv_connector": "CachedAttnConnector", "kv_connector_module_path": "cachedattn.vllm", "kv_role": "kv_both",
          "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}
    argv = [str(vllm_python(getattr(args, "vllm_python", None))), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(directory), "--served-model-name", name, "--host", args.host, "--port", str(args.port),
            "--kv-transfer-config", json.dumps(kv)]
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.device == "cpu":
        argv += ["--enforce-eager"]  # no graph capture on the CPU build
    argv += shlex.split(getattr(args, "vllm_args", "") or "")
    env = dict(os.environ)
    if args.device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of paged KV on the CPU build
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_list())  # vLLM-CPU binds its OpenMP threads to these
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return argv, env


def run(args, directory: Path, name: str, defaults: dict) -> None:
    argv, env = command(args, directory, name, defaults)
    print("cachedattn: starting vLLM with the cachedattn connector: " + " ".join(argv[1:4]) + " ...", file=sys.stderr, flush=True)
    os.execve(argv[0], argv, env)
