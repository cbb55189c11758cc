"""The GPU load path: a turn's stored history copied host -> GPU by the copy
engine, layer by layer, `readahead` layers ahead of the layer computing.

GpuLoader (one per patched model on a GPU) owns the copy engine and two
staging buffers on the GPU: the running turn's and the read buffer (the next
job's first layers, issued while the running job decodes). GpuLoad is one
turn's use of them: at its start it begins an epoch and issues layers
0..R-1 from the pool's pinned blocks (one copy per chunk and layer, see
segments); chunks still on disk are issued once their read finished and
verified. layer(i), called from the cache's update on the compute stream,
makes that stream wait for layer i's copies (no host sync), places K and V
with a permute on the compute stream and issues layer i+R into the slot just
read (after the engine's stream waited for that read). close() waits for a
ticket covering every copy issued, so host blocks go back only once nothing
reads them, also when the forward raised half way.
"""

from __future__ import annotations

import logging
import threading

import torch

from cachedattn.transfer import streams
from cachedattn.transfer.factory import engine_for
from cachedattn.transfer.segments import place, plan_layer

log = logging.getLogger("cachedattn")


class GpuLoad:
    def __init__(self, loader: GpuLoader, load, n_tokens: int, sliding, readahead: int | None):
        self.loader, self.engine, self.load = loader, loader.engine, load
        self.geo = load._geo
        self.n = n_tokens
        L = self.geo.spec.num_layers
        self._layers = L
        self.plans = [plan_layer(self.geo, i, n_tokens, sliding[i]) for i in range(L)]
        self.readahead = L if readahead is None else max(1, min(int(readahead), L))
        self._slot_bytes = max(p.nbytes for p in self.plans)
        self._buffer = loader.acquire_buffer(self.readahead * self._slot_bytes)
        self._stream = streams.current(loader.device)
        self._deferred: dict[int, list[int]] = {}  # layer -> chunk positions still waiting for the disk
        self._issued: set[int] = set()
        self._closed = False
        load.before_release = self._wait_copies
        try:
            self.epoch = self.engine.begin_epoch()
            for i in range(self.readahead):
                self._issue(i)
        except BaseException:
            self.close()
            raise

    def _slot(self, layer: int) -> torch.Tensor:
        a = (layer % self.readahead) * self._slot_bytes
        return self.loader.buffers[self._buffer][a : a + self._slot_bytes]

    def _issue_fn(self, layer: int):
        plan, dst = self.plans[layer], self._slot(layer).data_ptr()

        def issue(ptrs: dict[int, int]) -> None:
            self.engine.copy_batch("h2d", plan.segments(ptrs, dst, positions=sorted(ptrs)), layer)

        return issue

    def _issue(self, layer: int) -> None:
        self._issued.add(layer)
        plan = self.plans[layer]
        if not plan.chunks:
            return
        # The slot's previous reader (layer - R, or the last turn) runs on the compute stream.
        self.engine.wait_for_stream("h2d", self._stream)
        later = self.load.issue_layer(layer, list(plan.positions()), self._issue_fn(layer))
        if later:
            self._deferred[layer] = later

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's history, K and V ``[kv_heads, tokens, head_dim]`` on the model's device."""
        plan = self.plans[i]
        if self.loader.epoch_owner is not self or i not in self._issued:
            # Another load began an epoch since (this turn's events are stale): read through the host.
            k, v = self.load.read_layer(i, start=plan.start, end=plan.end)
            return k.to(self.loader.device), v.to(self.loader.device)
        for j in [j for j in self._deferred if j != i and self.load.layer_ready(j)]:
            self.load.issue_layer(j, self._deferred.pop(j), self._issue_fn(j))
        if i in self._deferred:
            self.load.issue_layer(i, self._deferred.pop(i), self._issue_fn(i), wait=True)
        if plan.chunks:
            self.engine.stream_wait_layer("h2d", i, self._stream)
        k, v = place(plan, self._slot(i), self.geo)
        nxt = i + self.readahead
        if nxt < self._layers and nxt not in self._issued:
            self._issue(nxt)
        return k, v

    def close(self) -> None:
        """Waits for every copy issued, gives the staging buffer back, closes the store's load."""
        if self._closed:
            return
        self._closed = True
        try:
            self.load.close()  # waits for the copies first (before_release), also after store.close()
        finally:
            self._wait_copies()  # a load already ended by the store: its staging slots may still be written
            if self.loader.epoch_owner is self:
                self.loader.epoch_owner = None
            self.loader.release_buffer(self._buffer)

    def _wait_copies(self) -> None:
        self.engine.wait_ticket(self.engine.record("h2d"))


class GpuLoader:
    """One patched model's copy engine, staging buffers and read-buffer handoff."""

    BUFFERS = 2  # the running turn's and the read buffer

    def __init__(self, engine, device: torch.device):
        self.engine, self.device = engine, device
        self.buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8, device=device)] * self.BUFFERS
        self._free = list(range(self.BUFFERS))
        self._lock = threading.Lock()
        self.epoch_owner: GpuLoad | None = None
        self._ahead: tuple[str, torch.Tensor, GpuLoad] | None = None  # conv id, ids, preloaded turn

    @classmethod
    def for_model(cls, state, model) -> GpuLoader | None:
        """The loader of a patched model's current device (None: the host path)."""
        device = next(model.parameters()).device
        cur = getattr(state, "gpu", None)
        if cur is not None and cur.device == device:
            return cur
        host = getattr(state.store, "_host", None)
        engine = engine_for(device, state.kv.spec.num_layers, host.pool if host is not None else None)
        state.gpu = None if engine is None else cls(engine, device)
        return state.gpu

    def acquire_buffer(self, nbytes: int) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError("both GPU staging buffers are in use")
            b = self._free.pop(0)
        if self.buffers[b].numel() < nbytes:
            self.engine.synchronize("h2d")  # no copy may still write the buffer being dropped
            self.buffers[b] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return b

    def release_buffer(self, b: int) -> None:
        with self._lock:
            self._free.append(b)

    def start(self, load, n_tokens: int, sliding, readahead) -> GpuLoad:
        g = GpuLoad(self, load, n_tokens, sliding, readahead)
        self.epoch_owner = g
        return g

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

    def take_preloaded(self, conv_id: str, ids: torch.Tensor, limit: int) -> GpuLoad | None:
        """The preloaded turn if it is this conversation's and a prefix of `ids` within `limit`."""
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
