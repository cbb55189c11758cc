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

import importlib
import os
import threading
import time

import pytest
import torch

import cachedattn
from cachedattn import native
from cachedattn.testing import mutants
from cachedattn.testing.race import Detector
from cachedattn.transfer import guards, streams
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
    "hf/async_saving.py:_fence_compute:wait_for_stream": ["turns"],
    "hf/async_saving.py:save_async:wait_ticket#2": ["turns"],
}

# Sites that only CUDA tensors reach (`is_cuda` / `device.type == "cuda"` gates): no CPU scenario runs them;
# bench/gpu_suite.sh runs their tests on a card.
CUDA_ONLY = {
    "hf/truncation.py:_rotate_on_gpu:synchronize": "overflow re-rotation on the GPU (loader.device.type == 'cuda')",
    "kernels.py:_after_compute:wait_for_stream": "rope_rotate / segment_copy with CUDA tensors only",
    # TTFT measurement points (defect 7): the host waits for the turn's own stream to time the first token
    "hf/session.py:first_token_ready:synchronize": "times the first token on a CUDA device",
    "hf/batch.py:_FirstToken.__call__:synchronize": "times a batch's first token on a CUDA device",
    "hf/batch.py:BatchSession.forward_turns:synchronize": "times a batch's first token on a CUDA device",
}

# Mutants no scenario kills yet, and why (each one is work left; test_not_killed_yet_really_survives keeps this
# list honest: a scenario that starts killing one fails it, and the mutant moves to MUTANTS).
NOT_KILLED = {
    "transfer/gpu_load.py:GpuLoad.release_staging:_wait_copies": (
        ["batch", "store_closed_mid_turn", "raising"],
        "a batch row that read every layer was ordered by its stream waits, and close() already waited "
        "(before_release); this wait matters only for a row whose read stops early (an OSError mid-row) with "
        "copies still pending into its staging, which the next load then regrows and frees: the detector does not "
        "see a staging buffer's memory going back to torch's allocator, so no scenario can kill it yet",
    ),
}

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


def scenario_batch(tmp):
    """Rows of one batch read their histories through the engine (read-ahead 1), then generate: each row's
    staging goes back to the pool before the batch's loads close, so only its own wait orders that hand-back."""
    model, store = tiny_model("llama"), _store(tmp)
    cachedattn.patch(model, store, readahead=1)
    hist = {"a": 37, "b": 16, "c": 70}
    full = {}
    try:
        with torch.no_grad():
            for i, (c, n) in enumerate(hist.items()):
                ids = _ids(n + 5, 10 + i)
                with cachedattn.session(model, c):
                    model(ids[:, :n])
                model._cachedattn.saver.wait(c)
                full[c] = ids[0]
            bs = cachedattn.batch_session(model, list(full))
            out = bs.generate([full[c] for c in full], max_new_tokens=2, do_sample=False,
                              return_dict_in_generate=True, output_logits=True, pad_token_id=0)
            if [row.reused_tokens for row in bs.rows] != list(hist.values()):
                raise AssertionError(f"rows reused {[row.reused_tokens for row in bs.rows]}")
            for r, c in enumerate(full):
                ref = model.generate(full[c][None], max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True, pad_token_id=0)
                _same(out.logits[0][r], ref.logits[0][0])
    finally:
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
        saved = (guards._observer, streams._provider, native.HostPool)
        t = threading.Thread(target=body, daemon=True, name=f"scenario-{scenario}")
        t.start()
        t.join(HANG_S)
        if t.is_alive():  # left behind (daemon); what its detector installed process-wide is put back
            guards._observer, streams._provider, native.HostPool = None, saved[1], saved[2]
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
