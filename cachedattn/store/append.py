"""KVAppend: new KV of a conversation, handed over layer by layer.

Layers are copied into host blocks as they arrive, and with write-through
each layer's ranges are at once submitted for writing to the chunks'
temporary files, so copying layer i+1 overlaps with writing layer i (put_layer
returns after its copy; the writes run on the I/O engine). Nothing is visible
to lookups or loads until commit(), which publishes all chunks at once; the
returned future completes when the files are complete and renamed into place.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import torch

from cachedattn.store import lock_order
from cachedattn.store.chunk_file import layer_checksum


class KVAppend:
    def __init__(self, store, conv, lease, tokens: np.ndarray, start: int, blocks, staged, parent: bytes):
        self._store = store
        self.conv = conv
        self.lease = lease
        self.tokens = tokens
        self.start = start
        self.blocks = blocks  # one per chunk from first_index on
        self.first_index = start // store._geometry.chunk_tokens
        self.staged = staged  # [(tmp path, File)] per chunk when writing layer by layer
        self.parent = parent  # key of the chunk before first_index when the append began
        self.batches = []  # their per-layer write batches
        self.sums = [[0] * store._geometry.spec.num_layers for _ in blocks]
        self._done: set[int] = set()
        self._closed = False
        self._cancelled = False
        self._settle = None  # waits for copies an engine still has in flight into self.blocks
        # put_layer/commit/abort against the store's close()
        self._mutex = lock_order.ordered(threading.Lock(), lock_order.LOAD, "append")
        store._register(self)

    @property
    def n_new(self) -> int:
        return len(self.tokens) - self.start

    def put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """K and V of the new tokens for one layer: ``[kv_heads, n_new, head_dim]`` (or with a leading 1)."""
        with self._mutex:
            self._check_usable()
            self._put_layer(layer, k, v)

    def _check_usable(self) -> None:
        if self._cancelled:
            raise ValueError("this append was aborted by store.close(): the store is closed")
        if self._closed:
            raise ValueError("this append is already committed or aborted")

    def _check_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        geo = self._store._geometry
        spec = geo.spec
        if not 0 <= layer < spec.num_layers:
            raise ValueError(f"layer {layer} out of range (model has {spec.num_layers})")
        h, d = spec.layers[layer]
        want = (h, self.n_new, d)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor")
            if t.dim() == 4 and t.shape[0] == 1:
                t = t[0]
            if tuple(t.shape) != want or t.dtype != spec.dtype:
                raise ValueError(
                    f"layer {layer} {name} is {tuple(t.shape)}/{t.dtype}; this model's KV needs {want}/{spec.dtype}"
                )
        return (k[0] if k.dim() == 4 else k), (v[0] if v.dim() == 4 else v)

    def _put_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        geo = self._store._geometry
        k, v = self._check_kv(layer, k, v)
        C = geo.chunk_tokens
        end = len(self.tokens)
        for j, block in enumerate(self.blocks):
            c0 = (self.first_index + j) * C
            s0, s1 = max(self.start, c0), min(end, c0 + C)
            kd, vd = geo.kv_views(block.view(), layer)
            kd[:, s0 - c0 : s1 - c0].copy_(k[:, s0 - self.start : s1 - self.start])
            vd[:, s0 - c0 : s1 - c0].copy_(v[:, s0 - self.start : s1 - self.start])
        self._seal_layer(layer)
        if self.staged is not None:
            files = [f for _, f in self.staged]
            self.batches.append(self._store._disk.write_layer(files, self.blocks, layer))
        self._done.add(layer)

    def copy_segments(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> list[tuple[int, int, int]]:
        """(src_ptr, dst_ptr, bytes) triples that copy one layer's new K and V (as put_layer
        takes them, on any device) into this append's host blocks: one per head, chunk and K/V.

        For a copy engine: the caller issues them, keeps k and v alive and calls
        layer_copied(layer) only once the copies are done (nothing reads the
        blocks before). Rows must be dense (``stride(-1) == 1``, ``stride(-2) == head_dim``)."""
        with self._mutex:
            self._check_usable()
            k, v = self._check_kv(layer, k, v)
        geo = self._store._geometry
        C, end, es = geo.chunk_tokens, len(self.tokens), k.element_size()
        d = k.shape[-1]
        for name, t in (("k", k), ("v", v)):
            if t.stride(-1) != 1 or (t.shape[1] > 1 and t.stride(-2) != d):
                raise ValueError(f"layer {layer} {name}: each head's rows must be dense (make it contiguous)")
        segs = []
        for j, block in enumerate(self.blocks):
            c0 = (self.first_index + j) * C
            s0, s1 = max(self.start, c0), min(end, c0 + C)
            if s1 <= s0:
                continue
            for t, dst in zip((k, v), geo.kv_views(block.view(), layer)):
                for h in range(t.shape[0]):
                    src = t.data_ptr() + (h * t.stride(0) + (s0 - self.start) * t.stride(1)) * es
                    segs.append((src, dst[h, s0 - c0].data_ptr(), (s1 - s0) * d * es))
        return segs

    def layer_copied(self, layer: int) -> None:
        """The copies of copy_segments(layer) are done: seal the layer and write it like put_layer."""
        with self._mutex:
            self._check_usable()
            if not 0 <= layer < self._store._geometry.spec.num_layers:
                raise ValueError(f"layer {layer} out of range")
            self._seal_layer(layer)
            if self.staged is not None:
                files = [f for _, f in self.staged]
                self.batches.append(self._store._disk.write_layer(files, self.blocks, layer))
            self._done.add(layer)

    def _seal_layer(self, layer: int) -> None:
        """Zeroes the unused slots of a partial last chunk (no stale bytes of other
        conversations reach the disk) and checksums the layer in every block."""
        geo = self._store._geometry
        C, n = geo.chunk_tokens, len(self.tokens)
        off, length = geo.layer_range(layer)
        for j, block in enumerate(self.blocks):
            used = min(n, (self.first_index + j + 1) * C) - (self.first_index + j) * C
            if used < C:
                for part in geo.kv_views(block.view(), layer):
                    part[:, used:].zero_()
            self.sums[j][layer] = layer_checksum(block.view()[off : off + length].numpy())

    def put(self, kv) -> None:
        """All layers at once: a sequence of (k, v) pairs."""
        for layer, (k, v) in enumerate(kv):
            self.put_layer(layer, k, v)

    def commit(self) -> Future:
        """Publishes the new KV; the future completes when it is on disk."""
        with self._mutex:
            self._check_usable()
            missing = sorted(set(range(self._store._geometry.spec.num_layers)) - self._done)
            if missing and self.n_new:
                raise ValueError(f"cannot commit: no KV was put for layers {missing}")
            self._closed = True
            for layer in range(self._store._geometry.spec.num_layers):
                if layer not in self._done:  # nothing new for it (a pure truncation): seal what was copied
                    self._seal_layer(layer)
            return self._store._writer.commit(self)

    def settle_with(self, wait) -> None:
        """`wait()` returns once no copy issued by the caller still writes this append's blocks.

        A copy engine fills the blocks asynchronously (hf.async_saving); abort, from the
        saver or from store.close() on another thread, calls it before the blocks go back
        to the pool, so a pending DMA never writes memory that was handed out again."""
        self._settle = wait

    def abort(self) -> None:
        with self._mutex:
            if not self._closed:
                self._closed = True
                self._release_blocks()

    def _cancel(self) -> None:
        """The store is closing: abort now."""
        with self._mutex:
            if not self._closed:
                self._closed = self._cancelled = True
                self._release_blocks()

    def _release_blocks(self) -> None:
        try:
            if self._settle is not None:
                self._settle()
        finally:
            self._store._writer.abort(self)

    def __enter__(self) -> KVAppend:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if not self._closed:
            self.abort()
