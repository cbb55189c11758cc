"""The GPU load path: a turn's stored history copied host -> GPU by the copy
engine, layer by layer, `readahead` layers ahead of the layer computing.

GpuLoader (one per patched model on a GPU) owns the copy engine and two
staging buffers on the GPU: the running turn's and the read buffer (the next
job's first layers, issued while the running job decodes). GpuLoad is one
turn's use of one buffer, with its own epoch of layer events in the engine (a
preload never invalidates the running turn's events). At its start it fences
the buffer's previous readers and issues layers 0..R-1 from the pool's pinned
blocks (one copy per chunk and layer, see segments); chunks still on disk are
issued once their read finished and verified. layer(i), called from the
cache's update, makes the stream computing now wait for layer i's copies (no
host sync), copies K and V out of the slot on that stream into the cache's
own tensors, then fences that stream and issues layer i+R into the slot just
read. close() waits for this load's own last copy (not the engine's whole
stream: a preload issued later is not waited for), so host blocks go back
only once nothing reads them, also when the forward raised half way.

Every ordering call of the load path is one named call site here:
- GpuLoad._fence_previous_readers: wait_for_stream("h2d", s), the buffer's
  handover (the last load's readers, on whatever streams they ran);
- GpuLoad._fence_refill: wait_for_stream("h2d", stream), before layer i+R
  overwrites the slot layer i was just read from;
- GpuLoad._compute_waits_for: stream_wait_layer("h2d", i, stream, epoch), the
  consumer's wait; it also orders a preloaded (taken over) load, whose layer
  events live in its own epoch, against the stream that finally consumes it;
- GpuLoad._wait_copies: wait_layer("h2d", last, epoch), before the load's
  host blocks are released.

Staging memory is bounded: each buffer holds `readahead` layer slots (default
STAGED_LAYERS, ring-reused), grows with slack, and shrinks when a turn needs
far less than it holds; trim() frees idle buffers.
"""

from __future__ import annotations

import logging
import threading

import torch

from cachedattn.transfer import streams
from cachedattn.transfer.factory import engine_for
from cachedattn.transfer.segments import place, plan_layer

log = logging.getLogger("cachedattn")

#: Layer slots a staging buffer holds when the caller asks for no read-ahead depth.
STAGED_LAYERS = 4
_SLACK = 1.25  # growth headroom: a conversation growing turn by turn does not reallocate every turn
_ALIGN = 64 << 10  # allocation granularity of a staging buffer


def staged_layers(readahead: int | None, num_layers: int) -> int:
    """Slots a load uses: `readahead` (at least 1), or STAGED_LAYERS when None, never above the layer count."""
    r = STAGED_LAYERS if readahead is None else int(readahead)
    return max(1, min(r, num_layers))


