"""The connector's worker side on the GPU plan (cachedattn.vllm.device_transfers) on the CPU, under the
fake copy engine and the race detector: saves D2H from the paged blocks of finished requests, reported
only once copied; synchronous, layer-by-layer loads of them in vLLM's CUDA layout, byte for byte; a
damaged block reported failed in its step; other layouts refused by shape. Removing any of the saves'
ordering calls fails tests/transfer/test_ordering_mutants.py (scenarios "paged_saves",
"paged_save_aborted")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachedattn.testing.race import Detector
from cachedattn.transfer.factory import FAKE_ENV
from cachedattn.vllm.prefix_keys import block_keys

from .paged_connector import Worker, run_save_aborted_by_close, run_save_then_load
from .paged_device import B, DIM, HEADS, LAYERS, NBLOCKS, damage_on_disk

pytestmark = pytest.mark.no_race_detector  # each test installs its own


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch):
    monkeypatch.setenv(FAKE_ENV, "1")


def test_saved_blocks_load_back_byte_for_byte_in_the_cuda_layout(tmp_path):
    with Detector() as det, torch.no_grad():
        run_save_then_load(tmp_path)
    det.check()


def test_a_save_aborted_by_the_store_closing_still_reports_its_request(tmp_path):
    with Detector() as det, torch.no_grad():
        run_save_aborted_by_close(tmp_path)
    det.check()


def test_a_request_is_reported_sent_only_after_its_copies(tmp_path, monkeypatch):
    """The saving thread is held after issuing the copies: steps go on (the forward never waits for the
    save), the request is not reported, and its copies are still pending; once released, it is."""
    import threading

    w = Worker(tmp_path)
    hold, issued = threading.Event(), threading.Event()
    real = w.transfers.engine.wait_ticket

    def wait_ticket(t):
        issued.set()
        assert hold.wait(30)
        return real(t)

    monkeypatch.setattr(w.transfers.engine, "wait_ticket", wait_ticket)
    try:
        toks = np.arange(7, 7 + 2 * B)
        w.compute_writes([1, 2], seed=5)
        w.planner.finished("r", toks, len(toks), [1, 2])
        w.step()
        assert issued.wait(30)
        for _ in range(3):
            sent, _, _ = w.step()
            assert "r" not in sent
        first = block_keys(w.planner.ns, toks, B)[0]
        assert w.transfers.engine.pending("d2h") == 1 and w.store.lookup(first, toks[:B]) == 0  # nothing published
        hold.set()
        w.until_sent("r")
        assert w.transfers.engine.pending("d2h") == 0 and w.transfers.stats["blocks_saved"] == 2
    finally:
        hold.set()
        w.close()


def test_a_damaged_block_is_reported_failed_in_its_step(tmp_path):
    w = Worker(tmp_path)
    try:
        toks = np.arange(60, 60 + 3 * B)
        kv = w.compute_writes([0, 1, 2], seed=6)
        w.planner.finished("r1", toks, len(toks), [0, 1, 2])
        w.until_sent("r1")
        later = np.concatenate([toks, [1]])
        assert w.matched("r2", later) == 3 * B
        damage_on_disk(w.store, block_keys(w.planner.ns, toks, B)[1])
        w.planner.allocated("r2", [4, 5, 6, 7], 3 * B)
        with Detector() as det, torch.no_grad():
            _, _, failed = w.step(read=[4])
        det.check()
        assert failed == {5, 6}  # the damaged block and the one after it; vLLM recomputes them
        assert all(torch.equal(w.reads[layer][:, 0], kv[layer][:, 0]) for layer in range(LAYERS))
        assert w.transfers.stats["load_failures"] == 1 and w.transfers.stats["blocks_loaded"] == 1
    finally:
        w.close()


def test_sync_loads_are_not_reported_received_and_async_ones_still_are():
    from cachedattn.vllm.plan import PrefixPlanner

    for sync, loading in ((True, set()), (False, {"r"})):
        p = PrefixPlanner(b"ns", B, sync_loads=sync)
        toks = np.arange(3 * B)
        assert p.matched("r", toks, 0) is None
        p.answered({"r": 2})
        assert p.matched("r", toks, 0) == 2 * B
        p.allocated("r", [0, 1, 2], 2 * B)
        assert p._loading == loading and len(p.take_step().loads) == 1


def test_other_layouts_and_cpu_tensors_without_the_fake_engine_are_refused(tmp_path, monkeypatch):
    from cachedattn.vllm.device_transfers import device_transfers

    w = Worker(tmp_path)
    try:
        with pytest.raises(ValueError, match=r"\[2, blocks, 4, 2, 8\]"):  # FlashInfer's [blocks, 2, ...]
            device_transfers(w.store, [torch.zeros(NBLOCKS, 2, B, HEADS, DIM)] * LAYERS, B, HEADS, DIM)
        monkeypatch.delenv(FAKE_ENV)
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            device_transfers(w.store, w.caches, B, HEADS, DIM)
    finally:
        w.close()


def test_a_save_whose_copies_cannot_be_issued_still_reports_its_request(tmp_path, monkeypatch):
    """The copy engine refuses the step's copies: nothing is stored, the failure is counted, the appends'
    host blocks go back, and the request is still reported, so vLLM frees its blocks."""
    w = Worker(tmp_path)

    def broken(*a, **k):
        raise RuntimeError("injected: the copy engine refused the copies")

    monkeypatch.setattr(w.transfers.engine, "copy_batch", broken)
    try:
        toks = np.arange(70, 70 + 2 * B)
        w.compute_writes([1, 2], seed=7)
        w.planner.finished("r", toks, len(toks), [1, 2])
        w.until_sent("r")
        assert w.transfers.stats["save_failures"] == 1 and w.transfers.stats["blocks_saved"] == 0
        assert w.store.lookup(block_keys(w.planner.ns, toks, B)[0], toks[:B]) == 0
        assert w.store.stats()["host"]["used_bytes"] == 0
    finally:
        monkeypatch.undo()
        w.close()
