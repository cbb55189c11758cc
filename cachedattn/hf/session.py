"""One conversation's turns through a patched model.

Inside `with cachedattn.session(model, conv_id) as s:` a generate() or a plain
forward given the full conversation (history + new message) reuses the longest
stored prefix of it, computes only the rest, and stores the new KV (prompt and
generated tokens) for the next turn. s.reused_tokens, s.computed_tokens,
s.generated_tokens, s.tier_tokens and s.ttft describe the last turn.
s.continue_turn(ids) feeds more tokens (a known answer, say) through the same
turn's cache and stores their KV too.
"""

from __future__ import annotations

import contextvars
import logging
import time

import torch

from cachedattn.hf.cache import StoreBackedCache
from cachedattn.hf.masks import first_hidden, generate_pad_eos
from cachedattn.hf.truncation import POLICIES, truncate_turn
from cachedattn.store import keys

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
        self._state = state
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
        self._last: tuple[StoreBackedCache, torch.Tensor, int] | None = None  # cache, kept ids, history
        self._hidden_from: int | None = None  # first token this turn's attention mask hides (see hf.masks)
        self._cuda = next(model.parameters()).is_cuda
        self.on_first_token = None  # called once per turn when its first token exists (the engine's read buffer)
        self.last_save = None  # Future: the last turn's KV is on disk
        self._t0 = None
        self._token = None

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
    ) -> tuple[StoreBackedCache, int, torch.Tensor]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("inside a session, pass input_ids as a [1, tokens] tensor (inputs_embeds is not supported)")
        if input_ids.shape[0] != 1:
            raise ValueError(f"a session serves batch size 1; got a batch of {input_ids.shape[0]}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty")
        st = self._state
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
        self._hidden_from = first_hidden(input_ids, mask, *pad_eos)
        # At least one token must go through the model to produce logits.
        n = min(st.store.lookup(self.conv_id, input_ids[0]), input_ids.shape[1] - 1)
        if self._hidden_from is not None:
            n = min(n, self._hidden_from)
        load = st.store.load(self.conv_id, n, readahead=self.readahead) if n > 0 else None
        cache = StoreBackedCache(self.model.config, load, n, st.kv.sliding, layerwise=self.layerwise)
        self.tier_tokens = load.tier_tokens() if load is not None else {"host": 0, "disk": 0}
        self.reused_tokens = n
        self.computed_tokens = input_ids.shape[1] - n
        self.generated_tokens = 0
        self.turns += 1
        return cache, n, input_ids

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
        if self.ttft is None and self._t0 is not None:
            if self._cuda:  # kernels run asynchronously: the first token exists when they are done
                torch.cuda.synchronize()
            self.ttft = time.perf_counter() - self._t0
            if self.on_first_token is not None:
                self.on_first_token()

    def _end(self, cache: StoreBackedCache, token_ids: torch.Tensor, n: int, ok: bool) -> None:
        load = cache._load
        try:
            if ok and self.save:
                self._save(cache, token_ids, n)
        finally:
            if load is not None:
                load.close()

    def _save(self, cache: StoreBackedCache, token_ids: torch.Tensor, n: int, start: int | None = None) -> None:
        """Stores the KV of tokens [start, n + new) (start defaults to n)."""
        start = n if start is None else start
        m = n + cache.new_tokens()
        if self._hidden_from is not None:
            m = min(m, self._hidden_from)
        if m <= start:
            return
        st = self._state
        try:
            txn = st.store.begin_append(self.conv_id, token_ids[:m], start=start)
        except ValueError as e:  # another writer changed this conversation meanwhile
            log.warning("cachedattn: not saving turn of %r: %s", self.conv_id, e)
            return
        with txn:
            for layer in range(st.kv.spec.num_layers):
                k, v = cache.layer_new_kv(layer, skip=start - n)
                txn.put_layer(layer, k[:, : m - start].detach(), v[:, : m - start].detach())
            self.last_save = txn.commit()

    def run_forward(self, forward, input_ids, kwargs):
        cache, n, input_ids = self._begin(input_ids, self.reserve, kwargs)
        kwargs = self._fit_to_window(kwargs)
        kwargs[self._state.kv.cache_kwarg] = cache
        kwargs["use_cache"] = True
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., n:]
        ok = False
        try:
            out = forward(input_ids=input_ids[:, n:], **kwargs)
            self._first_forward_done()
            ok = True
        finally:
            self._end(cache, input_ids[0], n, ok)
        if ok:
            self._last = (cache, input_ids[0], n)
        return out

    @property
    def turn_ids(self) -> torch.Tensor | None:
        """The token ids of the current turn as the model saw them (after any truncation), or None."""
        return None if self._last is None else self._last[1]

    def continue_turn(self, new_ids: torch.Tensor, **kwargs):
        """Runs more tokens of the current turn (e.g. an answer known in advance)
        through the cache of the last plain forward, and stores their KV too.
        Returns the model's output for them."""
        if self._last is None:
            raise ValueError("continue_turn follows a plain forward of this session (not generate, not another turn)")
        cache, ids, n = self._last
        if not isinstance(new_ids, torch.Tensor) or new_ids.dim() != 2 or new_ids.shape[0] != 1:
            raise ValueError("continue_turn takes a [1, tokens] tensor of new token ids")
        total = ids.shape[0] + new_ids.shape[1]
        limit = self.options["max_context"]
        if limit is not None and total > limit:
            raise ValueError(
                f"continuing this turn to {total} tokens would exceed max_context={limit}; "
                "open the session with reserve= the tokens to come, so the prompt is truncated to leave room"
            )
        kwargs[self._state.kv.cache_kwarg] = cache
        kwargs["use_cache"] = True
        out = self.model(input_ids=new_ids.to(ids.device), **kwargs)
        ids = torch.cat([ids, new_ids[0].to(ids.device)])
        self.generated_tokens += new_ids.shape[1]
        hidden = first_hidden(ids[None], kwargs.get("attention_mask"))
        if hidden is not None:
            self._hidden_from = hidden if self._hidden_from is None else min(self._hidden_from, hidden)
        if self.save:
            self._save(cache, ids, n, start=n + cache.new_tokens() - new_ids.shape[1])
        self._last = (cache, ids, n)
        return out

    def run_generate(self, generate, input_ids, kwargs):
        cache, n, input_ids = self._begin(input_ids, self._new_tokens_bound(input_ids, kwargs), kwargs, generating=True)
        kwargs = self._fit_to_window(kwargs)
        kwargs[self._state.kv.cache_kwarg] = cache
        kwargs["use_cache"] = True
        ok = False
        try:
            out = generate(input_ids, **kwargs)
            ok = True
        finally:
            seqs = getattr(out, "sequences", out) if ok else None
            if ok:
                self.generated_tokens = seqs.shape[1] - input_ids.shape[1]
            self._end(cache, seqs[0] if ok else None, n, ok)
        return out
