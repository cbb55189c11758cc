"""GPU time to first token of one turn: H history tokens stored, N = 100 new.

Model: Llama-3.1-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads,
MLP 14336, vocab 128256, rope_theta 500000, default RoPE, no rope scaling),
bf16, sdpa, random weights built on the GPU (normal std 0.02, initialised there:
nothing of the 16 GB passes through the CPU). TTFT = one forward that yields
the first new token's logits (``logits_to_keep=1``), ended by synchronizing
the turn's own stream (``torch.cuda.current_stream().synchronize()``, not the
whole device: other jobs' saves and preloads on the engine's streams are not
the turn's) before the clock is read. Grid H = 1024, 4096,
16384 (``CACHEDATTN_TTFT_H``), median of 3 rounds after 1 warm-up.

Systems, side by side on the same model in one run:
- recompute: the plain model on all H + N tokens (default ``use_cache``);
- ideal: the history's DynamicCache kept on the GPU, N tokens computed;
- host: cachedattn with the copy engine switched off, so the history goes
  through the host path (``load.read_layer`` then ``.to(device)``, per layer).
  How: the model's transfer path is a hf.paths.HostPath for the turn
  (see ``host_path``), exactly what a store without a page-locked pool gets;
- engine-default: the copy engine with the bounded default staging
  (``readahead=None``: gpu_load.STAGED_LAYERS layer slots, ring-reused);
- engine-ra-all: the copy engine, every layer issued at turn start (one staging
  slot per layer: the unbounded "all");
- engine-ra2: the copy engine, read-ahead 2 layers;
- preloaded: ``cachedattn.hf.patch.preload`` issued in the round's setup (as the
  serving engine does while the previous job decodes), the device synchronized
  before the clock starts: the read buffer's copies are done when the turn begins.
The history is stored once by a first turn (save through the copy engine) and
stays in the host tier (no disk tier: warm host memory).

Also: pinned H2D bandwidth (torch copy) and per H the bound history bytes / that
bandwidth; per engine system, one extra untimed round measuring with CUDA events
how long the compute stream waits on the layer events (``stall_ms``: sum over
layers; ``stall_max_ms``: the longest layer), the peak GPU memory allocated
during that round (``peak_MB``) and the staging bytes the loader holds after it
(``staged_MB``): the bounded default's cost next to "all". Exactness: the tiny fp32 llama
(tests/hf/models.py's config) cached vs recompute within 1e-4 on every system;
the bf16 8B shape at the smallest H: last-token logits of cached vs recompute
within 0.25 of the logits' standard deviation, and the same argmax (a
disagreement passes only as a near-tie: recompute's logit of the cached pick
within 0.1 std of its best).

Dry run on a CPU (no GPU): ``CACHEDATTN_TTFT_DRY=cpu`` runs the same code with a
tiny llama, fp32, H = 64,128, N = 16, the copy-engine systems through the
deferred fake engine (CACHEDATTN_FAKE_COPY_ENGINE=1, set here):

    CACHEDATTN_TTFT_DRY=cpu python3 -m pytest bench/test_gpu_ttft.py -q -p no:cacheprovider
    python3 -m pytest bench/test_gpu_ttft.py --benchmark-json=out/ttft.json   # on a GPU
"""

from __future__ import annotations

import contextlib
import importlib
import os
import statistics
import time

import pytest
import torch

import cachedattn
from cachedattn.hf.paths import HostPath
from cachedattn.transfer.factory import FAKE_ENV

hp = importlib.import_module("cachedattn.hf.patch")  # `cachedattn.hf.patch` as an attribute is the function

DRY_ENV = "CACHEDATTN_TTFT_DRY"
ROUNDS, WARMUP = 3, 1
SYSTEMS = ["recompute", "ideal", "host", "engine-default", "engine-ra-all", "engine-ra2", "preloaded"]
ENGINE_SYSTEMS = ("engine-default", "engine-ra-all", "engine-ra2", "preloaded")
CACHED_SYSTEMS = ("host", *ENGINE_SYSTEMS)
# The tiny llama of tests/hf/models.py (kept in step by hand: bench/ does not import tests/).
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


def dry() -> bool:
    return os.environ.get(DRY_ENV, "") == "cpu"


if not dry():
    pytestmark = pytest.mark.cuda


def grid() -> list[int]:
    default = "64,128" if dry() else "1024,4096,16384"
    return [int(h) for h in os.environ.get("CACHEDATTN_TTFT_H", default).split(",")]


def n_new() -> int:
    return 16 if dry() else 100


def device() -> torch.device:
    return torch.device("cpu" if dry() else "cuda")


