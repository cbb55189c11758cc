"""The connector's GPU load plan (cachedattn.vllm.device_loads) on the CPU, under the fake copy engine
and the race detector: stored blocks land byte for byte in vLLM's CUDA paged layout, layer by layer,
every copy ordered before the attention that reads it and before its host block goes back. Removing
any of its ordering calls fails tests/transfer/test_ordering_mutants.py (scenario "paged")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachedattn.testing.race import Detector
from cachedattn.transfer.factory import FAKE_ENV
from cachedattn.vllm.device_loads import DeviceLoads, PagedDeviceKV
from cachedattn.vllm.plan import BlockMove

from .paged_device import B, DIM, HEADS, LAYERS, NBLOCKS, Rig, damage_on_disk, run_paged_steps

pytestmark = pytest.mark.no_race_detector  # each test installs its own


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch):
    monkeypatch.setenv(FAKE_ENV, "1")


def test_paged_blocks_load_layer_by_layer_in_order(tmp_path):
    with Detector() as det, torch.no_grad():
        run_paged_steps(tmp_path)
    det.check()


def test_a_damaged_block_ends_its_request_and_is_recomputed(tmp_path):
    rig = Rig(tmp_path)
    try:
        keys, toks, kv = rig.save(np.arange(12), seed=3)
        damage_on_disk(rig.store, keys[1])
        with Detector() as det, torch.no_grad():
            reads = rig.step([BlockMove("r", keys, toks, [1, 3, 4])])
        det.check()
        assert rig.loads.take_failed() == {3, 4}  # the damaged block and the one after it
        assert all(torch.equal(reads[layer][:, 0], kv[0][layer]) for layer in range(LAYERS))
    finally:
        rig.close()


def test_a_layout_other_than_flash_nhd_is_refused_by_shape():
    with pytest.raises(ValueError, match=r"\[2, blocks, 4, 2, 8\]"):
        PagedDeviceKV([torch.zeros(NBLOCKS, 2, B, HEADS, DIM)], B, HEADS, DIM)


def test_a_store_keyed_for_other_blocks_is_refused(tmp_path):
    rig = Rig(tmp_path)
    try:
        other = PagedDeviceKV([torch.zeros(2, NBLOCKS, B, 1, DIM) for _ in range(LAYERS)], B, 1, DIM)
        with pytest.raises(ValueError, match="does not hold these paged blocks"):
            DeviceLoads(rig.store, other, rig.engine)
    finally:
        rig.close()


def test_blocks_go_back_after_the_copy_issued_last_not_the_highest_layers(tmp_path, monkeypatch):
    """Layer 0 of a block still on disk at start is copied after layers 1 and 2 were issued: the host
    must wait for that last copy before the blocks go back (waiting for layer 2's event is too early)."""
    from cachedattn.store.load import KVLoad

    rig = Rig(tmp_path)
    try:
        keys, toks, kv = rig.save(np.arange(8), seed=4)
        rig.store.demote(keys[1])
        monkeypatch.setattr(KVLoad, "layer_ready", lambda self, layer: layer != 0)  # layer 0 of the disk block is late
        with Detector() as det, torch.no_grad():
            reads = rig.step([BlockMove("r", keys, toks, [2, 6])])
        det.check()
        assert all(torch.equal(reads[layer], torch.stack([kv[0][layer], kv[1][layer]], 1)) for layer in range(LAYERS))
    finally:
        rig.close()
