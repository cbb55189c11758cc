"""patch(model, store) / unpatch(model): route a HuggingFace causal LM's
forward and generate through sessions, leaving it untouched outside them."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from cachedattn.hf.positions import PositionScheme, probe_positions
from cachedattn.hf.probe import ModelKV, probe
from cachedattn.hf.session import Session, current_session, validate_options


@dataclass
class PatchState:
    store: object
    kv: ModelKV
    positions: PositionScheme
    readahead: int | None
    options: dict
    warned: set = field(default_factory=set)  # kinds of trouble already warned about (once per model)
    gpu: object = None  # transfer.gpu_load.GpuLoader of the model's device, made at its first turn
    saver: object = None  # hf.async_saving.AsyncSaver: saves in flight through the copy engine
    save_engine: object = None  # a copy engine for saves when the model has no GPU loader (tests: the fake)


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
    model._cachedattn = PatchState(store, kv, positions, readahead, options)
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
    if state.gpu is not None:
        state.gpu.drop_preloaded()  # a read buffer filled for this model's next turn holds a load open
    if state.saver is not None:  # saves in flight finish before the model lets go of its store
        state.saver.drain()
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
    from cachedattn.store import keys
    from cachedattn.transfer.gpu_load import GpuLoader

    loader = GpuLoader.for_model(state, model)
    if loader is None:
        return False
    conv_id = keys.validate_conversation_id(conv_id)
    if state.saver is not None:  # its last turn may still be saving: preload what that turn commits
        state.saver.wait(conv_id)
    return loader.preload(state.store, conv_id, input_ids, state.kv.sliding, state.readahead)
