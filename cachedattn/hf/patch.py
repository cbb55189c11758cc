"""patch(model, store) / unpatch(model): route a HuggingFace causal LM's
forward and generate through sessions, leaving it untouched outside them."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import torch

from cachedattn.hf.async_saving import AsyncSaver
from cachedattn.hf.paths import TransferPath, choose_path
from cachedattn.hf.positions import PositionScheme, probe_positions
from cachedattn.hf.probe import ModelKV, probe
from cachedattn.hf.session import Session, current_session, validate_options
from cachedattn.store import AttentionStore, keys
from cachedattn.transfer import streams
from cachedattn.transfer.gpu_load import GpuLoader, layer_parameters


@dataclass
class PatchState:
    """What patch() binds to a model: its store, KV layout, position scheme, options and transfer path."""

    store: AttentionStore
    kv: ModelKV
    positions: PositionScheme
    readahead: int | None
    options: dict
    path: TransferPath  # chosen at patch (hf.paths); again only when the model's layers moved to other devices
    warned: set[str] = field(default_factory=set)  # kinds of trouble already warned about (once per model)
    _choosing: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # The parameter of each layer that says where it lives, as of weights-identity generation _layer_gen.
    _layer_params: list | None = field(default=None, repr=False, compare=False)
    _layer_gen: int = field(default=-1, repr=False, compare=False)

    def transfer(self, model) -> TransferPath:
        """The path a turn of `model` takes now: the one chosen at patch, unless the model's layers
        have moved to other devices since; then the old path is closed (its read buffer's lease
        dropped, its saves finished, its idle staging freed) and one is chosen for the new devices.

        A turn calls kv.identity.check(model) first: the parameter that says where each layer lives
        is looked up again (a walk over every module) only when that check saw a tensor replaced,
        moved or written; otherwise a turn reads the devices of the parameters it found last."""
        gen = self.kv.identity.generation
        if self._layer_params is None or gen != self._layer_gen:
            self._layer_params, self._layer_gen = layer_parameters(model, self.kv.spec.num_layers), gen
        devices = [(streams.device_of(p), p.device) for p in self._layer_params]
        with self._choosing:  # one thread closes the old path and chooses the new one
            if self.path.devices != devices:
                try:
                    self.path.close()
                finally:  # (choosing failed: the closed path stays, and the next turn chooses again)
                    self.path = choose_path(model, self.store, self.kv, self.warned)
            return self.path

    @property
    def gpu(self) -> GpuLoader | None:
        """The copy-engine path's loader (None on the host path)."""
        return self.path.loader

    @property
    def saver(self) -> AsyncSaver | None:
        """The copy-engine path's background saves (None on the host path: saves finish in the turn)."""
        return self.path.saver


