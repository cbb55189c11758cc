"""The GPU plan of the connector's loads: vLLM's paged KV on a device, filled
from the store's pinned host blocks by the copy engine, layer by layer.

Layout. vLLM's CUDA attention backends (FlashAttention, FlashInfer with NHD)
keep each layer as ``[2, num_blocks, block_tokens, kv_heads, head_dim]``: K
(and V) of one block is one contiguous range, token-major. The store keeps
such blocks with one "head" of ``kv_heads * head_dim`` per token
(``PagedDeviceKV.store_spec``): its chunk layout ``[1, block_tokens,
kv_heads * head_dim]`` is that very range. So a block of a layer moves as two
contiguous segments, K and V, from the chunk's pinned block: no gather
kernel, and one ``copy_batch`` per layer carries every block of the step.

Order (the copy engine's events, checked on the CPU by the fake engine and
the race detector, tests/transfer/test_ordering_mutants.py scenario "paged"):

- ``start``: the H2D stream waits for the compute stream (``wait_for_stream``)
  before the first copy: the paged blocks vLLM hands out were read or written
  by earlier steps' attention. Then each layer's copies are issued, those
  whose bytes are already in host memory at once, the rest (still being read
  from disk) when the layer is asked for;
- ``wait_layer(layer)`` (the connector's ``wait_for_layer_load``): the compute
  stream waits for that layer's copies (``stream_wait_layer``); the host does
  not wait, so layer i+1 is copied while layer i computes;
- ``finish`` (after the forward): each load's host blocks go back to the
  store only after the host waited for the step's copies (``before_release``
  is ``_wait_copies``), then the epoch ends.

A block the store cannot serve (missing, damaged, short) ends its request's
load there: it and the request's later blocks are reported as failed, and
vLLM recomputes them.
"""

from __future__ import annotations

import logging

import torch

from cachedattn.store import KVSpec
from cachedattn.transfer import streams

log = logging.getLogger("cachedattn")


def device_store_spec(num_layers: int, kv_heads: int, head_dim: int, dtype, model_digest: str) -> KVSpec:
    """The store's spec for paged blocks in the CUDA layout: one head of kv_heads * head_dim, so that a
    stored chunk's K of a layer is byte for byte a paged block's K."""
    return KVSpec.uniform(num_layers, 1, kv_heads * head_dim, dtype, model_digest=model_digest)


