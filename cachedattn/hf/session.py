"""One conversation's turns through a patched model.

Inside `with cachedattn.session(model, conv_id) as s:` a generate() or a plain
forward given the full conversation (history + new message) reuses the longest
stored prefix of it, computes only the rest, and stores the new KV (prompt and
generated tokens) for the next turn. s.reused_tokens, s.computed_tokens,
s.generated_tokens, s.tier_tokens and s.ttft describe the last turn.
s.continue_turn(ids) feeds more tokens (a known answer, say) through the same
turn's cache and stores their KV too.

A turn's history is opened and its KV stored through the model's transfer
path (hf.paths, chosen at patch: s.path is the one the current turn takes);
what a save needs is handed over as one hf.turn.Turn value.

The cache never costs the caller a turn: a stored chunk found bad while the
history is read reruns the turn from the store's cut (the history is consumed
in the first forward, before anything is sampled or streamed); a save the
store refuses (memory full, disk errors) stores nothing and the answer is
returned; a conversation changed between lookup and load is a shorter prefix
or a miss.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time

import torch

from cachedattn.hf.cache import StoreBackedCache
from cachedattn.hf.masks import first_hidden, generate_pad_eos
from cachedattn.hf.modes import check_generate
from cachedattn.hf.truncation import POLICIES, truncate_turn
from cachedattn.hf.turn import Turn
from cachedattn.store import keys
from cachedattn.transfer import checkpoints, streams

log = logging.getLogger("cachedattn")
_current: contextvars.ContextVar[Session | None] = contextvars.ContextVar("cachedattn_session", default=None)


def current_session():
    return _current.get()


def validate_options(o: dict) -> dict:
    if o["max_context"] is not None and (not isinstance(o["max_context"], int) or o["max_context"] < 2):
        raise ValueError(f"max_context must be an integer >= 2 or None, got {o['max_context']!r}")
    if not 0 < float(o["truncate_ratio"]) <= 1:
        raise ValueError(f"truncate_ratio must be in (0, 1], got {o['truncate_ratio']!r}")
    if not isinstance(o["keep_first"], int) or o["keep_first"] < 0:
        raise ValueError(f"keep_first must be an integer >= 0, got {o['keep_first']!r}")
    if o["position_policy"] not in POLICIES:
        raise ValueError(f"position_policy must be one of {POLICIES}, got {o['position_policy']!r}")
    return o


class Session:
    def __init__(
        self,
        model,
        conv_id: str,
        readahead: int | None = None,
        save: bool = True,
        reserve: int = 0,
        layerwise: bool = True,
        **overrides,
    ):
        model = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps the patched model
        state = getattr(model, "_cachedattn", None)
        if state is None:
            raise ValueError("this model is not patched: call cachedattn.patch(model, store) first")
        self.model = model
        self.conv_id = keys.validate_conversation_id(conv_id)
        self.readahead = state.readahead if readahead is None else readahead
        self.save = save  # False: reuse stored KV but store nothing new (evaluation, benchmarks)
        if not isinstance(reserve, int) or reserve < 0:
            raise ValueError(f"reserve must be an integer >= 0, got {reserve!r}")
        self.reserve = reserve  # tokens a plain forward leaves room for in the window (a continue_turn to come)
        self.layerwise = bool(layerwise)  # False: load all history before computing (a baseline)
        self.patched = state
        unknown = set(overrides) - set(state.options)
        if unknown:
            raise TypeError(f"unknown session options {sorted(unknown)}; known: {sorted(state.options)}")
        self.options = validate_options({**state.options, **{k: v for k, v in overrides.items() if v is not None}})
        self.dropped_tokens = 0  # this turn
        self.total_dropped = 0  # over the session
        self.position_note = ""  # what happened to stored keys at the last overflow
        self.reused_tokens = 0
        self.computed_tokens = 0
        self.generated_tokens = 0
        self.tier_tokens = {"host": 0, "disk": 0}  # where the reused tokens came from
        self.ttft: float | None = None
        self.turns = 0
        self._last: Turn | None = None  # the last plain forward's turn (continue_turn extends it)
        self.path = state.path  # the transfer path (hf.paths) of the current turn, asked again at each turn
        self._cuda = streams.is_async(next(model.parameters()).device)  # a GPU (or a simulated one)
        self.on_first_token = None  # called once per turn when its first token exists (the engine's read buffer)
        self.last_save = None  # Future: the last turn's KV is on disk
        self._t0 = None
        self._token = None
        self._cache: StoreBackedCache | None = None  # the turn's cache while it runs
        self._history = None  # hf.turn.History: the stored prefix the turn reused (None: nothing)
        self._emitted = False  # the turn's first forward finished: nothing may be redone any more
        self._prompt_len = 0  # tokens of the turn's input (after truncation)
        self.weights_current = True  # this turn's weights are those the store's KV was computed with
        self.hidden_from: int | None = None  # first token this turn's attention mask hides (see hf.masks)

    def __enter__(self) -> Session:
        if _current.get() is not None:
            raise RuntimeError("sessions do not nest: one conversation at a time in this context")
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _current.reset(self._token)

    # ---- one turn ---------------------------------------------------------------

    def _begin(
        self, input_ids: torch.Tensor, extra: int = 0, kwargs: dict | None = None, generating: bool = False
    ) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("inside a session, pass input_ids as a [1, tokens] tensor (inputs_embeds is not supported)")
        if input_ids.shape[0] != 1:
            raise ValueError(f"a session serves batch size 1; got a batch of {input_ids.shape[0]}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty")
        # Before any KV is read: KV of other weights is never served, and this turn's is not stored under theirs.
        self.weights_current = self.patched.kv.identity.check(self.model)
        self.path = self.patched.transfer(self.model)
        self._t0 = time.perf_counter()
        self.ttft = None
        self.dropped_tokens = 0
        self._last = None
        if self.options["max_context"] is not None and input_ids.shape[1] + extra > self.options["max_context"]:
            input_ids, self.dropped_tokens, self.position_note = truncate_turn(self, input_ids, extra)
            self.total_dropped += self.dropped_tokens
        # Stored KV was computed with every token visible: reuse (and store) it only before
        # the first token this turn's mask hides. A truncated turn's mask is rebuilt (all ones).
        kwargs = kwargs or {}
        pad_eos = generate_pad_eos(self.model, kwargs) if generating else ()
        mask = None if self.dropped_tokens else kwargs.get("attention_mask")
        self.hidden_from = first_hidden(input_ids, mask, *pad_eos)
        self.turns += 1
        self._prompt_len = input_ids.shape[1]
        return input_ids

    def _open(self, input_ids: torch.Tensor, history: bool) -> tuple[StoreBackedCache, int]:
        # At least one token must go through the model to produce logits.
        limit = input_ids.shape[1] - 1
        if self.hidden_from is not None:
            limit = min(limit, self.hidden_from)
        reuse = history and limit > 0 and self.weights_current
        found = self.path.load_history(self.conv_id, input_ids[0], limit if reuse else 0, self.readahead)
        n = found.n_tokens if found is not None else 0
        try:
            # layerwise=False (load, then compute): on the engine path every layer staged at once
            readahead = self.readahead if self.layerwise else self.patched.kv.spec.num_layers
            gpu = found.stage(readahead) if found is not None else None
            load = found.load if found is not None else None
            cache = StoreBackedCache(self.model.config, load, n, self.patched.kv.sliding, self.layerwise, gpu)
        except BaseException:
            if found is not None:
                found.close()
            raise
        self._history = found
        self.tier_tokens = found.tier_tokens() if found is not None else {"host": 0, "disk": 0}
        self.reused_tokens = n
        self.computed_tokens = input_ids.shape[1] - n
        self.generated_tokens = 0
        return cache, n

    def _run(self, input_ids: torch.Tensor, call):
        """call(cache, n, attempt) with the longest stored prefix restored; returns (its result, cache, n).

        A stored chunk found bad while the history is read (ChunkCorruptError:
        the store has already cut the conversation before it; or any other
        OSError out of the store's reads) reruns the call from the cut;
        a second failure reruns it without any history, which reads nothing
        from the store, so this ends after three attempts at most."""
        for attempt in range(3):
            self._emitted = False
            cache = None
            try:
                cache, n = self._open(input_ids, history=attempt < 2)
                self._cache = cache
                return call(cache, n, attempt), cache, n
            except OSError as e:  # ChunkCorruptError, or the store failing while it handles one
                self._close(cache)
                if self._emitted or attempt == 2:
                    raise  # not from the history (consumed in the first forward): nothing to redo
                if attempt == 0:  # one event per turn, however many reruns it takes
                    self.patched.store.count("recovered_turns")
                    log.warning("cachedattn: %r: %s; the turn is computed again from there", self.conv_id, e)
            except BaseException:
                self._close(cache)
                raise
            finally:
                self._cache = None

    @staticmethod
    def _close(cache: StoreBackedCache | None) -> None:
        if cache is not None:
            cache.close_load()

    def _finish(self, cache: StoreBackedCache, token_ids: torch.Tensor, n: int) -> Turn:
        turn = Turn(self.conv_id, token_ids, n, cache, self.hidden_from, self._history)
        try:
            self.store_turn(self.path, turn)
        finally:
            self._close(cache)
        return turn

    def store_turn(self, path, turn: Turn, start: int | None = None) -> None:
        """Stores the turn's new KV (from `start`) through `path`, if this session saves and its
        weights are those the store's KV was computed with; last_save follows the save."""
        if self.save and self.weights_current:
            saved = path.save(turn, start)
            if saved is not None:
                self.last_save = saved

    def _fit_to_window(self, kwargs) -> dict:
        """After truncation, masks and positions given for the full ids no longer apply (batch 1: rebuilt)."""
        kwargs = dict(kwargs)
        if self.dropped_tokens:
            for name in ("attention_mask", "position_ids"):
                kwargs.pop(name, None)
        return kwargs

    def _new_tokens_bound(self, input_ids, kwargs) -> int:
        """How many tokens this generate() may add (room to leave in the window)."""
        if kwargs.get("max_new_tokens") is not None:
            return int(kwargs["max_new_tokens"])
        gc = kwargs.get("generation_config") or self.model.generation_config
        if kwargs.get("max_length") is not None:
            return max(0, int(kwargs["max_length"]) - input_ids.shape[1])
        if getattr(gc, "max_new_tokens", None) is not None:
            return int(gc.max_new_tokens)
        return max(0, int(getattr(gc, "max_length", 20) or 20) - input_ids.shape[1])

    def _first_forward_done(self) -> None:
        if self._emitted:
            return
        cache = self._cache
        if cache is not None:
            cache.check_unread_history()  # layers the forward never asked for: checked now, before anything is sampled
        self._emitted = True
        if self.ttft is None and self._t0 is not None:
            if self._cuda:  # kernels run asynchronously: the first token exists when they are done
                first_token_ready(cache)
            self.ttft = time.perf_counter() - self._t0
            if self.on_first_token is not None:
                self.on_first_token()

    def run_step(self, forward, args, kwargs):
        """A forward given a cache inside the session: a step of generate(), a continue_turn, or the caller's own cache."""
        cache = kwargs.get("cache")
        cache = kwargs.get("past_key_values") if cache is None else cache
        if isinstance(cache, StoreBackedCache):
            if args:
                kwargs["input_ids"], args = args[0], args[1:]
            if cache is self._cache and not self._emitted:
                kwargs = _skip_history(kwargs, cache.history_tokens, self._prompt_len)
            cache.note_tokens(kwargs.get("input_ids"))
        out = forward(*args, **kwargs)
        self._first_forward_done()
        return out

    def run_forward(self, forward, input_ids, kwargs):
        input_ids = self._begin(input_ids, self.reserve, kwargs)
        kwargs = self._fit_to_window(kwargs)
        kwargs["use_cache"] = True
        position_ids = kwargs.pop("position_ids", None)

        def call(cache, n, attempt):
            if position_ids is not None:
                kwargs["position_ids"] = position_ids[..., n:]
            kwargs[self.patched.kv.cache_kwarg] = cache
            cache.note_tokens(input_ids[:, n:])
            out = forward(input_ids=input_ids[:, n:], **kwargs)
            self._first_forward_done()
            return out

        out, cache, n = self._run(input_ids, call)
        self._last = self._finish(cache, input_ids[0], n)
        return out

    @property
    def turn_ids(self) -> torch.Tensor | None:
        """The token ids of the current turn as the model saw them (after any truncation), or None."""
        return None if self._last is None else self._last.ids

    def continue_turn(self, new_ids: torch.Tensor, **kwargs):
        """Runs more tokens of the current turn (e.g. an answer known in advance)
        through the cache of the last plain forward, and stores their KV too.
        Returns the model's output for them."""
        if self._last is None:
            raise ValueError("continue_turn follows a plain forward of this session (not generate, not another turn)")
        turn = self._last
        cache, ids = turn.cache, turn.ids
        if not isinstance(new_ids, torch.Tensor) or new_ids.dim() != 2 or new_ids.shape[0] != 1:
            raise ValueError("continue_turn takes a [1, tokens] tensor of new token ids")
        total = ids.shape[0] + new_ids.shape[1]
        limit = self.options["max_context"]
        if limit is not None and total > limit:
            raise ValueError(
                f"continuing this turn to {total} tokens would exceed max_context={limit}; "
                "open the session with reserve= the tokens to come, so the prompt is truncated to leave room"
            )
        kwargs[self.patched.kv.cache_kwarg] = cache
        kwargs["use_cache"] = True
        out = self.model(input_ids=new_ids.to(ids.device), **kwargs)
        ids = torch.cat([ids, new_ids[0].to(ids.device)])
        self.generated_tokens += new_ids.shape[1]
        hidden = first_hidden(ids[None], kwargs.get("attention_mask"))
        if hidden is not None:
            self.hidden_from = hidden if self.hidden_from is None else min(self.hidden_from, hidden)
        self._last = dataclasses.replace(turn, ids=ids, hidden_from=self.hidden_from)
        self.store_turn(self.path, self._last, start=ids.shape[0] - new_ids.shape[1])
        return out

    def run_generate(self, generate, input_ids, kwargs):
        check_generate(self.model, kwargs)  # before any work: a mode the session cannot serve is refused by name
        input_ids = self._begin(input_ids, self._new_tokens_bound(input_ids, kwargs), kwargs, generating=True)
        kwargs = self._fit_to_window(kwargs)
        kwargs["use_cache"] = True
        if kwargs.get("streamer") is not None:
            kwargs["streamer"] = _StreamGate(kwargs["streamer"])
        rng = _rng_state()

        def call(cache, n, attempt):
            if attempt:  # a rerun draws and streams exactly what a first run would have
                _set_rng_state(rng)
                if kwargs.get("streamer") is not None:
                    kwargs["streamer"].rerun()
            kwargs[self.patched.kv.cache_kwarg] = cache
            return generate(input_ids, **kwargs)

        out, cache, n = self._run(input_ids, call)
        seqs = getattr(out, "sequences", out)
        self.generated_tokens = seqs.shape[1] - input_ids.shape[1]
        # The KV saved is that of sequence 0 as far as a cache row provably holds it (see saving.provable_row).
        self._finish(cache, seqs[0], n)
        return out


def first_token_ready(cache) -> None:
    """Waits for the turn's own streams (those current on the devices its cache lives on), not the
    whole device: other jobs' saves and preloads queued on the copy engine are not this turn's."""
    kv = [layer.keys for layer in getattr(cache, "layers", ()) if getattr(layer, "keys", None) is not None]
    for device in {streams.device_of(k) for k in kv} or {torch.device("cuda", torch.cuda.current_device())}:
        if streams.is_async(device):
            streams.synchronize(device)
    checkpoints.host_reads("the host takes the time of the first token", *kv)  # its KV's compute must be done


def _skip_history(kwargs: dict, n: int, prompt_len: int) -> dict:
    """The first forward of a turn given the whole sequence (assisted decoding's first
    verification step passes it unsliced even when the cache holds a prefix) computes
    only the tokens after the restored history, as generate's own prefill does."""
    ids = kwargs.get("input_ids")
    if not n or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < prompt_len:
        return kwargs
    kwargs = dict(kwargs)
    new = ids.shape[1] - n
    kwargs["input_ids"] = ids[:, n:]
    for name in ("position_ids", "token_type_ids"):
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor) and t.shape[-1] == ids.shape[1]:
            kwargs[name] = t[..., -new:]
    return kwargs


class _StreamGate:
    """The caller's streamer, seen once: a rerun of the turn repeats what the failed
    attempt already delivered (the prompt), and that part is not delivered twice."""

    def __init__(self, streamer):
        self._streamer = streamer
        self._delivered = 0
        self._skip = 0

    def rerun(self) -> None:
        self._skip, self._delivered = self._delivered, 0

    def put(self, value) -> None:
        if self._skip:
            self._skip -= 1
            self._delivered += 1
            return
        self._delivered += 1
        self._streamer.put(value)

    def end(self) -> None:
        self._streamer.end()


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