def patch(
    model,
    store,
    readahead: int | None = None,
    max_context: int | None = None,
    truncate_ratio: float = 0.5,
    keep_first: int = 0,
    position_policy: str = "reapply",
):
    """Binds `store` to `model` (in place; returns the model).

    Probes the model's KV layout (refusing models a per-token store cannot
    serve, with the reason) and how positions enter its keys, and attaches the
    store to it. ``readahead``: how many layers ahead of the one computing the
    store reads (None: all from disk; on the GPU path the copy engine stages
    transfer.gpu_load.STAGED_LAYERS layers at a time, ring-reused, so staging
    memory stays bounded: pass the layer count to stage every layer at once).
    ``max_context`` (default: the model's max_position_embeddings),
    ``truncate_ratio``, ``keep_first`` and ``position_policy`` govern
    context-window overflow (see cachedattn.hf.truncation); each can be
    overridden per session.
    """
    state = getattr(model, "_cachedattn", None)
    if state is not None:
        if state.store is store:
            return model
        raise ValueError("this model is already patched with another store: unpatch(model) first")
    cfg = model.config.get_text_config(decoder=True)
    if max_context is None:
        max_context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        # Configs say "no known limit" with a non-positive value (xlnet: -1): the caller's own
        # max_context is still validated strictly.
        if isinstance(max_context, int) and max_context <= 0:
            max_context = None
    options = validate_options(
        dict(max_context=max_context, truncate_ratio=truncate_ratio, keep_first=keep_first, position_policy=position_policy)
    )
    kv = probe(model)
    positions = probe_positions(model, kv.cache_kwarg, kv.spec.num_layers)
    store.attach(kv.spec)
    warned: set[str] = set()
    path = choose_path(model, store, kv, warned)
    model._cachedattn = PatchState(store, kv, positions, readahead, options, path, warned)
    forward, generate = model.forward, model.generate

    @functools.wraps(forward)
    def patched_forward(*args, **kwargs):
        s = current_session()
        if s is None or s.model is not model:
            return forward(*args, **kwargs)
        return in_session(s, args, kwargs)

    # A compiled model (model.compile(), torch.compile(model)) runs its turns inside a
    # session eagerly: the store is read from inside the attention layers' cache
    # updates, which dynamo must not trace, and a turn's cache length changes every
    # turn (a recompile per turn). Outside sessions the model stays compiled.
    @torch._dynamo.disable
    def in_session(s, args, kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return s.run_step(forward, args, kwargs)  # a step of generate(), or the caller's own cache
        input_ids = kwargs.pop("input_ids", None)
        if args:
            if input_ids is not None:
                raise TypeError("input_ids given twice")
            input_ids, args = args[0], args[1:]
        if args:
            raise TypeError("inside a session, pass everything but input_ids by keyword")
        return s.run_forward(forward, input_ids, kwargs)

    @functools.wraps(generate)
    def patched_generate(input_ids=None, **kwargs):
        s = current_session()
        if s is None or s.model is not model:
            return generate(input_ids, **kwargs)
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("inside a session the store provides the cache: do not pass one")
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)  # generate's other name for it
        return s.run_generate(generate, input_ids, kwargs)

    model.forward = patched_forward
    model.generate = patched_generate
    return model


def unpatch(model):
    """Restores the model's own forward and generate."""
    state = getattr(model, "_cachedattn", None)
    if state is None:
        return model
    # A read buffer filled for this model's next turn holds a load open; saves in flight finish
    # before the model lets go of its store.
    state.path.close()
    del model.forward
    del model.generate
    del model._cachedattn
    return model


def session(
    model,
    conv_id: str,
    readahead: int | None = None,
    save: bool = True,
    reserve: int = 0,
    layerwise: bool = True,
    **overrides,
) -> Session:
    """A context manager for one conversation's turns through a patched model.

    ``readahead`` overrides the patch's read-ahead depth (layers); ``save=False``
    reuses stored KV without storing the turn's new KV (an overflow still
    rewrites the stored kept window at its new positions); ``reserve``: tokens a
    plain forward leaves room for in the context window, for a continue_turn()
    to come; ``layerwise=False`` loads all history before computing (the
    no-pre-loading baseline); ``max_context``,
    ``truncate_ratio``, ``keep_first`` and ``position_policy`` override the
    patch's overflow options for this conversation.
    """
    return Session(model, conv_id, readahead, save, reserve, layerwise, **overrides)


def preload(model, conv_id: str, input_ids) -> bool:
    """Read buffer on the GPU: issues the stored history of `conv_id` that prefixes `input_ids`
    (its first read-ahead layers) into the model's second staging buffer, for that
    conversation's next session to take over. False when the model has no copy engine
    (then nothing happens) or nothing is stored."""
    state = getattr(model, "_cachedattn", None)
    if state is None:
        raise ValueError("this model is not patched: call cachedattn.patch(model, store) first")
    conv_id = keys.validate_conversation_id(conv_id)
    state.kv.identity.check(model)  # (a layer moved since the last turn: transfer() sees it)
    return state.transfer(model).preload(conv_id, input_ids, state.readahead)
