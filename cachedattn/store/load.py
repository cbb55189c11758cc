"""Loads: a conversation's stored KV, one layer at a time (KVLoad), and prefetches.

A load is decided under the store lock in one step (which chunks, a lease on
the conversation, references to the host copies: open_load); memory for the
chunks that are only on disk is found and the tier reader opened without it;
the load's end is recorded under it again (KVLoad._finish).

Chunks in host memory are read in place. Chunks only on disk get fresh host
blocks, and the tier reader (tier.py) reads their layer ranges layer by
layer, `readahead` layers ahead of the layer being asked for, so that reading
layer i+1 overlaps with the caller computing layer i. Each layer of each
chunk read from disk is checked against its checksum before any byte of it
is handed out.
"""

from __future__ import annotations

import errno
import threading
from concurrent.futures import Future

import torch

from cachedattn.store import keys, lock_order
from cachedattn.store.index import Plan
from cachedattn.store.record import ChunkCorruptError, layer_checksum
from cachedattn.transfer import checkpoints

__all__ = ["KVLoad", "ChunkCorruptError", "open_load", "prefetch", "done_future"]

# A chunk file that cannot be opened for one of these is fine; the process ran out of something.
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def done_future(value=None) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def open_load(core, conv_id, *, n_tokens=None, token_ids=None, limit=None, readahead=None, prefetch=False):
    """A KVLoad of the first n_tokens (load), of the longest stored prefix of token_ids
    (load_prefix: None when nothing matches) or of all stored tokens (prefetch: None when
    nothing is stored or it is all in host memory).

    Never fails for want of host memory: a load whose disk chunks find no block (after
    HOST_WAIT_S at most) stops before the first of them (load_prefix/prefetch: None
    when that leaves nothing; load: a load of fewer tokens, see KVLoad.n_tokens)."""
    ix = core.index
    toks = None if token_ids is None else keys.as_token_array(token_ids)
    core.executor.resolve(conv_id)
    with ix.lock:
        plan = ix.plan_load(conv_id, toks, n_tokens, limit, prefetch)
    if plan is None:
        return None
    n = plan.n
    chunks, held, from_disk, lease = plan.chunks, plan.held, plan.from_disk, plan.lease
    try:
        fresh = core.executor.alloc(len(from_disk), foreground=not prefetch, partial=True) if from_disk else []
    except BaseException:
        for b in held.values():
            b.release()
        core.executor.release(lease)
        raise
    if len(fresh) < len(from_disk):  # host memory ran out: the load stops before the first chunk left out
        cut = from_disk[len(fresh)]
        for i in [i for i in held if i >= cut]:
            held.pop(i).release()
        chunks, from_disk, n = chunks[:cut], from_disk[: len(fresh)], min(n, cut * ix.chunk_tokens)
        core.executor.shortened(f"host memory is full (all {core.pool.capacity_blocks} chunk blocks are in use)")
        if cut == 0 and (toks is not None or prefetch):
            core.executor.release(lease)
            return None  # a miss
    fresh_iter = iter(fresh)
    blocks = [held[i] if i in held else next(fresh_iter) for i in range(len(chunks))]
    core.stats.add(host_hits=len(held), host_misses=len(from_disk), tokens_reused=0 if prefetch else n)
    return KVLoad(core, plan.conv, lease, n, chunks, blocks, from_disk, readahead, prefetch)


def prefetch(core, conv_id: str) -> Future:
    """Brings a conversation from disk into host memory on the store's threads (see AttentionStore.prefetch)."""
    keys.validate_conversation_id(conv_id)
    core.executor.resolve(conv_id)
    with core.index.lock:
        core.index.check_ready()
        conv = core.index.convs.get(conv_id)
        if conv is None or all(c.in_host for c in conv.chunks):
            return done_future(0)  # gone meanwhile, or nothing to bring in

    def job() -> int:
        ld = open_load(core, conv_id, prefetch=True)
        if ld is None:
            return 0  # dropped, cut or brought in meanwhile
        with ld:
            try:
                ld.read_all()
            except ChunkCorruptError:
                return 0  # removed and logged already; a later load recomputes from the cut
            return ld.from_disk

    return core.submit(job)


