"""Runs benchmark suites of two source trees in turns (A, B, A, B, ...) and compares them.

"Before and after in the same run": each round runs every suite once with tree A's
cachedattn, then once with tree B's, so that both see the same machine load over
time. Each run is its own pytest process with PYTHONPATH set to the tree (the tree's
package shadows the installed one); its rows come from CACHEDATTN_BENCH_SUMMARY.
Reported per case: the median over rounds of each tree's number and B / A.

    git worktree add --detach /tmp/before <commit>   # (copy cachedattn/_core*.so into it)
    python3 bench/interleave.py --a /tmp/before --b . --rounds 3 \\
        bench/test_store.py bench/test_store_lookup.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The numbers rows are compared by (each one a row has), and whether higher is better.
METRICS = [("GB/s", True), ("ms", False), ("p50 ms", False), ("p99 ms", False)]


def run_once(tree: Path, suite: str, extra: list[str]) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    env = dict(os.environ, PYTHONPATH=str(tree), CACHEDATTN_BENCH_SUMMARY=str(out))
    # The suite's file is this checkout's, so both trees run the very same measurement.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / Path(suite).name), *extra]
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{suite} failed in {tree} (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    rows = json.loads(out.read_text())["rows"]
    out.unlink()
    return rows


def metrics_of(row: dict) -> list[str]:
    return [k for k, _ in METRICS if isinstance(row.get(k), (int, float))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, type=Path, help="the tree measured first in each round (before)")
    ap.add_argument("--b", required=True, type=Path, help="the other tree (after)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write every row of every run here")
    ap.add_argument("suites", nargs="+", help="bench files (this checkout's copy runs against both trees)")
    args, extra = ap.parse_known_args(argv)
    for tree in (args.a, args.b):
        if not (tree / "cachedattn" / "__init__.py").is_file():
            ap.error(f"{tree}: no cachedattn package there")
    got: dict[tuple[str, str, str], list[float]] = {}
    every = []
    for rnd in range(args.rounds):
        for suite in args.suites:
            for name, tree in (("A", args.a), ("B", args.b)):
                print(f"round {rnd + 1}/{args.rounds}: {Path(suite).name} on {name} ({tree})", flush=True)
                for row in run_once(tree.resolve(), suite, extra):
                    every.append({"round": rnd, "tree": name, **row})
                    for m in metrics_of(row):
                        got.setdefault((row.get("suite", ""), row["case"], m), {}).setdefault(name, []).append(row[m])
    if args.json:
        args.json.write_text(json.dumps(every, indent=2))
    print(f"\nA = {args.a}, B = {args.b}; median of {args.rounds} interleaved rounds")
    print(f"{'suite':10} {'case':48} {'metric':8} {'A':>10} {'B':>10} {'B/A':>7}  better")
    higher = dict(METRICS)
    for (suite, case, metric), by in got.items():
        a, b = statistics.median(by.get("A", [float("nan")])), statistics.median(by.get("B", [float("nan")]))
        better = "higher" if higher[metric] else "lower"
        print(f"{suite:10} {case:48} {metric:8} {a:10.4g} {b:10.4g} {b / a if a else float('nan'):7.3f}  {better}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
