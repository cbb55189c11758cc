"""The GPU load path: a turn's stored history copied host -> GPU by the copy
engine, layer by layer, `readahead` layers ahead of the layer computing.

GpuLoader (one per patched model on a GPU) holds, per device the model's
layers live on (a model split with device_map has several), a copy engine and
two staging buffers (transfer.staging): the running turn's and the read buffer
(the next job's first layers, issued while the running job decodes). GpuLoad
is one turn's use of one buffer per device, with its own epoch of layer events
in each engine (a preload never invalidates the running turn's events); each
layer is loaded, fenced and waited for on its own device's engine and streams.
At its start it fences each buffer's previous readers and issues layers
0..R-1 from the pool's pinned blocks (one copy per chunk and layer, see segments); chunks still on disk are
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
- GpuLoad._fence_refill: wait_for_stream("h2d", stream), before layer j
  overwrites a slot, after the stream that last read that slot;
- GpuLoad._compute_waits_for: stream_wait_layer("h2d", i, stream, epoch), the
  consumer's wait; it also orders a preloaded (taken over) load, whose layer
  events live in its own epoch, against the stream that finally consumes it;
- GpuLoad._wait_copies: wait_layer("h2d", last, epoch) per device, before the
  load's host blocks are released.

Staging memory is bounded: each buffer holds `readahead` layer slots (default
STAGED_LAYERS, ring-reused), grows with slack, and shrinks when a turn needs
far less than it holds; trim() frees idle buffers.
"""

from __future__ import annotations

import logging

import torch

from cachedattn.transfer import streams
from cachedattn.transfer.factory import engine_for
from cachedattn.transfer.segments import place, plan_layer
from cachedattn.transfer.staging import DeviceStaging

log = logging.getLogger("cachedattn")

#: Layer slots a staging buffer holds when the caller asks for no read-ahead depth.
STAGED_LAYERS = 4


def staged_layers(readahead: int | None, num_layers: int) -> int:
    """Slots a load uses: `readahead` (at least 1), or STAGED_LAYERS when None, never above the layer count."""
    r = STAGED_LAYERS if readahead is None else int(readahead)
    return max(1, min(r, num_layers))


class _Part:
    """A load's share of one device: its buffer there, its epoch in that device's engine, the layer
    it issued last there and the streams that read its slots."""

    def __init__(self, staging: DeviceStaging, nbytes: int):
        self.staging, self.engine, self.nbytes = staging, staging.engine, nbytes
        self.buffer: int | None = staging.acquire(nbytes)
        self.epoch: int | None = None
        self.last: int | None = None
        self.readers: set[int] = set()


