"""vLLM with and without CachedAttnConnector under a third-party multi-turn
client (aiperf, unmodified), each configuration side by side in one run:

  (a) the working set fits vLLM's KV pool: what the connector costs;
  (b) the working set is ~4x the pool (made small with --num-gpu-blocks-override): without the connector,
      with it (LRU eviction), with it (queue-aware eviction);
  (c) after a restart of vLLM: the same conversations again, with the connector's disk tier kept;
  (d) two vLLM instances sharing one Redis, requests alternating between them: aiperf talks to
      bench/alternating_proxy.py, which sends each request to the next instance (aiperf's own round robin
      keeps a conversation on one instance, so no turn would need the other's KV).
  (b) and (d) also run the connector with "loads": "async" (copies while the request waits, not in its step).

    bash scripts/setup.sh --vllm && python3 -m venv .venv-bench && .venv-bench/bin/pip install aiperf==0.13.0
    python3 bench/vllm_connector.py            # writes bench/results/vllm_connector.md

TTFT comes from aiperf's export; hits by tier from the connector's counters on vLLM's /metrics; vLLM's own
prefix-cache hits from its counters. Absolute times are of this machine (2 shared CPU cores): compare rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cachedattn.server.vllm_launch import cpu_list  # noqa: E402

VLLM_PY = Path(os.environ.get("CACHEDATTN_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
AIPERF = Path(os.environ.get("CACHEDATTN_AIPERF", ROOT / ".venv-bench" / "bin" / "aiperf"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One vLLM OpenAI server, with the connector when `kv` is given."""

    def __init__(self, model: Path, work: Path, name: str, kv: dict | None, blocks: int | None):
        self.port, self.name = free_port(), name
        argv = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager",
                "--port", str(self.port)]
        # A small pool (b) must still hold one whole request: vLLM refuses a context longer than its pool.
        argv += ["--max-model-len", str(min(2048, (blocks - 1) * 128) if blocks else 2048)]  # one block is vLLM's null block
        if blocks:
            argv += ["--num-gpu-blocks-override", str(blocks)]
        if kv is not None:
            cfg = {"kv_connector": "CachedAttnConnector", "kv_connector_module_path": "cachedattn.vllm",
                   "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": kv}
            argv += ["--kv-transfer-config", json.dumps(cfg)]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=cpu_list(), PYTHONPATH=str(ROOT))
        self.log = open(work / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self._wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait(self) -> None:
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM ({self.name}) exited: see {self.log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"vLLM ({self.name}) did not start in 600 s")

    def metrics(self) -> dict[str, float]:
        import httpx

        out: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, value = line.rsplit(" ", 1)
            name = key.split("{")[0]
            tier = key.split('tier="')[1].split('"')[0] if 'tier="' in key else None
            if name == "cachedattn:chunk_hits_total" and tier:
                out[f"hits_{tier}"] = out.get(f"hits_{tier}", 0) + float(value)
            elif name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
                out[name.split(":")[1]] = out.get(name.split(":")[1], 0) + float(value)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def aiperf(urls: list[str], model: Path, out: Path, args) -> dict:
    cmd = [str(AIPERF), "profile", "--model", "tiny", "--tokenizer", str(model), "--endpoint-type", "chat",
           "--streaming", "--conversation-num", str(args.conversations), "--conversation-turn-mean", str(args.turns),
           "--conversation-turn-stddev", "0", "--synthetic-input-tokens-mean", "100", "--output-tokens-mean",
           str(args.output_tokens), "--shared-system-prompt-length", "100", "--concurrency", str(args.concurrency),
           "--random-seed", "42", "--output-artifact-dir", str(out), "--ui", "none",
           # greedy answers: a replayed conversation (c) is the same conversation, as a returning user's is
           "--extra-inputs", "temperature:0"]
    for u in urls:
        cmd += ["--url", u]
    if len(urls) > 1:
        cmd += ["--url-strategy", "round_robin"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    exports = list(out.rglob("profile_export_aiperf.json"))
    if r.returncode != 0 or not exports:
        raise RuntimeError(f"aiperf failed ({r.returncode}): {r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    data = json.loads(exports[0].read_text())
    ttft = data.get("time_to_first_token") or data.get("records", {}).get("time_to_first_token", {})
    thr = data.get("output_token_throughput") or data.get("records", {}).get("output_token_throughput", {})
    return {"ttft_avg": ttft.get("avg"), "ttft_p50": ttft.get("p50"), "ttft_p90": ttft.get("p90"),
            "tok_s": thr.get("avg"), "errors": data.get("error_request_count", {}).get("avg", 0) if isinstance(
                data.get("error_request_count"), dict) else data.get("error_request_count", 0)}


def server_kv(kv: dict | None, d: Path, i: int) -> dict | None:
    """The connector's options for server i: `disk` (this script's marker) becomes a disk_dir of its own."""
    if kv is None:
        return None
    kv = dict(kv)
    if kv.pop("disk", False):
        kv["disk_dir"] = str(d / f"kv{i}")
    return kv


class Proxy:
    """bench/alternating_proxy.py in front of `urls`: each request goes to the next of them."""

    def __init__(self, urls: list[str], work: Path):
        import httpx

        self.port = free_port()
        self.log = open(work / f"proxy-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "alternating_proxy.py"), "--port",
                                      str(self.port), *urls], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                httpx.get(self.url + "/proxy/requests", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"the alternating proxy did not start: see {self.log.name}")

    def requests(self) -> list[int]:
        import httpx

        return httpx.get(self.url + "/proxy/requests", timeout=5).json()["requests"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def run_config(label, model, work, args, kv=None, blocks=None, servers=1, restart=False, redis=None,
               alternate=False) -> dict:
    print(f"vllm_connector: {label} ...", flush=True)
    d = work / "".join(c if c.isalnum() else "_" for c in label)
    d.mkdir()
    if kv is not None:
        kv = dict(kv)
        if redis:
            kv["remote"] = redis
    runs = []
    srvs = [Server(model, d, f"{label}-{i}", server_kv(kv, d, i), blocks) for i in range(servers)]
    try:
        if restart:  # fill, restart every server, then measure the same conversations
            aiperf([s.url for s in srvs], model, d / "fill", args)
            for s in srvs:
                s.stop()
            srvs = [Server(model, d, f"{label}-again-{i}", server_kv(kv, d, i), blocks) for i in range(servers)]
        if alternate:
            proxy = Proxy([s.url for s in srvs], d)
            try:
                res = aiperf([proxy.url], model, d / "run", args)
                res["proxied"] = proxy.requests()
            finally:
                proxy.stop()
        else:
            res = aiperf([s.url for s in srvs], model, d / "run", args)
        m: dict[str, float] = {}
        for s in srvs:
            for k, v in s.metrics().items():
                m[k] = m.get(k, 0) + v
        res.update(m)
        runs.append(res)
    finally:
        for s in srvs:
            s.stop()
    res = runs[0]
    res["label"] = label
    print(f"vllm_connector: {label}: {json.dumps(res)}", flush=True)
    return res


def fmt(v, nd=0):
    return "-" if v is None else f"{v:.{nd}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python3 bench/vllm_connector.py --conversations 8")
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--small-blocks", type=int, default=8,
                   help="vLLM's KV pool in (b), in 128-token blocks (default 8: 1,024 tokens, about a quarter of what "
                        "--concurrency conversations of --turns turns hold at once)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_connector.md"))
    p.add_argument("--only", default="abcd", help="which configurations (letters)")
    args = p.parse_args()
    for tool, hint in ((VLLM_PY, "bash scripts/setup.sh --vllm"), (AIPERF, ".venv-bench: see this file's docstring")):
        if not tool.exists():
            sys.exit(f"vllm_connector: {tool} missing: {hint}")
    from cachedattn.server.model import resolve

    model = resolve("tiny")
    work = Path(tempfile.mkdtemp(prefix="vllm-connector-"))
    conn = {"host_bytes": "256M", "disk": True}
    rows = []
    redis = None
    try:
        if "a" in args.only:
            rows += [run_config("a: fits, vLLM alone", model, work, args),
                     run_config("a: fits, with connector", model, work, args, kv=conn)]
        if "b" in args.only:
            small = {"host_bytes": "256M", "disk": True}
            rows += [run_config("b: 4x pool, vLLM alone", model, work, args, blocks=args.small_blocks),
                     run_config("b: 4x pool, connector LRU", model, work, args, kv={**small, "eviction": "lru"},
                                blocks=args.small_blocks),
                     run_config("b: 4x pool, connector queue", model, work, args, kv={**small, "eviction": "queue"},
                                blocks=args.small_blocks),
                     run_config("b: 4x pool, connector queue, async loads", model, work, args,
                                kv={**small, "eviction": "queue", "loads": "async"}, blocks=args.small_blocks)]
        if "c" in args.only:
            rows += [run_config("c: after restart, vLLM alone", model, work, args, restart=True),
                     run_config("c: after restart, connector", model, work, args, kv=conn, restart=True)]
        if "d" in args.only and shutil.which("redis-server"):
            port = free_port()
            redis = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL)
            time.sleep(1)
            rows += [run_config("d: 2 instances alternating, vLLM alone", model, work, args, servers=2, alternate=True),
                     run_config("d: 2 instances alternating, connector + Redis", model, work, args,
                                kv={"host_bytes": "256M"}, servers=2, redis=f"redis://127.0.0.1:{port}",
                                alternate=True),
                     run_config("d: 2 instances alternating, connector + Redis, async loads", model, work, args,
                                kv={"host_bytes": "256M", "loads": "async"}, servers=2,
                                redis=f"redis://127.0.0.1:{port}", alternate=True)]
    finally:
        if redis is not None:
            redis.terminate()
    lines = ["# vLLM with and without CachedAttnConnector (aiperf multi-turn)", "",
             f"Command: `python3 bench/vllm_connector.py --only {args.only} --conversations {args.conversations} --turns {args.turns} "
             f"--concurrency {args.concurrency} --output-tokens {args.output_tokens}`; machine: shared 2-core CPU VM, "
             "vllm-cpu 0.32, tiny model (fp32), 100-token shared system prompt, 100-token user turns; vLLM's prefix "
             "cache on everywhere.", "",
             "| configuration | TTFT avg ms | TTFT p50 ms | TTFT p90 ms | output tok/s | vLLM prefix hits / queries | "
             "connector hits host / disk / remote (blocks) | errors |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {fmt(r['ttft_avg'])} | {fmt(r['ttft_p50'])} | {fmt(r['ttft_p90'])} | "
                     f"{fmt(r['tok_s'], 1)} | {fmt(r.get('prefix_cache_hits_total'))} / {fmt(r.get('prefix_cache_queries_total'))} | "
                     f"{fmt(r.get('hits_host', 0))} / {fmt(r.get('hits_disk', 0))} / {fmt(r.get('hits_remote', 0))} | "
                     f"{fmt(r['errors'])} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
