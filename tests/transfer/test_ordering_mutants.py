"""Mutation tests of the GPU path's ordering: every ordering call the production
path makes (found in the source, cachedattn.testing.mutants) is removed, one
at a time, and a set of GPU-path scenarios must then fail: the race detector
reports, the fake engine raises, or a cached turn stops equalling recompute.

MUTANTS is the list of call sites; a new ordering call in the production path
fails test_every_ordering_call_site_has_a_mutant until it is added here (and
killed). When the code moves, update the names (file:function:call) and,
if needed, a scenario that exercises the new site.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import time

import pytest
import torch

import cachedattn
from cachedattn import native
from cachedattn.testing import checkpoint_watch, mutants
from cachedattn.testing.race import Detector
from cachedattn.transfer import streams
from cachedattn.transfer.factory import FAKE_ENV

from ..hf.models import VOCAB, tiny_model

hp = importlib.import_module("cachedattn.hf.patch")
pytestmark = pytest.mark.no_race_detector  # each scenario runs under its own detector

# The production modules of the GPU path (load, save, read buffer, their callers).
MODULES = [
    "cachedattn.transfer.gpu_load",
    "cachedattn.transfer.segments",
    "cachedattn.transfer.factory",
    "cachedattn.transfer.staging",
    "cachedattn.hf.async_saving",
    "cachedattn.hf.saving",
    "cachedattn.hf.paths",
    "cachedattn.hf.turn",
    "cachedattn.hf.cache",
    "cachedattn.hf.session",
    "cachedattn.hf.patch",
    "cachedattn.hf.batch",
    "cachedattn.hf.truncation",
    "cachedattn.kernels",
    "cachedattn.vllm.device_loads",
    "cachedattn.vllm.device_saves",
    "cachedattn.vllm.device_transfers",
]

# Each mutant: the scenarios that must kill it (the first failure ends the run of a mutant).
MUTANTS = {
    # the running turn's and the read buffer's staging: the hand-over fence, the refill fence, the layer wait,
    # the wait for the load's own last copy before its blocks go back (also when a forward raised)
    "transfer/gpu_load.py:GpuLoad._fence_previous_readers:wait_for_stream": ["handover"],
    "transfer/gpu_load.py:GpuLoad._fence_refill:wait_for_stream": ["turns", "sliding"],
    "transfer/gpu_load.py:GpuLoad._compute_waits_for:stream_wait_layer": ["turns", "read_buffer"],
    "transfer/gpu_load.py:GpuLoad._wait_copies:wait_layer": ["turns", "raising"],
    "transfer/gpu_load.py:GpuLoad.__init__:_wait_copies": ["raising", "turns"],
    # the save: D2H fence after compute, ticket before abort frees blocks, ticket before commit
    "hf/async_saving.py:save_async:wait_ticket": ["store_closed_mid_save"],
    # (a forward-only turn's save is also ordered by its TTFT wait; generate's decode steps come after that wait)
    "hf/async_saving.py:_fence_compute:wait_for_stream": ["generate", "turns"],
    "hf/async_saving.py:save_async:wait_ticket#2": ["turns"],
    # a batch row's staging handed back while its load stays open: its copies before the buffer's free
    "transfer/gpu_load.py:GpuLoad.release_staging:_wait_copies": ["batch_row_fails"],
    # overflow re-rotation on the engine: its kernels after the compute that wrote the keys, the host after them
    "hf/truncation.py:_rotate_on_gpu:synchronize": ["overflow"],
    "kernels.py:_after_compute:wait_for_stream": ["overflow"],
    # TTFT (defect 7): the host waits for the turn's own streams before it takes the time of the first token
    # (the host reads the first token's KV / logits: checkpoints.host_reads)
    "hf/session.py:first_token_ready:synchronize": ["turns"],
    "hf/batch.py:_FirstToken.__call__:synchronize": ["batch"],
    "hf/batch.py:BatchSession.forward_turns:synchronize": ["answer_jobs"],
    # the vLLM connector's GPU load plan: copies into paged blocks after earlier steps' compute, attention
    # after each layer's copies, the host blocks back only after the copies
    "vllm/device_loads.py:DeviceLoads.start:wait_for_stream": ["paged"],
    "vllm/device_loads.py:DeviceLoads.start:_wait_copies": ["paged"],
    "vllm/device_loads.py:DeviceLoads.wait_layer:stream_wait_layer": ["paged"],
    "vllm/device_loads.py:DeviceLoads._wait_copies:wait_layer": ["paged"],
    # the connector's worker on the GPU plan: attention after each layer's copies (through the worker), the
    # saves' D2H after the compute that wrote the blocks, the host after the copies before any commit or
    # report (vLLM then frees the blocks), and an aborted save's host blocks back only after its copies
    "vllm/device_transfers.py:DeviceTransfers.wait_layer:wait_layer": ["paged_saves"],
    "vllm/device_saves.py:DeviceSaves._copy_and_commit:wait_for_stream": ["paged_saves"],
    "vllm/device_saves.py:DeviceSaves._copy_and_commit:wait_ticket": ["paged_saves"],
    "vllm/device_saves.py:DeviceSaves._copy_and_commit:_wait_copies": ["paged_save_aborted"],
    "vllm/device_saves.py:DeviceSaves._wait_copies:wait_ticket": ["paged_save_aborted"],
}

# Sites that only CUDA tensors would reach: none. Their gates ask the provider (streams.is_async: True for a
# simulated device) and their waits go through it (streams.synchronize: an edge to the host), so the scenarios
# below run them on the CPU. A new site gated on `is_cuda` goes here only with the reason no CPU scenario can
# observe it (also in docs/gpu-ordering.md).
CUDA_ONLY: dict[str, str] = {}

# Mutants no scenario kills yet, and why (each one is work left; test_not_killed_yet_really_survives keeps this
# list honest: a scenario that starts killing one fails it, and the mutant moves to MUTANTS).
NOT_KILLED: dict[str, tuple[list[str], str]] = {}

# Sites no production path calls: a mutant there cannot be killed (and need not be): listed so that a caller
# appearing makes test_every_ordering_call_site_has_a_mutant ask for a mutant.
UNREACHED: dict[str, str] = {}

# Host waits that order nothing the path needs: removing them changes when the host blocks, not what is read.
TIMING_ONLY = {
    "transfer/gpu_load.py:GpuLoad.wait_all:_wait_copies": (
        "layerwise=False (the load-then-compute baseline) waits for every layer before the forward; "
        "each layer's read is still ordered by _compute_waits_for"
    ),
}


# ---- scenarios: each builds its own model and store, returns normally only if everything was right ----------


def _store(tmp):
    return cachedattn.AttentionStore(host_bytes=64 << 20, disk_dir=str(tmp / "kv"), chunk_tokens=16, hugepages="off")


def _ids(n, seed):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _same(cached, ref):
    d = (cached - ref).abs().max().item()
    if not d <= 1e-4:
        raise AssertionError(f"cached turn differs from recompute by {d}")


def _turns(tmp, arch="llama", readahead=1, lengths=(40, 70, 90)):
    model, store = tiny_model(arch), _store(tmp)
    cachedattn.patch(model, store, readahead=readahead)
    ids = _ids(max(lengths), 1)
    try:
        prev = 0
        for n in lengths:
            with cachedattn.session(model, "c") as s:
                out = model(ids[:, :n]).logits
            if s.reused_tokens != prev:
                raise AssertionError(f"turn of {n} reused {s.reused_tokens}, not {prev}")
            _same(out, model(ids[:, :n]).logits[:, prev:])
            model._cachedattn.saver.wait("c")
            prev = n
    finally:
        model._cachedattn.saver.drain()
        store.close()


def scenario_turns(tmp):
    _turns(tmp)


def scenario_generate(tmp):
    """Turns made by generate(): the KV its decode steps write (after the first token's TTFT wait, so only
    the save's D2H fence orders the copy of it) is saved, and the next turn reuses it, equal to recompute."""
    model, store = tiny_model("llama"), _store(tmp)
    cachedattn.patch(model, store, readahead=1)
    seq = _ids(30, 8)
    try:
        for turn in range(2):
            with cachedattn.session(model, "g") as s:
                out = model.generate(seq, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True, pad_token_id=0)
            model._cachedattn.saver.wait("g")
            ref = model.generate(seq, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True, pad_token_id=0)
            for a, b in zip(out.logits, ref.logits):
                _same(a, b)
            if turn and not 30 < s.reused_tokens < prev:  # some generated tokens' KV too (not the last one's)
                raise AssertionError(f"reused {s.reused_tokens} of {prev}")
            prev = out.sequences.shape[1]
            seq = torch.cat([out.sequences, _ids(5, 9)], 1)
    finally:
        model._cachedattn.saver.drain()
        store.close()


def scenario_sliding(tmp):
    _turns(tmp, "gemma2", readahead=2)


def scenario_handover(tmp):
    """Four cached turns, read-ahead all, compared only at the end: no host sync between them, so only
    the hand-over fence orders a buffer's new copies after the reads of the turn that used it two turns ago."""
    model, store = tiny_model("llama"), _store(tmp)
    cachedattn.patch(model, store, readahead=None)
    ids = _ids(100, 2)
    lengths = (20, 40, 60, 80, 100)
    try:
        outs = []
        for n in lengths:
            with cachedattn.session(model, "c"):
                outs.append(model(ids[:, :n]).logits)
            model._cachedattn.saver.wait("c")
        for prev, n, out in zip((0,) + lengths, lengths, outs):
            _same(out, model(ids[:, :n]).logits[:, prev:])
    finally:
        model._cachedattn.saver.drain()
        store.close()


def _batch(tmp, hist: dict, readahead, reused: list, during=contextlib.nullcontext):
    """Each conversation's history stored by a session, then one batched generate over all of them (inside
    `during()`): the rows reuse `reused` tokens and their logits equal recompute."""
    model, store = tiny_model("llama"), _store(tmp)
    cachedattn.patch(model, store, readahead=readahead)
    full = {}
    try:
        with torch.no_grad():
            for i, (c, n) in enumerate(hist.items()):
                ids = _ids(n + 5, 10 + i)
                with cachedattn.session(model, c):
                    model(ids[:, :n])
                model._cachedattn.saver.wait(c)
                full[c] = ids[0]
            with during():
                bs = cachedattn.batch_session(model, list(full))
                out = bs.generate([full[c] for c in full], max_new_tokens=2, do_sample=False,
                                  return_dict_in_generate=True, output_logits=True, pad_token_id=0)
            if [row.reused_tokens for row in bs.rows] != reused:
                raise AssertionError(f"rows reused {[row.reused_tokens for row in bs.rows]}, not {reused}")
            for r, c in enumerate(full):
                ref = model.generate(full[c][None], max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True, pad_token_id=0)
                _same(out.logits[0][r], ref.logits[0][0])
    finally:
        model._cachedattn.saver.drain()
        store.close()


def scenario_batch(tmp):
    """Rows of one batch read their histories through the engine (read-ahead 1), then generate: each row's
    staging goes back to the pool before the batch's loads close, so only its own wait orders that hand-back."""
    _batch(tmp, {"a": 37, "b": 16, "c": 70}, 1, [37, 16, 70])


def scenario_batch_row_fails(tmp):
    """A batch whose last row's read stops at layer 1 (an OSError: the row computes its history) with
    layers 1 and 2 still being copied into its staging (read-ahead 2, never waited for by compute). That
    row got the buffer the first row grew for a longer history, far more than it needs: handing it back
    frees it to the caching allocator at once. Only its release_staging wait orders those copies first."""
    from cachedattn.transfer.gpu_load import GpuLoad

    hist = {"c": 100, "b": 20, "a": 40}  # c grows buffer 0, b takes buffer 1, a gets buffer 0 back
    real, failed = GpuLoad.layer, []

    def layer(self, i, *a, **k):
        if i == 1 and self.n == hist["a"] and not failed:
            failed.append(self)
            raise OSError("injected: chunk unreadable mid-row")
        return real(self, i, *a, **k)

    @contextlib.contextmanager
    def failing_row():
        GpuLoad.layer = layer
        try:
            yield
        finally:
            GpuLoad.layer = real
        if not failed:
            raise AssertionError("no row's read failed")

    _batch(tmp, hist, 2, [hist["c"], hist["b"], 0], failing_row)


def scenario_answer_jobs(tmp):
    """A batch of answer jobs (teacher forcing, BatchSession.forward_turns) over stored histories: each row's
    last-prompt logits equal recompute, and a second job reuses what the first stored."""
    model, store = tiny_model("llama"), _store(tmp)
    cachedattn.patch(model, store, readahead=1)
    prompts = {"a": _ids(30, 30)[0], "b": _ids(45, 31)[0]}
    answers = {"a": _ids(6, 32)[0], "b": _ids(3, 33)[0]}
    try:
        for job in range(2):
            ids = [torch.cat([prompts[c], _ids(5, 34 + job)[0]]) if job else prompts[c] for c in prompts]
            bs = cachedattn.batch_session(model, list(prompts))
            logits, seqs = bs.forward_turns(ids, [answers[c] for c in prompts])
            for c in prompts:
                model._cachedattn.saver.wait(c)
            for r, x in enumerate(ids):
                _same(logits[r], model(x[None]).logits[0, -1])
            if job and [row.reused_tokens for row in bs.rows] != [len(prompts[c]) for c in prompts]:
                raise AssertionError(f"rows reused {[row.reused_tokens for row in bs.rows]}")
            prompts = {c: s for c, s in zip(prompts, seqs)}
    finally:
        model._cachedattn.saver.drain()
        store.close()


def scenario_overflow(tmp):
    """A context overflow on a simulated device: the kept keys are re-rotated by the engine's kernel after
    the compute that copied them there, and copied back after the host waited for the engine. The stored
    window's layer-0 keys equal those computed from scratch, and the next turn equals recompute."""
    from transformers import DynamicCache

    from cachedattn import kernels

    model, store = tiny_model("llama"), _store(tmp)
    cachedattn.patch(model, store, readahead=1, max_context=96)
    ids = _ids(130, 40)
    # A mutant lets the keys on the device go while the engine may still rotate them: on a GPU the allocator
    # would hand that memory on; here the deferred copy would write freed memory and crash the process. They
    # stay alive until the scenario ends (the detector's report is what kills the mutant).
    kept_alive, real = [], kernels.rope_rotate
    kernels.rope_rotate = lambda keys, *a, **k: (kept_alive.append(k.get("out")), real(keys, *a, **k))[1]
    try:
        with cachedattn.session(model, "c") as s:
            for n in (40, 80, 120):
                model(ids[:, :n])
                model._cachedattn.saver.wait("c")
            if s.dropped_tokens != 48 or "re-rotated" not in s.position_note:
                raise AssertionError(f"dropped {s.dropped_tokens}: {s.position_note}")
        kept = torch.cat([ids[:, :0], ids[:, 48:120]], 1)
        with store.load("c", kept.shape[1]) as ld:
            got, _ = ld.read_layer(0)
        ref = DynamicCache(config=model.config)
        model(kept, use_cache=True, **{model._cachedattn.kv.cache_kwarg: ref})
        _same(got.float(), ref.layers[0].keys[0])
    finally:
        kernels.rope_rotate = real
        model._cachedattn.saver.drain()
        store.close()


def scenario_read_buffer(tmp):
    model, store = tiny_model("llama"), _store(tmp)
    cachedattn.patch(model, store, readahead=2)
    ids = _ids(60, 3)
    full = torch.cat([ids, ids[:, :7]], 1)
    try:
        with cachedattn.session(model, "q"):
            model(ids)
        model._cachedattn.saver.wait("q")
        if not hp.preload(model, "q", full):
            raise AssertionError("nothing preloaded")
        with cachedattn.session(model, "q") as s:
            out = model(full).logits
        if s.reused_tokens != 60:
            raise AssertionError(f"reused {s.reused_tokens}")
        _same(out, model(full).logits[:, 60:])
    finally:
        model._cachedattn.saver.drain()
        store.close()


def scenario_raising(tmp):
    model, store = tiny_model("llama"), _store(tmp)
    cachedattn.patch(model, store, readahead=1)
    ids = _ids(50, 4)
    try:
        with cachedattn.session(model, "c"):
            model(ids)
        model._cachedattn.saver.wait("c")
        real = model.model.layers[1].forward
        model.model.layers[1].forward = _boom
        try:
            with cachedattn.session(model, "c"):
                model(torch.cat([ids, ids[:, :5]], 1))
        except KeyError:
            pass
        finally:
            model.model.layers[1].forward = real
    finally:
        model._cachedattn.saver.drain()
        store.close()


def _boom(*a, **k):
    raise KeyError("boom")


def scenario_store_closed_mid_turn(tmp):
    model, store = tiny_model("llama"), _store(tmp)
    cachedattn.patch(model, store, readahead=1)
    ids = _ids(50, 5)
    with cachedattn.session(model, "c"):
        model(ids)
    model._cachedattn.saver.wait("c")
    hook = model.model.layers[1].register_forward_pre_hook(lambda *a: store.close())
    try:
        with cachedattn.session(model, "c"):
            model(torch.cat([ids, ids[:, :5]], 1))
    except Exception:
        pass  # the turn may fail with the store gone; what matters is the order of the releases
    finally:
        hook.remove()
        model._cachedattn.saver.drain()


def scenario_store_closed_mid_save(tmp):
    model, store = tiny_model("llama"), _store(tmp)
    cachedattn.patch(model, store)
    hold = threading.Event()
    with cachedattn.session(model, "x"):
        model(_ids(2, 6))  # the model's loader and saver exist from here on
    model._cachedattn.saver.submit("other", hold.wait)  # the worker is busy: the next save stays queued
    try:
        with cachedattn.session(model, "w"):
            model(_ids(60, 6))
        store.close()  # aborts the append in flight: its blocks go back after its copies
    finally:
        hold.set()
        model._cachedattn.saver.drain()


def scenario_paged(tmp):
    """vLLM's worker loading stored blocks into its paged KV through the connector's GPU plan, two steps
    (the second reuses the first's paged blocks), each layer read by compute as attention reads it."""
    from ..vllm.paged_device import run_paged_steps

    run_paged_steps(tmp)


def scenario_paged_saves(tmp):
    """The connector's worker on the GPU plan, driven step by step as vLLM drives it: a finished request's
    blocks saved D2H (reported only once copied), handed on and overwritten, then loaded into other blocks
    by a later request's step, every read equal to what was saved."""
    from ..vllm.paged_connector import run_save_then_load

    run_save_then_load(tmp)


def scenario_paged_save_aborted(tmp):
    """The store closes between a save's copies and their wait: its host blocks go back after the copies."""
    from ..vllm.paged_connector import run_save_aborted_by_close

    run_save_aborted_by_close(tmp)


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


HANG_S = 150  # a scenario still running after this is taken as hung (a wait that never returns)


def run(scenario: str, tmp) -> str | None:
    """None if the scenario ran clean under the detector, else why not (a hang included)."""
    os.makedirs(tmp, exist_ok=True)
    result: dict = {}

    def body():  # in its own thread: the detector's dispatch mode is the running thread's
        with Detector() as det, torch.no_grad():
            result["det"] = det
            try:
                SCENARIOS[scenario](tmp)
            except Exception as e:  # noqa: BLE001 - any failure kills the mutant
                result["failure"] = f"{type(e).__name__}: {e}"
        if det.reports:
            result["failure"] = f"{len(det.reports)} detector report(s), first: {det.reports[0].message}"
        result["done"] = True

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAKE_ENV, "1")
        saved = (checkpoint_watch._observer, streams._provider, native.HostPool)
        t = threading.Thread(target=body, daemon=True, name=f"scenario-{scenario}")
        t.start()
        t.join(HANG_S)
        if t.is_alive():  # left behind (daemon); what its detector installed process-wide is put back
            checkpoint_watch._observer, streams._provider, native.HostPool = None, saved[1], saved[2]
            reports = result["det"].reports if "det" in result else []
            return f"hung for {HANG_S} s" + (f", after {len(reports)} detector report(s), first: {reports[0].message}"
                                             if reports else "")
    return result.get("failure") if result.get("done") else result.get("failure", "the scenario thread died")