class GpuLoad:
    def __init__(self, loader: GpuLoader, load, n_tokens: int, sliding, readahead: int | None):
        self.loader, self.engine, self.load = loader, loader.engine, load
        self.geo = load.geo
        self.n = n_tokens
        L = self.geo.spec.num_layers
        self._layers = L
        self.plans = [plan_layer(self.geo, i, n_tokens, sliding[i]) for i in range(L)]
        self.readahead = staged_layers(readahead, L)
        self._slot_bytes = max(p.nbytes for p in self.plans)
        self._deferred: dict[int, list[int]] = {}  # layer -> chunk positions still waiting for the disk
        self._issued: set[int] = set()
        self._last: int | None = None  # the layer issued last: its event follows every copy of this load
        self._readers: set[int] = set()  # streams that read this load's slots
        self._closed = False
        self.epoch = None
        self._buffer = loader.acquire_buffer(self.readahead * self._slot_bytes)
        load.before_release = self._wait_copies
        try:
            self.epoch = self.engine.begin_epoch()
            self._fence_previous_readers()
            for i in range(self.readahead):
                self._issue(i)
        except BaseException:
            self.close()
            raise

    # ---- ordering calls (one call site each; see the module doc) -------------------

    def _fence_previous_readers(self) -> None:
        for s in self.loader.readers(self._buffer):
            self.engine.wait_for_stream("h2d", s)

    def _fence_refill(self, stream: int) -> None:
        self.engine.wait_for_stream("h2d", stream)

    def _compute_waits_for(self, i: int, stream: int) -> None:
        self.engine.stream_wait_layer("h2d", i, stream, self.epoch)

    def _wait_copies(self) -> None:
        if self._last is not None and self.epoch is not None:
            self.engine.wait_layer("h2d", self._last, self.epoch)

    # ---- issuing ----------------------------------------------------------------------

    def _slot(self, layer: int) -> torch.Tensor:
        a = (layer % self.readahead) * self._slot_bytes
        return self.loader.buffers[self._buffer][a : a + self._slot_bytes]

    def _issue_fn(self, layer: int):
        plan, dst = self.plans[layer], self._slot(layer).data_ptr()

        def issue(ptrs: dict[int, int]) -> None:
            self.engine.copy_batch("h2d", plan.segments(ptrs, dst, positions=sorted(ptrs)), layer, self.epoch)
            self._last = layer

        return issue

    def _issue(self, layer: int) -> None:
        self._issued.add(layer)
        plan = self.plans[layer]
        if not plan.chunks:
            return
        later = self.load.issue_layer(layer, list(plan.positions()), self._issue_fn(layer))
        if later:
            self._deferred[layer] = later

    def layer(self, i: int, k_out=None, v_out=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's history, K and V ``[kv_heads, tokens, head_dim]``, written into k_out / v_out
        (e.g. the front of the cache layer's own tensors) or new tensors on `device`, by the stream
        current now on that device."""
        plan = self.plans[i]
        device = k_out.device if k_out is not None else device if device is not None else self.loader.device
        stream = streams.current(streams.device_of(k_out) if k_out is not None else device)  # asked at each use
        if i not in self._issued:  # asked out of order (a model skipping a layer): its slot may be busy
            k, v = self.load.read_layer(i, start=plan.start, end=plan.end)
            return _into(k, k_out, device), _into(v, v_out, device)
        for j in [j for j in self._deferred if j != i and self.load.layer_ready(j)]:
            self.load.issue_layer(j, self._deferred.pop(j), self._issue_fn(j))
        if i in self._deferred:
            self.load.issue_layer(i, self._deferred.pop(i), self._issue_fn(i), wait=True)
        if plan.chunks:
            self._compute_waits_for(i, stream)
            self._readers.add(stream)
        k, v = place(plan, self._slot(i), self.geo, k_out, v_out)
        nxt = i + self.readahead
        if nxt < self._layers and nxt not in self._issued:
            if self.plans[nxt].chunks:
                self._fence_refill(stream)  # the copy out of slot i above is queued on `stream`
            self._issue(nxt)
        return k, v

    def wait_all(self) -> None:
        """Issues every layer and waits for all of them on the host (load, then compute: a baseline)."""
        if self.readahead < self._layers:
            raise ValueError("wait_all needs a load staging every layer (readahead >= the layer count)")
        for i in range(self._layers):
            if i in self._deferred:
                self.load.issue_layer(i, self._deferred.pop(i), self._issue_fn(i), wait=True)
        self._wait_copies()

    def close(self) -> None:
        """Waits for this load's copies, gives the staging buffer back, closes the store's load."""
        if self._closed:
            return
        self._closed = True
        try:
            self.load.close()  # waits for the copies first (before_release), also after store.close()
        finally:
            self.release_staging()  # a load already ended by the store: its staging slots may still be written

    def release_staging(self) -> None:
        """Waits for this load's copies and gives its staging buffer back, leaving the store's load
        open (a batch keeps every row's conversation in use until its rows are saved)."""
        if self._buffer is None:
            return
        try:
            self._wait_copies()
            if self.epoch is not None:
                self.engine.end_epoch(self.epoch)
        finally:
            self._last = self.epoch = None
            b, self._buffer = self._buffer, None
            self.loader.release_buffer(b, self.readahead * self._slot_bytes, self._readers)


def _into(t: torch.Tensor, out, device) -> torch.Tensor:
    if out is None:
        return t.to(device)
    out.copy_(t)
    return out


class GpuLoader:
    """One patched model's copy engine, staging buffers and read-buffer handoff."""

    BUFFERS = 2  # the running turn's and the read buffer

    def __init__(self, engine, device: torch.device):
        self.engine, self.device = engine, device
        self.buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8, device=device)] * self.BUFFERS
        self._readers: list[set[int]] = [set() for _ in range(self.BUFFERS)]
        self._free = list(range(self.BUFFERS))
        self._lock = threading.Lock()
        self._ahead: tuple[str, torch.Tensor, GpuLoad] | None = None  # conv id, ids, preloaded turn

    @classmethod
    def for_model(cls, state, model) -> GpuLoader | None:
        """The loader of a patched model's current device (None: the host path)."""
        device = next(model.parameters()).device
        cur = getattr(state, "gpu", None)
        if cur is not None and cur.device == device:
            return cur
        if cur is not None:  # the model moved: the old device's read buffer holds a load (a lease) open
            cur.drop_preloaded()
            cur.trim()
        engine = engine_for(device, state.kv.spec.num_layers, getattr(state.store, "gpu_pinned", None))
        state.gpu = None if engine is None else cls(engine, device)
        return state.gpu

    # ---- staging buffers ------------------------------------------------------------

    def acquire_buffer(self, nbytes: int) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError("both GPU staging buffers are in use")
            b = self._free.pop(0)
        if self.buffers[b].numel() < nbytes:
            # No copy writes the old buffer any more (its last load waited for its copies at close).
            grown = -(-int(nbytes * _SLACK) // _ALIGN) * _ALIGN
            self.buffers[b] = torch.empty(grown, dtype=torch.uint8, device=self.device)
            # Fresh memory is ordered against its old users only on the allocating stream (the caching
            # allocator reuses a block in that stream's order, its old kernels may still be queued): the
            # engine's first copies into it must wait for that stream, as for a reader.
            self._readers[b] = {streams.current(self.device)}
        return b

    def readers(self, b: int) -> set[int]:
        """Streams that read buffer b since its last handover (a new load fences them first)."""
        return set(self._readers[b])

    def release_buffer(self, b: int, used: int = 0, readers=()) -> None:
        if readers:
            self._readers[b] = set(readers)
        if self.buffers[b].numel() > 2 * max(used, _ALIGN):  # far more than this turn needed: give it back
            self._drop(b)
        with self._lock:
            self._free.append(b)

    def _drop(self, b: int) -> None:
        buf = self.buffers[b]
        if buf.is_cuda:  # the caching allocator must not hand it out before the readers' kernels ran
            for s in self._readers[b]:
                buf.record_stream(torch.cuda.ExternalStream(s, device=buf.device))
        self.buffers[b] = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._readers[b] = set()

    def trim(self) -> None:
        """Frees the staging buffers no load holds (the engine calls it when its queue is empty)."""
        with self._lock:
            free = list(self._free)
        for b in free:
            self._drop(b)

    def staged_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def start(self, load, n_tokens: int, sliding, readahead) -> GpuLoad:
        return GpuLoad(self, load, n_tokens, sliding, readahead)

    # ---- the read buffer ----------------------------------------------------------

    def preload(self, store, conv_id: str, ids: torch.Tensor, sliding, readahead) -> bool:
        """Issues the next job's first layers into the free buffer; True if something was issued."""
        self.drop_preloaded()
        if not self._free or ids.shape[-1] < 2:
            return False
        ids = ids.reshape(-1).cpu()
        load = store.load_prefix(conv_id, ids, limit=ids.shape[0] - 1, readahead=readahead)
        if load is None:
            return False
        if load.n_tokens == 0:
            load.close()
            return False
        self._ahead = (conv_id, ids[: load.n_tokens].clone(), self.start(load, load.n_tokens, sliding, readahead))
        return True

    def preloaded_conversation(self) -> str | None:
        """Whose history the read buffer holds (None: nothing preloaded)."""
        ahead = self._ahead
        return None if ahead is None else ahead[0]

    def take_preloaded(self, conv_id: str, ids: torch.Tensor, limit: int) -> GpuLoad | None:
        """The preloaded turn if it is this conversation's and a prefix of `ids` within `limit`.

        Its copies are ordered against the consumer by GpuLoad._compute_waits_for at each layer's
        use (its events live in its own epoch, on whatever stream consumes it)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        cid, pre, g = ahead
        ids = ids.reshape(-1).cpu()
        if cid == conv_id and pre.shape[0] <= min(limit, ids.shape[0]) and torch.equal(ids[: pre.shape[0]], pre):
            return g
        g.close()
        return None

    def drop_preloaded(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[2].close()
