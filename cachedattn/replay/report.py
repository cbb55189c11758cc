"""What a replay writes: its tables (rich on a terminal, Markdown in a pipe or a log, see
cachedattn/console.py), table.md, results.json, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from cachedattn.console import markdown, print_table  # noqa: F401  (the replay's tables in both forms)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def comparison_tables(rows: list[dict], baseline: str = "RE") -> list[Table]:
    """Two tables: time and cost per system, and where the history came from."""
    base = next((r for r in rows if r["system"] == baseline), None)
    perf = Table(title="Replay: TTFT, prefill tok/s (per job) and tok/s (prompt tokens over each run's TTFT, a batch "
                       "once) measured; tok/s model (prompt + answer over busy time), wait, busy time and cost modelled "
                       "(virtual clock); batch: mean jobs per run")
    for col in ["system", "TTFT mean", "p50", "p99", "vs RE", "prefill tok/s", "x RE", "tok/s", "tok/s model", "batch",
                "wait s", "busy s", "prefill s", "cost $", "prefill cost $"]:
        perf.add_column(col, justify="left" if col == "system" else "right")
    cache = Table(title="Replay: where each turn's history came from (token-weighted) and bytes moved")
    for col in ["system", "hit", "host", "disk", "miss", "host share", "host GB read", "disk GB read", "disk GB written"]:
        cache.add_column(col, justify="left" if col == "system" else "right")
    for r in rows:
        vs = f"{100 * (r['ttft_mean'] / base['ttft_mean'] - 1):+.0f}%" if base else "-"
        xt = f"{r['prefill_throughput'] / base['prefill_throughput']:.1f}x" if base else "-"
        perf.add_row(
            r["system"], f"{1e3 * r['ttft_mean']:.1f} ms", f"{1e3 * r['ttft_p50']:.1f}", f"{1e3 * r['ttft_p99']:.1f}", vs,
            f"{r['prefill_throughput']:.0f}", xt, _num(r.get("throughput")), _num(r.get("throughput_modelled")),
            f"{r.get('batch_mean', 1.0):.1f}", f"{r['wait_mean_modelled']:.1f}", f"{r['busy_time_modelled']:.0f}",
            f"{r['prefill_time_modelled']:.1f}", f"{r['cost_usd']:.3f}", f"{r['cost_prefill_usd']:.4f}",
        )
        cache.add_row(
            r["system"], _pct(r["hit_rate"]), _pct(r["hit_host"]), _pct(r["hit_disk"]), _pct(r["miss"]),
            _pct(r["host_share_of_hits"]), _gb(r["bytes_host_read"]), _gb(r["bytes_disk_read"]),
            _gb(r["bytes_disk_written"]),
        )
    return [perf, cache]


def sweep_table(rows: list[dict]) -> Table:
    t = Table(title="Capacity sweep: hit rate (host / disk) and measured TTFT per policy")
    for col in ["host / WS", "disk / WS", "system", "hit", "host", "disk", "TTFT mean", "p99"]:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r['host_fraction']:.2f}", f"{r['disk_fraction']:.2f}", r["system"], _pct(r["hit_rate"]),
                  _pct(r["hit_host"]), _pct(r["hit_disk"]), f"{1e3 * r['ttft_mean']:.1f} ms", f"{1e3 * r['ttft_p99']:.1f}")
    return t


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")


def plot_comparison(out: Path, results: dict[str, list[dict]], rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, recs in results.items():
        ttft = np.sort([1e3 * r["ttft"] for r in recs])
        ax.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, measured)")
    ax.set_ylabel("fraction of turns")
    ax.set_title("TTFT CDF per system")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "ttft_cdf.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    cached = [r for r in rows if r["hit_rate"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r["system"] for r in cached]
    host = [100 * r["hit_host"] for r in cached]
    disk = [100 * r["hit_disk"] for r in cached]
    miss = [100 * r["miss"] for r in cached]
    ax.bar(names, host, label="host memory")
    ax.bar(names, disk, bottom=host, label="disk")
    ax.bar(names, miss, bottom=[h + d for h, d in zip(host, disk)], label="miss (recomputed)", color="lightgray")
    ax.set_ylabel("% of reusable history tokens")
    ax.set_title("Where each turn's history came from")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    fig.tight_layout()
    paths.append(out / "hit_rate.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def plot_sweep(out: Path, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    disks = sorted({r["disk_fraction"] for r in rows})
    fig, axes = plt.subplots(2, len(disks), figsize=(4.2 * len(disks), 7), squeeze=False)
    for j, d in enumerate(disks):
        for name in dict.fromkeys(r["system"] for r in rows):
            pts = sorted((r["host_fraction"], r) for r in rows if r["disk_fraction"] == d and r["system"] == name)
            xs = [100 * x for x, _ in pts]
            line = axes[0][j].plot(xs, [100 * r["hit_rate"] for _, r in pts], marker="o", label=name)[0]
            axes[0][j].plot(xs, [100 * r["hit_host"] for _, r in pts], ls="--", color=line.get_color())
            axes[1][j].plot(xs, [1e3 * r["ttft_mean"] for _, r in pts], marker="o", label=name)
        axes[0][j].set_title(f"disk = {100 * d:.0f}% of working set")
        axes[0][j].set_ylabel("hit rate, % (dashed: from host memory)")
        axes[1][j].set_ylabel("TTFT mean (ms, measured)")
        axes[1][j].set_xlabel("host memory (% of working set)")
        for ax in (axes[0][j], axes[1][j]):
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