# ---- the tests -------------------------------------------------------------------------------------------


def test_every_ordering_call_site_has_a_mutant():
    found = {s.name for s in mutants.find_sites(MODULES)}
    listed = set(MUTANTS) | set(NOT_KILLED) | set(CUDA_ONLY) | set(UNREACHED) | set(TIMING_ONLY)
    assert found == listed, (
        f"new ordering sites without a mutant: {sorted(found - listed)}; mutants whose site is gone: {sorted(listed - found)}"
    )


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_scenarios_run_clean_without_a_mutant(scenario, tmp_path):
    assert run(scenario, tmp_path) is None


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_each_mutant_is_killed(name, tmp_path):
    site = {s.name: s for s in mutants.find_sites(MODULES)}[name]
    t0 = time.perf_counter()
    why = []
    with mutants.apply(site):
        for i, scenario in enumerate(MUTANTS[name]):
            failure = run(scenario, tmp_path / str(i))
            if failure is not None:
                why.append(f"{scenario}: {failure}")
                break
    assert why, f"mutant {name} ({mutants.source_snippet(site)!r} removed) survived {MUTANTS[name]}"
    print(f"{name}: killed by {why[0][:200]} in {time.perf_counter() - t0:.1f} s")


def test_a_mutant_removes_exactly_its_call():
    name = "hf/async_saving.py:save_async:wait_ticket#2"
    site = {s.name: s for s in mutants.find_sites(MODULES)}[name]
    from cachedattn.hf import async_saving, paths

    real = async_saving.save_async
    with mutants.apply(site):
        assert async_saving.save_async is not real and paths.save_async is async_saving.save_async  # both bindings
        src = mutants.mutated_source(site)
        assert src.count("wait_ticket") == 1 and "e.wait_ticket(e.record" in src  # the other one stays
    assert async_saving.save_async is real and paths.save_async is real


@pytest.mark.parametrize("name", sorted(NOT_KILLED))
def test_not_killed_yet_really_survives(name, tmp_path):
    site = {s.name: s for s in mutants.find_sites(MODULES)}[name]
    scenarios, why = NOT_KILLED[name]
    with mutants.apply(site):
        failures = [f for i, sc in enumerate(scenarios) if (f := run(sc, tmp_path / str(i))) is not None]
    assert not failures, f"{name} is killed now ({failures[0][:200]}): move it to MUTANTS"
