"""The connector's GPU load plan (cachedattn.vllm.device_loads) driven as vLLM's worker would, on the
CPU: the fake copy engine stands for the device's copy engine and, under a race detector, the paged
tensors are device memory read by the compute stream. Shared by tests/vllm/test_device_loads.py and
the ordering mutants (tests/transfer/test_ordering_mutants.py, scenario "paged")."""

from __future__ import annotations

import numpy as np
import torch

import cachedattn
from cachedattn.transfer.factory import engine_for
from cachedattn.vllm.device_loads import DeviceLoads, PagedDeviceKV
from cachedattn.vllm.plan import BlockMove
from cachedattn.vllm.prefix_keys import block_keys, namespace

LAYERS, HEADS, DIM, B, NBLOCKS = 3, 2, 8, 4, 8


class Rig:
    """A store of paged blocks, the paged KV (each layer [2, blocks, B, heads, dim]) and the loads."""

    def __init__(self, tmp, host_blocks: int = 64):
        self.caches = [torch.zeros(2, NBLOCKS, B, HEADS, DIM) for _ in range(LAYERS)]
        self.paged = PagedDeviceKV(self.caches, B, HEADS, DIM)
        self.store = cachedattn.AttentionStore(
            host_bytes=host_blocks * LAYERS * 4096, disk_dir=str(tmp / "kv"), chunk_tokens=B,
            spec=self.paged.store_spec("paged-device-test"), hugepages="off",
        )
        self.engine = engine_for("cpu", LAYERS)  # the fake engine (CACHEDATTN_FAKE_COPY_ENGINE=1)
        if self.engine is None:
            raise RuntimeError("set CACHEDATTN_FAKE_COPY_ENGINE=1: the GPU plan runs on the fake copy engine")
        self.loads = DeviceLoads(self.store, self.paged, self.engine)
        self.ns = namespace("paged-device-test", "float32", "flash", B)

    def save(self, toks, seed: int) -> tuple[list[str], list[np.ndarray], list[torch.Tensor]]:
        """Stores each whole block of toks under its prefix key; returns keys, tokens and each block's
        KV as vLLM's layout holds it ([layers, 2, B, heads, dim])."""
        keys = block_keys(self.ns, toks, B)
        g = torch.Generator().manual_seed(seed)
        kv = torch.randn(len(keys), LAYERS, 2, B, HEADS, DIM, generator=g)
        blocks = [toks[i * B : (i + 1) * B] for i in range(len(keys))]
        for i, key in enumerate(keys):
            layers = [(kv[i, layer, 0].reshape(1, B, -1), kv[i, layer, 1].reshape(1, B, -1)) for layer in range(LAYERS)]
            self.store.append(key, blocks[i], layers, start=0).result()
        self.store.flush()
        return keys, blocks, list(kv)

    def step(self, moves) -> list[torch.Tensor]:
        """One forward: start the loads, then per layer wait for it and read the loaded blocks (what
        attention does), then finish. Returns each layer's read of the moves' blocks."""
        self.loads.start(moves)
        ids = [b for m in moves for b in m.block_ids]
        reads = []
        for layer in range(LAYERS):
            self.loads.wait_layer(layer)
            reads.append(self.caches[layer][:, ids] * 1)  # compute reads the paged blocks
        self.loads.finish()
        return reads

    def close(self) -> None:
        self.store.close()
        self.engine.close()


def damage_on_disk(store, key: str) -> None:
    """Moves a stored block to disk and flips one byte of its KV there (its checksum then fails)."""
    store.demote(key)
    conv = store._index.convs[key]
    path = store._disk.path(conv.dirname, conv.chunks[0].file)
    with open(path, "r+b") as f:
        f.seek(-100, 2)
        b = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([b[0] ^ 0xFF]))


def run_paged_steps(tmp) -> None:
    """Two steps as vLLM's worker runs them: the first loads a request's three blocks (one from disk)
    into paged blocks 5, 2, 7; the second loads another request's blocks into blocks 2 and 5 again
    (vLLM reuses freed blocks). Every read equals what was stored; a missing block is reported failed."""
    rig = Rig(tmp)
    try:
        a = np.arange(100, 112)
        keys, toks, kv = rig.save(a, seed=1)
        rig.store.demote(keys[1])  # its bytes come from disk while the layers are asked for
        reads = rig.step([BlockMove("r1", keys, toks, [5, 2, 7])])
        for layer in range(LAYERS):
            want = torch.stack([kv[i][layer] for i in range(3)], 1)  # [2, 3, B, heads, dim]
            if not torch.equal(reads[layer], want):
                raise AssertionError(f"step 1, layer {layer}: the loaded blocks differ from the stored KV")
        b = np.arange(500, 508)
        keys2, toks2, kv2 = rig.save(b, seed=2)
        missing = block_keys(rig.ns, np.arange(900, 904), B)
        reads = rig.step([BlockMove("r2", keys2, toks2, [2, 5]), BlockMove("r3", missing, [np.arange(900, 904)], [6])])
        for layer in range(LAYERS):
            if not torch.equal(reads[layer][:, :2], torch.stack([kv2[i][layer] for i in range(2)], 1)):
                raise AssertionError(f"step 2, layer {layer}: the reloaded blocks differ from the stored KV")
        if rig.loads.take_failed() != {6}:
            raise AssertionError("the block the store does not hold was not reported failed")
    finally:
        rig.close()
