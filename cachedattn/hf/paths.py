"""How a patched model's KV moves between the store and its layers: one
transfer path, chosen at patch.

- HostPath: no copy engine (a model on the CPU; a GPU whose store's host pool
  is not page-locked, or a build without CUDA). A turn's history is read from
  the store's host blocks as each layer asks for it (KVLoad.read_layer), and
  its new KV is stored through one append on the turn's thread.
- EnginePath: a copy engine per device the model's layers live on
  (transfer.gpu_load.GpuLoader; on the CPU the deferred fake engine when
  CACHEDATTN_FAKE_COPY_ENGINE=1, see transfer.factory). A turn's history is
  staged layer by layer `readahead` layers ahead, a read buffer holds the next
  job's first layers, and new KV is copied on the engine's D2H stream and
  committed in the background (hf.async_saving.AsyncSaver).

Both offer the same calls: load_history() opens a turn's stored prefix as a
hf.turn.History, save() stores a hf.turn.Turn, wait_saved(), preload(),
trim() and close(). Session, BatchSession and the serving engine reach the
path through PatchState.transfer(model), so a turn's history and its save go
the same way, and nothing decides per save which way that is.

The model moved after patch (model.to(...), a new device_map): at the next
turn PatchState.transfer sees that its layers' devices differ from those the
path was chosen for, closes the path (the read buffer's load is dropped, so
its lease on a conversation ends; saves in flight finish; idle staging is
freed) and chooses again for the new devices.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

from cachedattn.hf.async_saving import AsyncSaver, save_async
from cachedattn.hf.saving import save_on_host, saved_range, skipped
from cachedattn.hf.turn import History, Turn
from cachedattn.transfer import streams
from cachedattn.transfer.gpu_load import GpuLoader, layer_devices

log = logging.getLogger("cachedattn")


def open_prefix(store, conv_id: str, ids, limit: int, readahead: int | None):
    """An open load of the longest stored prefix of ids (1-D; at most `limit` tokens), or None.

    Lookup and load are one step when the store offers it (load_prefix);
    otherwise a conversation cut, dropped or rewritten in between surfaces
    from load as a KeyError, ValueError or TypeError: look up once more,
    then treat it as a miss (the turn computes everything)."""
    load_prefix = getattr(store, "load_prefix", None)
    load = None
    for _ in range(2):
        try:
            if load_prefix is not None:
                load = load_prefix(conv_id, ids, limit=limit, readahead=readahead)
            else:
                n = min(store.lookup(conv_id, ids), limit)
                load = store.load(conv_id, n, readahead=readahead) if n > 0 else None
            break
        except (KeyError, ValueError, TypeError) as e:
            log.debug("cachedattn: %r changed between lookup and load (%s); looking up again", conv_id, e)
    if load is not None and load.n_tokens == 0:
        load.close()
        load = None
    return load


class HostPath:
    """History from the store's host blocks, saves through the store's append on the turn's thread."""

    loader = None  # no copy engine
    saver = None  # saves finish on the turn's thread

    def __init__(self, store, kv, warned: set, devices):
        self.store, self.kv, self.warned = store, kv, warned
        self.devices = list(devices)  # (logical, physical) per layer, as chosen (see PatchState.transfer)

    def load_history(self, conv_id: str, ids, limit: int, readahead: int | None, take_preload: str = "any"):
        """The longest stored prefix of ids (1-D) within `limit` tokens, opened, or None
        (`take_preload`: as EnginePath's; this path has no read buffer)."""
        if limit <= 0:
            return None
        load = open_prefix(self.store, conv_id, ids, limit, readahead)
        return None if load is None else History(load)

    def save(self, turn: Turn, start: int | None = None) -> Future | None:
        """Stores the turn's new KV from `start` (default: after its history); returns the commit's
        future (done once on disk), or None when nothing was stored (nothing new, or refused: counted)."""
        span = saved_range(turn, start)
        if span is None:
            return None
        try:
            return save_on_host(self.store, self.kv.spec.num_layers, turn, *span)
        except Exception as e:
            skipped(self.store, self.warned, turn.conv_id, e)
            return None

    def wait_saved(self, conv_id: str) -> None:
        """Saves on this path are committed before the turn returns: nothing is in flight."""

    def preload(self, conv_id: str, ids, readahead: int | None) -> bool:
        """No read buffer without a copy engine."""
        return False

    def preloaded_conversation(self) -> str | None:
        return None

    def cuda_engine(self):
        """(native copy engine, its CUDA device) for work done on the card, or (None, None)."""
        return None, None

    def trim(self) -> None:
        """No staging to free."""

    def close(self) -> None:
        """Nothing held between turns."""