def sync() -> None:
    """The turn's own work is done: its stream, not the device (the engine's streams may hold
    other jobs' saves and preloads)."""
    if device().type == "cuda":
        torch.cuda.current_stream().synchronize()


def settle() -> None:
    """Untimed setup: everything queued anywhere on the device is done."""
    if device().type == "cuda":
        torch.cuda.synchronize()


def readahead_of(system: str, num_layers: int):
    return {"engine-ra2": 2, "engine-ra-all": num_layers}.get(system)  # None: the bounded default


def big_config():
    from transformers import LlamaConfig

    if dry():
        shape = dict(TINY, num_hidden_layers=6)  # more layers than the default staging holds
    else:
        shape = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8)
    return LlamaConfig(**shape, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                       tie_word_embeddings=False)


def build_model(cfg, dtype: torch.dtype, dev: torch.device, seed: int = 0):
    """Random weights created and initialised on `dev` (transformers' own init: normal std 0.02, norms 1)."""
    from transformers import AutoModelForCausalLM

    if dev.type == "cpu":
        torch.set_num_threads(1)  # dry run: code paths, not speed; 2 threads on a shared 2-core VM is 10x slower
    torch.manual_seed(seed)
    with dev:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    p = next(model.parameters())
    assert p.device.type == dev.type and p.dtype == dtype, (p.device, p.dtype)
    return model.eval()


def kv_bytes_per_token(cfg, dtype: torch.dtype) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


@contextlib.contextmanager
def host_path(model):
    """The copy engine switched off for the turns inside: the host path, as with an unpinned pool."""
    state = model._cachedattn
    saved = state.path
    state.path = HostPath(state.store, state.kv, state.warned, saved.devices)
    try:
        yield
    finally:
        state.path = saved


class StallProbe:
    """Stands in for the loader's copy engine for one round: times each stream_wait_layer
    (CUDA events on the compute stream before and after the wait; on the CPU the fake's
    deferred copies, by the clock)."""

    def __init__(self, engine):
        self._engine = engine
        self._cuda = device().type == "cuda"
        self.spans: list = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream_wait_layer(self, direction, layer, stream, epoch=-1):
        if self._cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            self._engine.stream_wait_layer(direction, layer, stream, epoch)
            b.record()
            self.spans.append((a, b))
        else:
            t = time.perf_counter()
            self._engine.stream_wait_layer(direction, layer, stream, epoch)
            self.spans.append((time.perf_counter() - t) * 1e3)

    def per_layer_ms(self) -> list[float]:
        sync()
        return [a.elapsed_time(b) for a, b in self.spans] if self._cuda else list(self.spans)