class KVLoad:
    def __init__(self, core, conv, lease, n_tokens: int, chunks, blocks, from_disk, readahead=None, prefetch=False):
        self._core = core
        self._prefetch = prefetch
        self._conv = conv
        self._lease = lease
        # read_layer against close() from the store's close()
        self._mutex = lock_order.ordered(threading.Lock(), lock_order.LOAD, "load")
        self._cancelled = False
        self._closed = False
        self._error: OSError | None = None
        self._batches: dict[int, object] = {}
        self.n_tokens = n_tokens
        self._chunks = chunks
        self._blocks = blocks  # one held reference per chunk
        self._disk_pos = from_disk  # positions (in chunks) read from disk
        self._geo = core.geometry
        self._layers = self._geo.spec.num_layers
        self._readahead = self._layers
        self._reader = None  # the disk tier's reader of the chunks in from_disk
        self._verified: set[int] = set()
        self._next = 0
        self.from_host = len(chunks) - len(from_disk)
        self.from_disk = len(from_disk)
        self.before_release = None  # the GPU path's wait for copies still reading this load's blocks
        try:
            if readahead is not None:
                self._readahead = max(1, int(readahead))
            if from_disk:
                self._reader = core.disk.open_read(conv, [chunks[i] for i in from_disk])
                e = self._reader.open_error
                if e is not None:
                    i = from_disk[self._reader.opened]
                    if e.errno in OUT_OF_RESOURCES:  # not the chunk's fault: stop before it
                        self._shorten(i)
                        core.executor.shortened(f"cannot open a chunk file ({e.strerror or e})")
                    else:
                        self._fail(i, f"cannot open: {e.strerror or e}", e.errno or errno.EIO)
            self._issue(self._readahead)
            core.index.register(self)
        except BaseException:
            self.close()
            raise

    def _shorten(self, pos: int) -> None:
        """Before any read is issued: the load ends before chunk position pos."""
        for b in self._blocks[pos:]:
            b.release()
        self._chunks, self._blocks = self._chunks[:pos], self._blocks[:pos]
        self._disk_pos = [p for p in self._disk_pos if p < pos]
        self.n_tokens = min(self.n_tokens, pos * self._geo.chunk_tokens)
        self.from_host = len(self._chunks) - len(self._disk_pos)
        self.from_disk = len(self._disk_pos)

    # ---- reading ------------------------------------------------------------

    def _issue(self, upto: int) -> None:
        if not self._disk_pos:
            self._next = self._layers
            return
        blocks = [self._blocks[i] for i in self._disk_pos]
        while self._next < min(upto, self._layers):
            self._batches[self._next] = self._reader.read_layer(self._next, blocks)
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
                j = self._reader.position(e)
                self._fail(self._disk_pos[j or 0], f"unreadable: {e.strerror or e}", e.errno or errno.EIO)
            off, length = self._geo.layer_range(layer)
            for i in self._disk_pos:
                view = self._blocks[i].view()[off : off + length]
                if layer_checksum(view.numpy()) != self._chunks[i].checksums[layer]:
                    self._fail(i, f"layer {layer} checksum mismatch", errno.EBADMSG)
            self._core.stats.add(disk_bytes_read=length * len(self._disk_pos))
        self._verified.add(layer)

    def _fail(self, pos: int, why: str, err: int) -> None:
        chunk = self._chunks[pos]
        path = self._reader.path(self._disk_pos.index(pos)) if pos in self._disk_pos else None
        self._error = ChunkCorruptError(err, f"stored KV chunk {chunk.index} of {self._conv.id!r} is bad ({why})", path)
        self._core.executor.bad_chunk(self._conv, chunk, why)
        raise self._error

    def _check_usable(self) -> None:
        if self._cancelled:
            raise ValueError("this load was ended by store.close(): the store is closed")
        if self._closed:
            raise ValueError("this load is closed")

    def tier_tokens(self) -> dict[str, int]:
        """How many of the loaded tokens sit in host memory and how many come from disk."""
        C = self._geo.chunk_tokens
        disk = sum(min(C, self.n_tokens - i * C) for i in self._disk_pos)
        return {"host": self.n_tokens - disk, "disk": disk}

    @property
    def geo(self):
        """The store's chunk geometry (how a chunk block holds each layer's K and V)."""
        return self._geo

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
        if not 0 <= layer < self._layers:
            raise ValueError(f"layer {layer} out of range (model has {self._layers})")
        end = self.n_tokens if end is None else end
        if not 0 <= start <= end <= self.n_tokens:
            raise ValueError(f"token range [{start}, {end}) outside the loaded [0, {self.n_tokens})")
        with self._mutex:
            self._check_usable()
            self._ensure(layer)
            return self._copy_out(layer, k_out, v_out, start, end)

    def _copy_out(self, layer: int, k_out, v_out, start: int, end: int):
        spec = self._geo.spec
        h, d = spec.layers[layer]
        n = end - start
        k_out = torch.empty(h, n, d, dtype=spec.dtype) if k_out is None else k_out
        v_out = torch.empty(h, n, d, dtype=spec.dtype) if v_out is None else v_out
        for name, t in (("k_out", k_out), ("v_out", v_out)):
            if tuple(t.shape) != (h, n, d) or t.dtype != spec.dtype:
                raise ValueError(f"{name} is {tuple(t.shape)}/{t.dtype}, layer {layer} needs {(h, n, d)}/{spec.dtype}")
        C = self._geo.chunk_tokens
        ks, vs = [], []
        for pos in range(start // C, (end - 1) // C + 1 if n else 0):
            a, b = max(start, pos * C) - pos * C, min(end, pos * C + C) - pos * C
            k, v = self._geo.kv_views(self._blocks[pos].view(), layer, a, b)
            ks.append(k)
            vs.append(v)
        if ks and k_out.device.type == "cpu":  # one call per K and V, straight into the caller's tensors
            torch.cat(ks, 1, out=k_out)
            torch.cat(vs, 1, out=v_out)
        else:  # another device: a copy per chunk (cat cannot read host tensors into a device's out)
            dst = 0
            for k, v in zip(ks, vs):
                k_out[:, dst : dst + k.shape[1]].copy_(k)
                v_out[:, dst : dst + v.shape[1]].copy_(v)
                dst += k.shape[1]
        self._core.stats.add(host_bytes_read=2 * h * n * d * spec.element_size)
        return k_out, v_out

    def issue_layer(self, layer: int, positions, issue, wait: bool = False) -> list[int]:
        """GPU path: calls ``issue({position: block address})`` with the chunks among `positions`
        whose bytes of `layer` are in host memory and checked; returns those still waiting for the
        disk (none with ``wait=True``: it waits for and checks them first)."""
        with self._mutex:
            self._check_usable()
            disk = set(self._disk_pos)
            ready = [p for p in positions if p not in disk]
            later = [p for p in positions if p in disk]
            if later and (wait or self.layer_ready(layer)):
                self._ensure(layer)
                ready, later = ready + later, []
            if ready:
                issue({p: self._blocks[p].ptr for p in ready})
                self._core.stats.add(host_bytes_read=len(ready) * 2 * self._geo.k_bytes[layer])
            return later

    def read_all(self) -> None:
        """Waits for and checks every layer (what a prefetch does)."""
        with self._mutex:
            self._check_usable()
            for layer in range(self._layers):
                self._ensure(layer)

    # ---- ending -------------------------------------------------------------

    def close(self) -> None:
        """Ends the load; chunks read from disk stay in host memory when whole."""
        with self._mutex:
            self._end(cancel=False)

    def _cancel(self) -> None:
        """The store is closing: end now, keeping nothing."""
        with self._mutex:
            self._end(cancel=True)

    def _end(self, cancel: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancelled = cancel
        whole = self._error is None and not cancel
        if whole:
            try:
                for layer in range(self._layers):
                    self._ensure(layer)
            except OSError:
                whole = False
        for b in self._batches.values():  # no block is freed under a read in flight
            try:
                b.wait()
            except OSError:
                pass  # already reported by read_layer, or irrelevant: this load is ending either way
        if self._reader is not None:
            self._reader.close()
        try:
            if self.before_release is not None:
                self.before_release()  # no block goes back under a GPU copy still reading it
            for b in self._blocks:  # a copy engine that can tell (the fake, in tests) checks it did not
                checkpoints.host_release(b.ptr, b.block.nbytes)
        finally:
            self._finish(whole)  # the lease goes either way: store.close() must not hang

    def _finish(self, whole: bool) -> None:
        """Chunks read whole from disk stay in host memory; every other reference is let go."""
        core, ix = self._core, self._core.index
        adopted = 0
        disk_set = set(self._disk_pos)
        plan = Plan()
        with ix.lock:
            for pos, (c, b) in enumerate(zip(self._chunks, self._blocks)):
                if whole and pos in disk_set and ix.adopt_read(self._conv, c, b):
                    adopted += 1  # this load's reference became the chunk's own
                else:
                    b.release()
            ix.release(self._lease, plan)
        if plan:  # files a dropped or cut conversation left for this load to let go
            core.executor.run(plan)
        if whole:
            core.stats.add(disk_hits=len(self._disk_pos))
        if self._prefetch:
            core.stats.add(host_prefetches=adopted)

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