class GpuLoad:
    def __init__(self, loader: GpuLoader, load, n_tokens: int, sliding, readahead: int | None):
        self.loader, self.load = loader, load
        self.geo = load.geo
        self.n = n_tokens
        L = self.geo.spec.num_layers
        self._layers = L
        self.plans = [plan_layer(self.geo, i, n_tokens, sliding[i]) for i in range(L)]
        self.readahead = staged_layers(readahead, L)
        self._slot_bytes = max(p.nbytes for p in self.plans)
        self._device = list(loader.layer_devices)  # layer -> logical device
        self._deferred: dict[int, list[int]] = {}  # layer -> chunk positions still waiting for the disk
        self._issued: set[int] = set()
        self._slot_reader: dict[tuple, int] = {}  # (device, slot) -> the stream that last read it
        self._closed = False
        self._parts: dict[torch.device, _Part] = {}
        load.before_release = self._wait_copies
        try:
            for dev in dict.fromkeys(self._device):
                part = self._parts[dev] = _Part(loader.staging(dev), self.readahead * self._slot_bytes)
                part.epoch = part.engine.begin_epoch()
                self._fence_previous_readers(part)
            for i in range(self.readahead):
                self._issue(i)
        except BaseException:
            self.close()
            raise

    @property
    def engine(self):
        """The copy engine of the model's first device (the one a single-device model has)."""
        return self._parts[self._device[0]].engine

    # ---- ordering calls (one call site each; see the module doc) -------------------

    def _fence_previous_readers(self, part: _Part) -> None:
        for s in part.staging.readers(part.buffer):
            part.engine.wait_for_stream("h2d", s)

    def _fence_refill(self, part: _Part, stream: int) -> None:
        part.engine.wait_for_stream("h2d", stream)

    def _compute_waits_for(self, part: _Part, i: int, stream: int) -> None:
        part.engine.stream_wait_layer("h2d", i, stream, part.epoch)

    def _wait_copies(self) -> None:
        for part in self._parts.values():
            if part.last is not None and part.epoch is not None:
                part.engine.wait_layer("h2d", part.last, part.epoch)

    # ---- issuing ----------------------------------------------------------------------

    def _part(self, layer: int) -> _Part:
        return self._parts[self._device[layer]]

    def _slot(self, layer: int) -> torch.Tensor:
        part = self._part(layer)
        a = (layer % self.readahead) * self._slot_bytes
        return part.staging.buffers[part.buffer][a : a + self._slot_bytes]

    def _issue_fn(self, layer: int):
        plan, dst, part = self.plans[layer], self._slot(layer).data_ptr(), self._part(layer)

        def issue(ptrs: dict[int, int]) -> None:
            part.engine.copy_batch("h2d", plan.segments(ptrs, dst, positions=sorted(ptrs)), layer, part.epoch)
            part.last = layer

        return issue

    def _issue(self, layer: int) -> None:
        self._issued.add(layer)
        plan = self.plans[layer]
        if not plan.chunks:
            return
        reader = self._slot_reader.pop((self._device[layer], layer % self.readahead), None)
        if reader is not None:  # the copy out of this slot's last layer is queued on `reader`
            self._fence_refill(self._part(layer), reader)
        later = self.load.issue_layer(layer, list(plan.positions()), self._issue_fn(layer))
        if later:
            self._deferred[layer] = later

    def layer(self, i: int, k_out=None, v_out=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's history, K and V ``[kv_heads, tokens, head_dim]``, written into k_out / v_out
        (e.g. the front of the cache layer's own tensors) or new tensors on `device`, by the stream
        current now on that device."""
        plan = self.plans[i]
        part = self._part(i)
        device = k_out.device if k_out is not None else device if device is not None else part.staging.device
        stream = streams.current(streams.device_of(k_out) if k_out is not None else device)  # asked at each use
        if i not in self._issued:  # asked out of order (a model skipping a layer): its slot may be busy
            k, v = self.load.read_layer(i, start=plan.start, end=plan.end)
            return _into(k, k_out, device), _into(v, v_out, device)
        for j in [j for j in self._deferred if j != i and self.load.layer_ready(j)]:
            self.load.issue_layer(j, self._deferred.pop(j), self._issue_fn(j))
        if i in self._deferred:
            self.load.issue_layer(i, self._deferred.pop(i), self._issue_fn(i), wait=True)
        if plan.chunks:
            self._compute_waits_for(part, i, stream)
            part.readers.add(stream)
            self._slot_reader[(self._device[i], i % self.readahead)] = stream
        k, v = place(plan, self._slot(i), self.geo, k_out, v_out)
        nxt = i + self.readahead
        if nxt < self._layers and nxt not in self._issued:
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
        """Waits for this load's copies, gives the staging buffers back, closes the store's load."""
        if self._closed:
            return
        self._closed = True
        try:
            self.load.close()  # waits for the copies first (before_release), also after store.close()
        finally:
            self.release_staging()  # a load already ended by the store: its staging slots may still be written

    def release_staging(self) -> None:
        """Waits for this load's copies and gives its staging buffers back, leaving the store's load
        open (a batch keeps every row's conversation in use until its rows are saved)."""
        try:
            self._wait_copies()
        finally:
            parts, self._parts = self._parts, {}
            for part in parts.values():
                if part.epoch is not None:
                    part.engine.end_epoch(part.epoch)
                part.staging.release(part.buffer, part.nbytes, part.readers)


def _into(t: torch.Tensor, out, device) -> torch.Tensor:
    if out is None:
        return t.to(device)
    out.copy_(t)
    return out


def layer_parameters(model, num_layers: int) -> list[torch.Tensor]:
    """A parameter of each layer, which says where the layer lives (a model split with device_map): one of
    the module the layer's attention is (HF attention modules carry ``layer_idx``), else the model's first."""
    out = [next(model.parameters())] * num_layers
    for module in model.modules():
        i = getattr(module, "layer_idx", None)
        if isinstance(i, int) and 0 <= i < num_layers:
            p = next(module.parameters(recurse=True), None)
            if p is not None:
                out[i] = p
    return out


def layer_devices(model, num_layers: int) -> list[tuple[torch.device, torch.device]]:
    """(logical, physical) device of each layer (see layer_parameters)."""
    return [(streams.device_of(p), p.device) for p in layer_parameters(model, num_layers)]


class GpuLoader:
    """One patched model's copy engines and staging (one per device its layers live on) and the
    read-buffer handoff."""

    def __init__(self, devices, engines: dict):
        self.devices = list(devices)  # layer -> (logical, physical)
        self.layer_devices = [d for d, _ in self.devices]
        self._staging = {d: DeviceStaging(engines[d], p, d) for d, p in dict(self.devices).items()}
        self._ahead: tuple[str, torch.Tensor, GpuLoad] | None = None  # conv id, ids, preloaded turn

    @classmethod
    def create(cls, devices, num_layers: int, pinned: bool | None = None) -> GpuLoader | None:
        """A loader for layers on `devices` (see layer_devices), or None when one of those devices has
        no copy engine (transfer.factory: then the model takes the host path). ``pinned``: whether the
        store's host pool is page-locked (the native engine needs it)."""
        engines = {}
        for logical, physical in dict(devices).items():
            engine = engine_for(physical, num_layers, pinned)
            if engine is None:
                return None
            engines[logical] = engine
        return cls(devices, engines)

    def close(self) -> None:
        """Lets go of what the loader holds between turns: the read buffer's load (its lease on the
        conversation) and the idle staging buffers (the model moved to other devices, or was unpatched)."""
        self.drop_preloaded()
        self.trim()

    @property
    def device(self) -> torch.device:
        """The physical device of the model's first layer."""
        return self.devices[0][1]

    @property
    def engine(self):
        """The copy engine of the model's first layer's device."""
        return self._staging[self.layer_devices[0]].engine

    @engine.setter
    def engine(self, engine) -> None:  # a stand-in for the loads started from now on (the TTFT bench's probe)
        self._staging[self.layer_devices[0]].engine = engine

    def engine_of(self, device):
        """The copy engine of a logical device the model's layers live on (None: not one of them)."""
        staging = self._staging.get(device)
        return None if staging is None else staging.engine

    def staging(self, device) -> DeviceStaging:
        return self._staging[device]

    def trim(self) -> None:
        """Frees the staging buffers no load holds (the engine calls it when its queue is empty)."""
        for staging in self._staging.values():
            staging.trim()

    def staged_bytes(self) -> int:
        return sum(s.staged_bytes() for s in self._staging.values())

    def start(self, load, n_tokens: int, sliding, readahead) -> GpuLoad:
        return GpuLoad(self, load, n_tokens, sliding, readahead)

    # ---- the read buffer ----------------------------------------------------------

    def preload(self, store, conv_id: str, ids: torch.Tensor, sliding, readahead) -> bool:
        """Issues the next job's first layers into the free buffers; True if something was issued."""
        self.drop_preloaded()
        if not all(s.has_free() for s in self._staging.values()) or ids.shape[-1] < 2:
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
