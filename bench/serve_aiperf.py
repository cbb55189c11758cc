"""`cachedattn serve` under NVIDIA's aiperf, unmodified: its synthetic
multi-turn mode (each request carries the whole conversation so far) against
the same server with KV reuse and with --no-reuse (recompute every turn).
Prints TTFT and throughput side by side; writes bench/results/serve_aiperf.{md,json}.

    pip install "aiperf>=0.13,<0.14"       # not in setup.sh: see README, Server
    python3 bench/serve_aiperf.py --minutes 3

The server runs the tiny model (`--model tiny`, built once without a download);
aiperf reads the server's own tokenizer directory (no hub). Clients send no
session header: the server finds each conversation from its prompt (see
cachedattn/server/identity.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cachedattn.server import model as model_dir  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, no_reuse: bool, log_path: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "cachedattn", "serve", "--model", "tiny", "--port", str(port),
           "--host-bytes", args.host_bytes, "--max-queue", "256", "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if no_reuse:
        cmd.append("--no-reuse")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def server_counters(url: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if not s.labels and s.name.endswith(("_total", "_sum", "_count")):
                out[s.name] = s.value
    return out


def run_aiperf(args, url: str, tokenizer: Path, out_dir: Path) -> dict:
    cmd = ["aiperf", "profile", "--model", "tiny", "--url", url, "--endpoint-type", "chat", "--streaming",
           "--tokenizer", str(tokenizer),
           "--conversation-num", str(args.conversations), "--conversation-turn-mean", str(args.turns),
           "--conversation-turn-stddev", "0",
           "--prompt-input-tokens-mean", str(args.input_tokens), "--prompt-input-tokens-stddev", "0",
           "--prompt-output-tokens-mean", str(args.output_tokens), "--prompt-output-tokens-stddev", "0",
           "--concurrency", str(args.concurrency), "--benchmark-duration", str(int(args.minutes * 60)),
           "--benchmark-grace-period", "60", "--random-seed", "0", "--use-server-token-count",
           "--output-artifact-dir", str(out_dir), "--ui-type", "none"]
    r = subprocess.run(cmd, cwd=out_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (out_dir / "aiperf_stdout.txt").write_text(r.stdout)
    if r.returncode != 0:
        raise RuntimeError(f"aiperf failed ({r.returncode}):\n{r.stdout[-4000:]}")
    return json.loads((out_dir / "profile_export_aiperf.json").read_text())


def mean_ms(counters: dict, histogram: str) -> float | None:
    n = counters.get(histogram + "_count")
    return 1e3 * counters[histogram + "_sum"] / n if n else None


def summary(profile: dict, counters: dict) -> dict:
    def stat(name, key="avg"):
        return (profile.get(name) or {}).get(key)

    prompt = counters.get("cachedattn_prompt_tokens_total", 0)
    return {
        "requests": stat("request_count"),
        "ttft_avg_ms": stat("time_to_first_token"), "ttft_p50_ms": stat("time_to_first_token", "p50"),
        "ttft_p90_ms": stat("time_to_first_token", "p90"),
        "itl_avg_ms": stat("inter_token_latency"),
        "request_latency_avg_ms": stat("request_latency"),
        "request_throughput_per_s": stat("request_throughput"),
        "output_token_throughput_per_s": stat("output_token_throughput"),
        "input_tokens_avg": stat("input_sequence_length"),
        "reused_share": counters.get("cachedattn_reused_tokens_total", 0) / prompt if prompt else None,
        "engine_ttft_avg_ms": mean_ms(counters, "cachedattn_time_to_first_token_seconds"),
        "engine_queue_avg_ms": mean_ms(counters, "cachedattn_queue_seconds"),
        "errors": profile.get("error_summary"),
    }


ROWS = [("requests answered", "requests", "{:.0f}"), ("prompt tokens / request (avg)", "input_tokens_avg", "{:.0f}"),
        ("prompt tokens reused", "reused_share", "{:.0%}"),
        ("TTFT avg (ms)", "ttft_avg_ms", "{:.0f}"), ("TTFT p50 (ms)", "ttft_p50_ms", "{:.0f}"),
        ("TTFT p90 (ms)", "ttft_p90_ms", "{:.0f}"),
        ("  of which waiting in the queue, avg (ms, server)", "engine_queue_avg_ms", "{:.0f}"),
        ("  TTFT in the engine, avg (ms, server: load + prefill)", "engine_ttft_avg_ms", "{:.0f}"),
        ("inter-token latency avg (ms)", "itl_avg_ms", "{:.1f}"),
        ("request latency avg (ms)", "request_latency_avg_ms", "{:.0f}"),
        ("requests / s", "request_throughput_per_s", "{:.2f}"),
        ("output tokens / s", "output_token_throughput_per_s", "{:.1f}")]


def table(results: dict) -> str:
    lines = ["| metric | cachedattn (reuse) | recompute (--no-reuse) |", "|---|---:|---:|"]
    for label, key, fmt in ROWS:
        cells = []
        for mode in ("reuse", "no-reuse"):
            v = results[mode].get(key)
            cells.append("n/a" if v is None else fmt.format(v))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0, help="aiperf's benchmark duration per mode")
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--input-tokens", type=int, default=300, help="new user tokens per turn")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--host-bytes", default="2G")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    p.add_argument("--machine", default=None, help="a description of the machine for the results file")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_aiperf"))
    args = p.parse_args()
    if shutil.which("aiperf") is None:
        sys.exit('aiperf is not installed: pip install "aiperf>=0.13,<0.14"')
    tokenizer = model_dir.resolve("tiny")
    results, work = {}, Path(tempfile.mkdtemp(prefix="cachedattn-aiperf-"))
    for mode in ("reuse", "no-reuse"):
        proc, url = start_server(args, mode == "no-reuse", work / f"server-{mode}.log")
        try:
            out = work / mode
            out.mkdir()
            profile = run_aiperf(args, url, tokenizer, out)
            results[mode] = summary(profile, server_counters(url))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        print(f"{mode}: {results[mode]}", flush=True)
    machine = args.machine or f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    setup = (f"aiperf synthetic multi-turn, {args.conversations} conversations x {args.turns} turns, "
             f"{args.input_tokens} new tokens per turn, {args.output_tokens} answer tokens, concurrency "
             f"{args.concurrency}, {args.minutes:g} min per mode, streaming; tiny model (6-layer Llama, hidden 256, "
             f"random weights, fp32, CPU)")
    note = ("TTFT, latencies and throughput are aiperf's, measured at the client; the engine serves one turn at a "
            "time (no batching yet), so a request's TTFT includes its wait behind the others in flight. The two "
            "server-side rows come from the server's /metrics. aiperf runs on the same CPUs as the server.")
    md = f"# cachedattn serve under aiperf\n\nMachine: {machine}.\n\nSetup: {setup}.\n\n{table(results)}\n\n{note}\n"
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps({"machine": machine, "setup": setup, "args": vars(args),
                                                    "results": results}, indent=2, default=str))
    print(md)
    print(f"aiperf artifacts: {work}")


if __name__ == "__main__":
    main()