class EnginePath:
    """History staged by the copy engines, saves copied on their D2H streams and committed in the background."""


    def __init__(self, store, kv, warned: set, loader: GpuLoader):
        self.store, self.kv, self.warned = store, kv, warned
        self.loader = loader
        self.saver = AsyncSaver()  # one worker: the model's saves complete in issue order

    @property
    def devices(self):
        return self.loader.devices

    def _stage(self, load, readahead):
        return self.loader.start(load, load.n_tokens, self.kv.sliding, readahead)

    def load_history(self, conv_id: str, ids, limit: int, readahead: int | None, take_preload: str = "any"):
        """The longest stored prefix of ids (1-D) within `limit` tokens, opened, or None.

        The read buffer serves it when it holds this conversation's history and that is a prefix of
        ids within `limit`. ``take_preload="any"`` (a session: the buffer is for the turn running
        now) drops a buffer filled for another conversation or not usable; ``"own"`` (a batch row)
        leaves the buffer to the row it was filled for."""
        if limit <= 0:
            if take_preload == "any":
                self.loader.drop_preloaded()
            return None
        if take_preload == "any" or self.loader.preloaded_conversation() == conv_id:
            g = self.loader.take_preloaded(conv_id, ids, limit)
            if g is not None:
                return History(g.load, staged=g)
        self.saver.wait(conv_id)  # this conversation's last turn may still be saving
        load = open_prefix(self.store, conv_id, ids, limit, readahead)
        return None if load is None else History(load, start=self._stage)

    def save(self, turn: Turn, start: int | None = None) -> Future | None:
        """Issues the copies of the turn's new KV from `start` (default: after its history) and returns
        the future of its commit (done once on disk), or None when nothing is stored (nothing new, or
        refused: counted)."""
        span = saved_range(turn, start)
        if span is None:
            return None

        def failed(e: Exception) -> None:
            skipped(self.store, self.warned, turn.conv_id, e)

        try:
            return save_async(turn, *span, self.store, self.loader, self.saver, failed)
        except Exception as e:
            failed(e)
            return None

    def wait_saved(self, conv_id: str) -> None:
        """Returns once the conversation's save in flight (if any) is committed or given up."""
        self.saver.wait(conv_id)

    def preload(self, conv_id: str, ids, readahead: int | None) -> bool:
        """Issues the stored history of conv_id that prefixes ids into the read buffer (after the
        conversation's save in flight commits); True if something was issued."""
        self.saver.wait(conv_id)
        return self.loader.preload(self.store, conv_id, ids, self.kv.sliding, readahead)

    def preloaded_conversation(self) -> str | None:
        return self.loader.preloaded_conversation()

    def cuda_engine(self):
        """(copy engine, its device) for work done on the card (or a simulated one: streams.is_async), or
        (None, None)."""
        device = self.loader.device
        return (self.loader.engine, device) if streams.is_async(device) else (None, None)

    def trim(self) -> None:
        """Frees the staging buffers no load holds."""
        self.loader.trim()

    def close(self) -> None:
        """Drops the read buffer (its load's lease), finishes the saves in flight, frees idle staging."""
        try:
            self.loader.close()
        finally:
            self.saver.drain()


TransferPath = HostPath | EnginePath


def choose_path(model, store, kv, warned: set) -> TransferPath:
    """The copy-engine path when every device the model's layers live on has a copy engine
    (transfer.factory.engine_for), else the host path."""
    devices = layer_devices(model, kv.spec.num_layers)
    loader = GpuLoader.create(devices, kv.spec.num_layers, getattr(store, "gpu_pinned", None))
    return HostPath(store, kv, warned, devices) if loader is None else EnginePath(store, kv, warned, loader)
