"""KVLoad: a conversation's stored KV, one layer at a time.

Chunks in host memory are read in place. Chunks only on disk get fresh host
blocks, and their layer ranges are read layer by layer, `readahead` layers
ahead of the layer being asked for, so that reading layer i+1 overlaps with
the caller computing layer i. Each layer of each chunk read from disk is
checked against its checksum before any byte of it is handed out.
"""

from __future__ import annotations

import errno

import torch

from cachedattn.store.chunk_file import layer_checksum


class ChunkCorruptError(OSError):
    """A stored chunk failed its checksum or could not be read; it was removed."""


class KVLoad:
    def __init__(self, store, conv, n_tokens: int, chunks, blocks, from_disk, readahead=None, prefetch=False):
        self._store = store
        self._prefetch = prefetch
        self._conv = conv
        self.n_tokens = n_tokens
        self._chunks = chunks
        self._blocks = blocks  # one held reference per chunk
        self._disk_pos = from_disk  # positions (in chunks) read from disk
        self._geo = store._geometry
        self._layers = self._geo.spec.num_layers
        self._readahead = self._layers if readahead is None else max(1, int(readahead))
        self._files = []
        for i in from_disk:
            try:
                self._files.append(store._disk.open_file(conv.dirname, chunks[i].file))
            except OSError as e:
                for f in self._files:
                    f.close()
                self._fail(i, f"cannot open: {e.strerror}", e.errno or errno.EIO)
        self._batches: dict[int, object] = {}
        self._verified: set[int] = set()
        self._next = 0
        self._error: OSError | None = None
        self._closed = False
        self.from_host = len(chunks) - len(from_disk)
        self.from_disk = len(from_disk)
        self._issue(self._readahead)

    # ---- reading ------------------------------------------------------------

    def _issue(self, upto: int) -> None:
        if not self._disk_pos:
            self._next = self._layers
            return
        blocks = [self._blocks[i] for i in self._disk_pos]
        while self._next < min(upto, self._layers):
            self._batches[self._next] = self._store._disk.read_layer(self._files, blocks, self._next)
            self._next += 1

    def _ensure(self, layer: int) -> None:
        if self._error is not None:
            raise self._error
        if layer in self._verified:
            return
        self._issue(layer + self._readahead)
        if self._disk_pos:
            try:
                self._batches[layer].wait()
            except OSError as e:
                bad = next((i for i, f in zip(self._disk_pos, self._files) if f.path == e.filename), self._disk_pos[0])
                self._fail(bad, f"unreadable: {e.strerror or e}", e.errno or errno.EIO)
            off, length = self._geo.layer_range(layer)
            for i in self._disk_pos:
                view = self._blocks[i].view()[off : off + length]
                if layer_checksum(view.numpy()) != self._chunks[i].checksums[layer]:
                    self._fail(i, f"layer {layer} checksum mismatch", errno.EBADMSG)
            self._store._stats.add(disk_bytes_read=length * len(self._disk_pos))
        self._verified.add(layer)

    def _fail(self, pos: int, why: str, err: int) -> None:
        chunk = self._chunks[pos]
        path = self._store._disk.path(self._conv.dirname, chunk.file or "?")
        self._error = ChunkCorruptError(err, f"stored KV chunk {chunk.index} of {self._conv.id!r} is bad ({why})", path)
        self._store._on_bad_chunk(self._conv, chunk, why)
        raise self._error

    def tier_tokens(self) -> dict[str, int]:
        """How many of the loaded tokens sit in host memory and how many come from disk."""
        C = self._geo.chunk_tokens
        disk = sum(min(C, self.n_tokens - i * C) for i in self._disk_pos)
        return {"host": self.n_tokens - disk, "disk": disk}

    def layer_ready(self, layer: int) -> bool:
        """True when read_layer(layer) would not wait for the disk."""
        if layer in self._verified or not self._disk_pos:
            return True
        b = self._batches.get(layer)
        return b is not None and b.done()

    def read_layer(self, layer: int, k_out=None, v_out=None, start: int = 0, end: int | None = None):
        """K and V of tokens [start, end) of one layer, ``[kv_heads, end-start, head_dim]``.

        Fills k_out/v_out when given (any device), else returns new CPU tensors.
        """
        if self._closed:
            raise ValueError("this load is closed")
        if not 0 <= layer < self._layers:
            raise ValueError(f"layer {layer} out of range (model has {self._layers})")
        end = self.n_tokens if end is None else end
        if not 0 <= start <= end <= self.n_tokens:
            raise ValueError(f"token range [{start}, {end}) outside the loaded [0, {self.n_tokens})")
        self._ensure(layer)
        spec = self._geo.spec
        h, d = spec.layers[layer]
        n = end - start
        k_out = torch.empty(h, n, d, dtype=spec.dtype) if k_out is None else k_out
        v_out = torch.empty(h, n, d, dtype=spec.dtype) if v_out is None else v_out
        for name, t in (("k_out", k_out), ("v_out", v_out)):
            if tuple(t.shape) != (h, n, d) or t.dtype != spec.dtype:
                raise ValueError(f"{name} is {tuple(t.shape)}/{t.dtype}, layer {layer} needs {(h, n, d)}/{spec.dtype}")
        C = self._geo.chunk_tokens
        for pos in range(start // C, (end - 1) // C + 1 if n else 0):
            a, b = max(start, pos * C) - pos * C, min(end, pos * C + C) - pos * C
            k, v = self._geo.kv_views(self._blocks[pos].view(), layer)
            dst = pos * C + a - start
            k_out[:, dst : dst + b - a].copy_(k[:, a:b])
            v_out[:, dst : dst + b - a].copy_(v[:, a:b])
        self._store._stats.add(host_bytes_read=2 * h * n * d * spec.element_size)
        return k_out, v_out

    def read_all(self) -> None:
        """Waits for and checks every layer (what a prefetch does)."""
        for layer in range(self._layers):
            self._ensure(layer)

    # ---- ending -------------------------------------------------------------

    def close(self) -> None:
        """Ends the load; chunks read from disk stay in host memory when whole."""
        if self._closed:
            return
        self._closed = True
        whole = self._error is None
        if whole:
            try:
                self.read_all()
            except OSError:
                whole = False
        for b in self._batches.values():  # no block is freed under a read in flight
            try:
                b.wait()
            except OSError:
                pass  # already reported by read_layer, or irrelevant: this load is ending either way
        for f in self._files:
            f.close()
        self._store._finish_load(self, whole)

    def __enter__(self) -> KVLoad:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # A load dropped without close() would pin its conversation forever.
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass  # nothing can be raised from a finalizer
