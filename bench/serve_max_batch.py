"""`cachedattn serve --max-batch N` against --max-batch 1, side by side in one run:
closed-loop multi-turn users (each sends its next turn, the whole conversation so far,
when its answer has streamed), the official openai SDK as the client. Prints client TTFT
(mean, p90), request latency and output tokens/s per setting and their ratios to
--max-batch 1; writes bench/results/serve_max_batch.{md,json}.

    python3 bench/serve_max_batch.py --users 8 --turns 3 --batches 1,4,8

Each server runs alone on the machine (started, measured, stopped, then the next), the
tiny model, float32, KV reuse on. No aiperf needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from serve_aiperf import ROOT, free_port, server_counters

WORDS = "cache tier memory disk host block chunk layer token prompt answer batch queue stream".split()


def start(args, max_batch: int, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "cachedattn", "serve", "--model", "tiny", "--port", str(port), "--max-queue", "256",
           "--log-level", "warning", "--threads", str(args.threads), "--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server (--max-batch {max_batch}) did not start")


def words(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n))


async def user(client, u: int, args, out: list) -> None:
    messages = [{"role": "system", "content": words(0, args.system_words)}]
    for t in range(args.turns):
        messages.append({"role": "user", "content": words(u * 31 + t, args.user_words)})
        t0 = time.perf_counter()
        ttft, text, tokens = None, "", 0
        stream = await client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=args.output_tokens, temperature=0, user=f"u{u}",
            stream=True, stream_options={"include_usage": True})
        async for c in stream:
            if c.choices and c.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - t0
                text += c.choices[0].delta.content
            if c.usage is not None:
                tokens = c.usage.completion_tokens
        out.append({"ttft": ttft if ttft is not None else time.perf_counter() - t0,
                    "latency": time.perf_counter() - t0, "tokens": tokens})
        messages.append({"role": "assistant", "content": text})


async def load(url: str, args) -> tuple[list, float]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    out: list = []
    t0 = time.perf_counter()
    await asyncio.gather(*[user(client, u, args, out) for u in range(args.users)])
    wall = time.perf_counter() - t0
    await client.close()
    return out, wall


def measure(args, max_batch: int) -> dict:
    with tempfile.NamedTemporaryFile(prefix="serve-max-batch-", suffix=".log") as log:
        proc, url = start(args, max_batch, log)
        try:
            asyncio.run(load(url, argparse.Namespace(**{**vars(args), "users": 1, "turns": 1})))  # warm-up
            before = server_counters(url)
            reqs, wall = asyncio.run(load(url, args))
            after = server_counters(url)
        finally:
            proc.terminate()
            proc.wait(60)
    ttfts = sorted(r["ttft"] for r in reqs)
    batched = (after.get("cachedattn_batch_size_sum", 0) - before.get("cachedattn_batch_size_sum", 0))
    turns = after.get("cachedattn_batch_size_count", 0) - before.get("cachedattn_batch_size_count", 0)
    return {"max_batch": max_batch, "requests": len(reqs), "wall_s": wall,
            "ttft_mean_ms": 1e3 * statistics.mean(ttfts), "ttft_p90_ms": 1e3 * ttfts[int(0.9 * (len(ttfts) - 1))],
            "latency_mean_ms": 1e3 * statistics.mean(r["latency"] for r in reqs),
            "output_tok_per_s": sum(r["tokens"] for r in reqs) / wall,
            "mean_rows_per_turn": batched / turns if turns else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-words", type=int, default=60)
    p.add_argument("--user-words", type=int, default=60)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,4,8", help="the --max-batch settings; the first is the baseline")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    rows = [measure(args, int(b)) for b in args.batches.split(",")]
    base = rows[0]
    lines = [f"# cachedattn serve --max-batch, side by side ({platform.node()}, {args.users} users x {args.turns} "
             f"turns, {args.output_tokens} tokens, --threads {args.threads})", "",
             "| --max-batch | TTFT mean ms | TTFT p90 ms | latency mean ms | output tok/s | rows/turn | "
             "TTFT mean vs first | tok/s vs first |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['max_batch']} | {r['ttft_mean_ms']:.0f} | {r['ttft_p90_ms']:.0f} | "
                     f"{r['latency_mean_ms']:.0f} | {r['output_tok_per_s']:.1f} | {r['mean_rows_per_turn']:.2f} | "
                     f"{r['ttft_mean_ms'] / base['ttft_mean_ms']:.2f} | "
                     f"{r['output_tok_per_s'] / base['output_tok_per_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results"
    (out / "serve_max_batch.md").write_text(text)
    (out / "serve_max_batch.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