def simple_timer(fn, setup=None, rounds=ROUNDS, warmup=WARMUP) -> float:
    """Median seconds of fn() over `rounds` after `warmup` (setup() before each, untimed)."""
    times = []
    for r in range(warmup + rounds):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        if r >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def h2d_gbps(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Pinned host -> device bandwidth of a plain torch copy, best of `reps` (CPU: a memcpy)."""
    dev = device()
    cuda = dev.type == "cuda"
    if not cuda:
        nbytes = min(nbytes, 64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=cuda)
        sync()
        best = min(best, time.perf_counter() - t)
    del src, dst
    return nbytes / best / 1e9


class Rig:
    """The 8B-shaped model (tiny when dry), patched with a host-only store sized for the whole grid."""

    def __init__(self):
        self.dev = device()
        if self.dev.type == "cpu":
            os.environ[FAKE_ENV] = "1"  # the engine systems run the GPU branch through the fake engine
        self.dtype = torch.float32 if dry() else torch.bfloat16
        self.cfg = big_config()
        self.model = build_model(self.cfg, self.dtype, self.dev)
        self.per_token = kv_bytes_per_token(self.cfg, self.dtype)
        self.chunk = 16 if dry() else 256
        host = int(sum(grid()) * self.per_token * 1.25) + ((16 if dry() else 256) << 20)
        self.store = cachedattn.AttentionStore(host_bytes=host, chunk_tokens=self.chunk)
        cachedattn.patch(self.model, self.store)  # read-ahead: all layers (the default)
        self.kwarg = self.model._cachedattn.kv.cache_kwarg
        self.vocab = self.cfg.vocab_size
        self.n = n_new()
        self.times: dict[tuple[int, str], float] = {}
        self.gbps: float | None = None
        self._ids: dict[int, torch.Tensor] = {}

    def close(self) -> None:
        cachedattn.unpatch(self.model)
        self.store.close()

    def ids(self, h: int) -> torch.Tensor:
        if h not in self._ids:
            g = torch.Generator().manual_seed(h)
            self._ids[h] = torch.randint(1, self.vocab, (1, h + self.n), generator=g).to(self.dev)
        return self._ids[h]

    def conv(self, h: int) -> str:
        return f"H{h}"

    def ensure_stored(self, h: int) -> None:
        """The history's first turn (untimed): stored through the copy engine's saver, kept in host memory."""
        conv = self.conv(h)
        if conv in self.store:
            return
        with torch.no_grad(), cachedattn.session(self.model, conv):
            self.model(self.ids(h)[:, :h], logits_to_keep=1)
        saver = self.model._cachedattn.saver
        if saver is not None:
            saver.drain()
        self.store.flush()
        settle()
        assert conv in self.store

    def check_engine(self) -> None:
        """The engine systems must really run the copy engine (a silent host fallback would mislabel them)."""
        loader = self.model._cachedattn.gpu
        assert loader is not None, "no copy engine: the store's pool is not page-locked or the build has no CUDA"
        name = type(loader.engine).__name__
        assert name == ("FakeCopyEngine" if self.dev.type == "cpu" else "CopyEngine"), name

    # ---- one system's timed turn -------------------------------------------------

    def turn(self, h: int, system: str, logits_to_keep: int = 1) -> torch.Tensor:
        """One cached turn of `system` (untimed by itself); returns its logits."""
        ids, conv = self.ids(h), self.conv(h)
        readahead = readahead_of(system, self.cfg.num_hidden_layers)
        ctx = host_path(self.model) if system == "host" else contextlib.nullcontext()
        with torch.no_grad(), ctx, cachedattn.session(self.model, conv, save=False, readahead=readahead) as s:
            out = self.model(ids, logits_to_keep=logits_to_keep).logits
        sync()
        assert s.reused_tokens == h and s.tier_tokens["host"] == h, (system, s.reused_tokens, s.tier_tokens)
        return out

    def preload(self, h: int) -> None:
        assert hp.preload(self.model, self.conv(h), self.ids(h)), "preload issued nothing"
        settle()  # the read buffer's copies are done (the previous job's decode had time for them)

    def measure(self, h: int, system: str, timer) -> dict:
        self.ensure_stored(h)
        ids, n, model = self.ids(h), self.n, self.model
        row = {"suite": "ttft", "case": f"H={h} N={n} {system}"}
        with torch.no_grad():
            if system == "recompute":
                def fn():
                    model(ids, logits_to_keep=1)
                    sync()

                secs = timer(fn, sync)
            elif system == "ideal":
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
                model(ids[:, :h], use_cache=True, logits_to_keep=1, **{self.kwarg: cache})
                sync()

                def fn():
                    model(ids[:, h:], use_cache=True, logits_to_keep=1, **{self.kwarg: cache})
                    sync()

                def setup():
                    extra = cache.get_seq_length() - h
                    if extra > 0:
                        cache.crop(-extra)  # back to the history alone (5.x refuses a positive crop)
                    sync()

                secs = timer(fn, setup)
                del cache
            else:
                setup = (lambda: self.preload(h)) if system == "preloaded" else settle
                secs = timer(lambda: self.turn(h, system), setup)
                if system in ENGINE_SYSTEMS:
                    self.check_engine()
                    row.update(self.stall(h, system))
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        self.times[(h, system)] = secs
        row["ms"] = secs * 1e3
        if (h, "recompute") in self.times:
            row["vs_recompute"] = secs / self.times[(h, "recompute")]
        if (h, "ideal") in self.times and system != "recompute":
            row["vs_ideal"] = secs / self.times[(h, "ideal")]
        hist = h * self.per_token
        row["hist_MB"] = hist / 1e6
        if self.gbps:
            row["h2d_bound_ms"] = hist / (self.gbps * 1e9) * 1e3
        return row

    def stall(self, h: int, system: str) -> dict:
        """One extra untimed round with the engine behind a StallProbe."""
        self.check_engine()
        loader = self.model._cachedattn.gpu
        real = loader.engine
        probe = loader.engine = StallProbe(real)
        cuda = self.dev.type == "cuda"
        try:
            if system == "preloaded":
                self.preload(h)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.turn(h, system)
        finally:
            loader.engine = real
        ms = probe.per_layer_ms()
        assert len(ms) == self.cfg.num_hidden_layers, len(ms)
        row = {"stall_ms": sum(ms), "stall_max_ms": max(ms), "staged_MB": loader.staged_bytes() / 1e6}
        if cuda:
            row["peak_MB"] = torch.cuda.max_memory_allocated() / 1e6
        return row

    # ---- exactness on the 8B shape (bf16) ----------------------------------------

    def argmax_check(self, h: int) -> list[dict]:
        """Last-token logits of each cached system vs recompute: same argmax, or a near-tie."""
        self.ensure_stored(h)
        ids = self.ids(h)
        with torch.no_grad():
            ref = self.model(ids, logits_to_keep=1).logits[0, -1].float()
        sync()
        rows = []
        for system in CACHED_SYSTEMS:
            if system == "preloaded":
                self.preload(h)
            out = self.turn(h, system)[0, -1].float()
            assert torch.isfinite(out).all() and torch.isfinite(ref).all(), system
            diff = (out - ref).abs().max().item()
            a, b = out.argmax().item(), ref.argmax().item()
            gap = (ref[b] - ref[a]).item()  # how far the cached pick is below recompute's best, in recompute's logits
            std = ref.std().item()
            # A wrong history (layer, position, order) moves logits by about their own spread; bf16 rounding
            # (other GEMM tilings for H vs H + N rows) by ~1-2% of it. A differing argmax passes only as a near-tie.
            assert diff <= 0.25 * std, (system, diff, std)
            assert a == b or gap <= 0.1 * std, (system, a, b, gap, std)
            rows.append({"suite": "ttft", "case": f"exact {str(self.dtype)[6:]} argmax H={h} {system}", "argmax_same": a == b,
                         "max_abs_diff": diff, "ref_top_gap": gap, "logit_std": std})
        return rows


def exact_fp32() -> list[dict]:
    """The tiny fp32 llama on the device: every cached system within 1e-4 of recompute."""
    from transformers import LlamaConfig

    dev = device()
    if dev.type == "cpu":
        os.environ[FAKE_ENV] = "1"
    model = build_model(LlamaConfig(**TINY), torch.float32, dev, seed=0)
    store = cachedattn.AttentionStore(host_bytes=64 << 20, chunk_tokens=16, hugepages="off")
    cachedattn.patch(model, store)
    rows = []
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        h, n = 200, 17
        ids = torch.randint(1, TINY["vocab_size"], (1, h + n), generator=torch.Generator().manual_seed(5)).to(dev)
        with torch.no_grad():
            with cachedattn.session(model, "exact"):
                model(ids[:, :h])
            if model._cachedattn.saver is not None:
                model._cachedattn.saver.drain()
            ref = model(ids).logits[:, h:]
            for system in CACHED_SYSTEMS:
                readahead = readahead_of(system, model.config.num_hidden_layers)
                if system == "preloaded":
                    assert hp.preload(model, "exact", ids)
                ctx = host_path(model) if system == "host" else contextlib.nullcontext()
                with ctx, cachedattn.session(model, "exact", save=False, readahead=readahead) as s:
                    out = model(ids).logits
                sync()
                assert s.reused_tokens == h, (system, s.reused_tokens)
                if system != "host":
                    assert model._cachedattn.gpu is not None, "the copy engine was not used"
                diff = (out - ref).abs().max().item()
                assert out.shape == ref.shape and diff <= 1e-4, (system, out.shape, diff)
                rows.append({"suite": "ttft", "case": f"exact fp32 tiny H={h} N={n} {system}", "max_abs_diff": diff})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
        cachedattn.unpatch(model)
        store.close()
    return rows


def run_all(timer=simple_timer) -> list[dict]:
    """Everything this file measures and checks, in order, without pytest-benchmark (the CI dry test)."""
    rows = exact_fp32()
    rig = Rig()
    try:
        rig.gbps = h2d_gbps()
        rows.append({"suite": "ttft", "case": "H2D pinned (torch copy, 512 MiB)", "GB/s": rig.gbps})
        for h in grid():
            for system in SYSTEMS:
                rows.append(rig.measure(h, system, timer))
        rows += rig.argmax_check(grid()[0])
    finally:
        rig.close()
    return rows


# ---- pytest -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rig():
    r = Rig()
    r.gbps = h2d_gbps()
    yield r
    r.close()


def test_exact_fp32_tiny(report):
    report.extend(exact_fp32())


def test_h2d_bandwidth(report, rig):
    report.append({"suite": "ttft", "case": "H2D pinned (torch copy, 512 MiB)", "GB/s": rig.gbps})


@pytest.mark.parametrize("h,system", [(h, s) for h in grid() for s in SYSTEMS],
                         ids=[f"H{h}-{s}" for h in grid() for s in SYSTEMS])
def test_ttft(benchmark, report, rig, h, system):
    def timer(fn, setup):
        benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
        return benchmark.stats.stats.median

    row = rig.measure(h, system, timer)
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("suite", "case")})
    report.append(row)


def test_exact_bf16_argmax(report, rig):
    report.extend(rig.argmax_check(grid()[0]))