class PagedDeviceKV:
    """vLLM's paged KV in the CUDA backends' layout, one tensor per layer."""

    def __init__(self, caches: list[torch.Tensor], block_tokens: int, kv_heads: int, head_dim: int):
        if not caches:
            raise ValueError("paged KV: no layers registered")
        want = (2, block_tokens, kv_heads, head_dim)
        for i, t in enumerate(caches):
            if t.dim() != 5 or (t.shape[0], *t.shape[2:]) != want or not t.is_contiguous():
                raise ValueError(
                    f"paged KV layer {i}: shape {tuple(t.shape)} is not the layout the GPU plan supports "
                    f"([2, blocks, {block_tokens}, {kv_heads}, {head_dim}], contiguous: FlashAttention's NHD)"
                )
        self.caches = list(caches)
        self.block_tokens, self.kv_heads, self.head_dim = block_tokens, kv_heads, head_dim
        self.dtype = caches[0].dtype
        self.device = caches[0].device
        self.num_blocks = caches[0].shape[1]
        self.block_bytes = block_tokens * kv_heads * head_dim * caches[0].element_size()  # of K (and of V)

    @property
    def num_layers(self) -> int:
        return len(self.caches)

    def store_spec(self, model_digest: str) -> KVSpec:
        return device_store_spec(self.num_layers, self.kv_heads, self.head_dim, self.dtype, model_digest)

    def views(self, layer: int, block_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one block of one layer as the store's chunks hold them: ``[1, block_tokens,
        kv_heads * head_dim]`` each, views of the paged tensor."""
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} outside the paged cache's {self.num_blocks} blocks")
        t = self.caches[layer]
        shape = (1, self.block_tokens, self.kv_heads * self.head_dim)
        return t[0, block_id].view(shape), t[1, block_id].view(shape)

    def ranges(self, layer: int, block_id: int) -> tuple[int, int]:
        """Device addresses of K and V of one block of one layer (each block_bytes long)."""
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} outside the paged cache's {self.num_blocks} blocks")
        t = self.caches[layer]
        return t[0, block_id].data_ptr(), t[1, block_id].data_ptr()


class DeviceLoads:
    """One step's loads into paged blocks on the device (see the module doc). Not thread-safe: the
    worker's forward drives it (start, wait_layer per layer, finish)."""

    def __init__(self, store, paged: PagedDeviceKV, engine):
        geo_k = store.spec.layers[0][0] * paged.block_tokens * store.spec.layers[0][1] * store.spec.element_size
        if store.spec.layers[0] != (1, paged.kv_heads * paged.head_dim) or geo_k != paged.block_bytes:
            raise ValueError(
                f"the store's KV spec {store.spec.layers[0]} does not hold these paged blocks "
                f"(expected (1, {paged.kv_heads * paged.head_dim}): PagedDeviceKV.store_spec)"
            )
        self.store, self.paged, self.engine = store, paged, engine
        self.failed: set[int] = set()  # paged blocks not filled (vLLM recomputes them), since the last take
        self.loaded = 0  # blocks loaded (counted at finish)
        self.tier_tokens: dict[str, int] = {}  # tokens loaded, by the tier they came from
        self._epoch = None
        self._blocks: list[tuple[object, int, int]] = []  # (the store's load, paged block id, move) of this step
        self._dead: set[int] = set()  # positions in _blocks whose request's load ended at or before them
        self._issued: list[int] = []  # per layer: how many of self._blocks have their copies issued
        self._copied: set[int] = set()  # layers with copies in this epoch
        self._last: int | None = None  # the layer of the copy issued last (its event comes after every copy)
        self._warned = False

    # ---- the step -----------------------------------------------------------------

    def start(self, moves) -> None:
        """Opens the store's loads of the step's blocks and issues the copies whose bytes are in host memory."""
        if self._epoch is not None:
            raise RuntimeError("DeviceLoads.start: the previous step's loads were not finished")
        for m, move in enumerate(moves):
            for i, (key, toks, block) in enumerate(zip(move.keys, move.tokens, move.block_ids)):
                load = self._open(key, toks)
                if load is None:
                    self.failed.update(move.block_ids[i:])
                    break
                self._blocks.append((load, block, m))
        if not self._blocks:
            return
        self._epoch = self.engine.begin_epoch()
        # The blocks vLLM handed out were read or written by earlier steps' compute: copy after it.
        self.engine.wait_for_stream("h2d", streams.current(self.paged.device))
        for load, _, _ in self._blocks:
            load.before_release = self._wait_copies  # its host blocks go back only after the step's copies
        self._issued = [0] * self.paged.num_layers
        for layer in range(self.paged.num_layers):
            self._issue(layer, wait=False)

    def wait_layer(self, layer: int) -> None:
        """The compute stream's next work (this layer's attention) comes after this layer's copies."""
        if self._epoch is None:
            return
        self._issue(layer, wait=True)  # what was still on disk at start
        if layer in self._copied:
            self.engine.stream_wait_layer("h2d", layer, streams.current(self.paged.device), self._epoch)

    def finish(self) -> None:
        """After the forward: every load's blocks go back (each waits for the copies first), the epoch ends."""
        if self._epoch is None:
            return
        try:
            for layer in range(self.paged.num_layers):  # (a layer the forward never asked for is copied too)
                self._issue(layer, wait=True)
            for i, (load, _, _) in enumerate(self._blocks):
                if i not in self._dead:
                    self.loaded += 1
                    for tier, t in load.tier_tokens().items():
                        self.tier_tokens[tier] = self.tier_tokens.get(tier, 0) + t
                load.close()
        finally:
            self.engine.end_epoch(self._epoch)
            self._epoch, self._blocks, self._issued, self._copied, self._dead, self._last = None, [], [], set(), set(), None

    def take_failed(self) -> set[int]:
        failed, self.failed = self.failed, set()
        return failed

    # ---- inside ---------------------------------------------------------------------

    def _open(self, key: str, toks):
        try:
            load = self.store.load_prefix(key, toks)
        except Exception as e:  # noqa: BLE001 - a failing tier is a shorter match, never a failed request
            if not self._warned:
                self._warned = True
                log.warning("cachedattn: a paged block could not be loaded (%s: %s); vLLM recomputes it", type(e).__name__, e)
            return None
        if load is not None and load.n_tokens < len(toks):
            load.close()
            return None
        return load

    def _issue(self, layer: int, wait: bool) -> None:
        """Copies of `layer` for the step's blocks not issued yet, in order, up to the first whose bytes
        are still on their way from disk (wait=True: waits for those)."""
        segments = []
        n = self._issued[layer]
        while n < len(self._blocks):
            load, block, move = self._blocks[n]
            if n in self._dead:
                n += 1
                continue
            geo = load.geo
            off, kb = geo.layer_offset[layer], geo.k_bytes[layer]
            k_dst, v_dst = self.paged.ranges(layer, block)
            got = {}
            try:
                later = load.issue_layer(layer, [0], got.update, wait=wait)
            except OSError as e:  # damaged or unreadable (the store logged and dropped it): recomputed
                self._end_request(n, move, e)
                n += 1
                continue
            if later:
                break
            src = got[0]
            segments += [(src + off, k_dst, kb), (src + off + kb, v_dst, kb)]
            n += 1
        self._issued[layer] = n
        if segments:
            self.engine.copy_batch("h2d", segments, layer, self._epoch)
            self._copied.add(layer)
            self._last = layer

    def _end_request(self, pos: int, move: int, e: OSError) -> None:
        """The block at `pos` cannot be served: it and its request's later blocks are recomputed by vLLM
        (what earlier layers copied into them is overwritten then)."""
        for j in range(pos, len(self._blocks)):
            if self._blocks[j][2] == move and j not in self._dead:
                self._dead.add(j)
                self.failed.add(self._blocks[j][1])
        log.debug("cachedattn: a paged block's load ended (%s); vLLM recomputes it", e)

    def _wait_copies(self) -> None:
        """The host waits for every copy of this step: the stream runs them in issue order, so the event
        of the layer copied last covers the others (not the highest layer's: a layer still on disk at
        start is copied after higher ones)."""
        if self._last is not None:
            self.engine.wait_layer("h2d", self._last, self._epoch)
