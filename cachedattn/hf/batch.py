"""Several conversations in one generate(): a batched session.

``cachedattn.batch_session(model, conv_ids)`` returns a BatchSession; its
``generate(list_of_ids, **kwargs)`` takes each conversation's full ids (history
+ new message, 1-D or [1, n] tensors of any lengths) and runs them as one batch.
Each row reuses the longest stored prefix of its own conversation, computes the
rest and stores its own new KV (prompt and generated tokens). ``rows[i]``
holds row i's reused / computed / generated tokens, tier_tokens and ttft.

Layout. With n_r restored and m_r new tokens in row r, H = max n_r and
M = max m_r, row r occupies H + M columns::

    [ H - n_r holes | n_r history | M - m_r holes | m_r new ]

The holes are masked (attention_mask 0) and positions come from the mask
(generate's own cumsum rule), so every real token sits at its true position and
sees exactly the real tokens before it: the same KV and logits as the
conversation alone, up to float summation order. The history is installed in
the cache before the forward (the holes hold zeros); generate computes columns
H.. as its prefill, then decodes all rows in step.

``forward_turns(ids, answers)`` is the same layout fed known answers (teacher
forcing, for the engine's answer jobs): the prompts as one forward, then the
answers, left-padded after them, as a second.

While a batch runs every row's stored history stays open (its conversation is
in use), so saving or reading one row never evicts another row's chunks; the
loads close once every row is saved.

Refused for batches, by name: sliding-window layers (the window counts cache
columns, and the holes would shorten it per row: not exact), decoding modes
other than greedy and sampling (beams, assisted, contrastive, penalties that
read the padded ids), and turns longer than max_context (no per-row
truncation yet). The single-conversation session serves all of those.
"""

from __future__ import annotations

import inspect
import logging
import time

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from cachedattn.hf.batch_rows import RowHooks
from cachedattn.hf.session import Session
from cachedattn.hf.turn import Turn
from cachedattn.transfer import checkpoints, streams
from cachedattn.transfer.gpu_load import layer_parameters

log = logging.getLogger("cachedattn")

# generate() options a batch serves exactly (every other option is refused by name).
ALLOWED = {
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "eos_token_id", "pad_token_id", "return_dict_in_generate", "output_logits", "output_scores", "use_cache",
}  # fmt: skip


class _FirstToken(LogitsProcessor):
    """Marks the moment the first forward's logits exist (every row's TTFT), then calls `then`
    (the engine's read buffer: the next job's KV loads while this batch decodes)."""

    def __init__(self, then=None):
        self.at = None
        self._then = then

    def __call__(self, input_ids, scores):
        if self.at is None:
            if streams.is_async(streams.device_of(scores)):  # the batch's own stream, not other jobs' copies
                streams.synchronize(streams.device_of(scores))
            checkpoints.host_reads("the host takes the time of the first token", scores)
            self.at = time.perf_counter()
            if self._then is not None:
                self._then()
        return scores


class _RowKV:
    """One row's new KV as a save reads a Turn's cache (row 0, tokens of the turn after its history):
    `cols` are the cache columns of those tokens, in order (holes between them skipped)."""

    def __init__(self, cache: DynamicCache, row: int, cols: torch.Tensor, tokens: torch.Tensor):
        self._cache, self._row, self._cols, self._tokens = cache, row, cols, tokens

    def computed_tokens(self):
        return self._tokens[None]

    def row_new_kv(self, layer_idx, row, start, end):
        layer = self._cache.layers[layer_idx]
        cols = self._cols[start:end].to(layer.keys.device)
        return layer.keys[self._row][:, cols], layer.values[self._row][:, cols]


def _check_batchable(state, kwargs: dict) -> None:
    windows = [w for w in state.kv.sliding if w is not None]
    if windows:
        raise ValueError(
            "batched sessions refuse models with sliding-window layers: the window counts cache columns, and "
            "the padding holes a batch needs would shorten it per row (not exact); serve such a model one "
            "conversation at a time (cachedattn.session)"
        )
    unknown = sorted(set(kwargs) - ALLOWED)
    if unknown:
        raise ValueError(
            f"a batched session serves greedy and sampling only; refused options {unknown} "
            "(beam search, assisted/contrastive decoding, penalties over the ids, several sequences per row; "
            "a streamer, stopping criteria or logits processors go per row: row_streamers, row_stopping_criteria, "
            "row_logits_processors): use cachedattn.session per conversation for the others"
        )


class BatchSession:
    def __init__(self, model, conv_ids, save: bool = True, readahead: int | None = None):
        model = getattr(model, "_orig_mod", model)
        if getattr(model, "_cachedattn", None) is None:
            raise ValueError("this model is not patched: call cachedattn.patch(model, store) first")
        conv_ids = list(conv_ids)
        if not conv_ids:
            raise ValueError("a batched session needs at least one conversation id")
        if len(set(conv_ids)) != len(conv_ids):
            raise ValueError("a conversation appears twice in one batch: its rows would race for its stored KV")
        self.model = model
        self.patched = model._cachedattn
        self.rows = [Session(model, c, readahead=readahead, save=save) for c in conv_ids]
        self.on_first_token = None  # called once the first forward's logits exist (the engine's read buffer)
        self.streamed: list[bool] = [False] * len(self.rows)  # the last generate() streamed a token of row r

    def __enter__(self) -> BatchSession:
        return self

    def __exit__(self, *exc) -> None:
        """Nothing is held between calls: generate() and forward_turns() close their rows' loads
        (in a finally) once every row is saved. A `with` block mirrors cachedattn.session."""
        return None

    @property
    def conv_ids(self) -> list[str]:
        return [r.conv_id for r in self.rows]

    def _ids(self, ids_list) -> list[torch.Tensor]:
        if not isinstance(ids_list, (list, tuple)) or len(ids_list) != len(self.rows):
            raise ValueError(f"pass a list of {len(self.rows)} id tensors, one per conversation of the batch")
        out = []
        for cid, ids in zip(self.conv_ids, ids_list):
            if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or (ids.dim() == 2 and ids.shape[0] != 1):
                raise ValueError(f"{cid!r}: ids must be a 1-D (or [1, n]) tensor of token ids")
            ids = ids.reshape(-1)
            if ids.numel() == 0:
                raise ValueError(f"{cid!r}: ids are empty")
            out.append(ids)
        return out

    def _open_history(self, path, row: Session, ids: torch.Tensor):
        """Row's stored history (hf.turn.History: its conversation leased, nothing read yet), or None.
        The read buffer serves it when the engine filled it for this row's conversation."""
        if not row.weights_current or ids.numel() < 2:
            return None
        try:
            return path.load_history(row.conv_id, ids, ids.numel() - 1, row.readahead, take_preload="own")
        except OSError as e:  # a failing store: this row computes its history
            self._row_failed(row, e)
            return None

    def _row_failed(self, row: Session, e: OSError) -> None:
        self.patched.store.count("recovered_turns")
        log.warning("cachedattn: %r: %s; the row computes its whole history", row.conv_id, e)

    def _begin(self, ids: list[torch.Tensor]):
        """Opens every row's history before reading any: while the batch runs, every row's
        conversation is leased (in use), so reading or saving one row never evicts another
        row's chunks. Returns (the model's transfer path, each row's History or None): the
        caller closes the histories after the saves."""
        current = self.patched.kv.identity.check(self.model)  # before transfer(): it may see a layer moved
        path = self.patched.transfer(self.model)
        histories = []
        try:
            for row, x in zip(self.rows, ids):
                row.weights_current = current
                row.tier_tokens = {"host": 0, "disk": 0}
                row.path = path
                histories.append(self._open_history(path, row, x))
        except BaseException:
            _close_all(histories)
            raise
        return path, histories

    def _read_row(self, r: int, row: Session, history, ks, vs, H: int) -> int:
        """Row r's history into columns [H - n, H) of every layer's cache tensors; returns n (0 when
        a chunk is bad: the row computes its history). On the copy-engine path the history goes from
        the pinned blocks through the engine straight into those columns (no pageable staging)."""
        n = history.n_tokens
        try:
            history.stage(row.readahead)
            try:
                for i, (k, v) in enumerate(zip(ks, vs)):
                    history.read_layer_into(i, k[r, :, H - n :], v[r, :, H - n :])
            finally:
                history.release_staging()  # the load itself stays open until the rows are saved
            row.tier_tokens = history.tier_tokens()
            return n
        except OSError as e:  # a bad chunk or a failing store: this row computes its history
            self._row_failed(row, e)
            for k, v in zip(ks, vs):
                k[r].zero_()
                v[r].zero_()
            return 0

    def _layout(self, ids, histories, pad: int, device):
        """Left-padded ids, mask and the history-filled cache of the layout in the module docstring."""
        ns = [h.n_tokens if h is not None else 0 for h in histories]
        H = max(ns)
        cache = DynamicCache(config=self.model.config)
        if H:
            dtype = next(self.model.parameters()).dtype
            ks, vs = [], []
            # Each layer's cache beside that layer's parameters (a model split over devices), as a session's.
            where = layer_parameters(self.model, len(self.patched.kv.spec.layers))
            for (h, d), p in zip(self.patched.kv.spec.layers, where):
                ks.append(p.new_zeros((len(ids), h, H, d), dtype=dtype))
                vs.append(p.new_zeros((len(ids), h, H, d), dtype=dtype))
            for r, (row, history) in enumerate(zip(self.rows, histories)):
                if history is not None:
                    ns[r] = self._read_row(r, row, history, ks, vs, H)
            for layer, (k, v) in enumerate(zip(ks, vs)):
                cache.update(k, v, layer)
        ms = [x.numel() - n for x, n in zip(ids, ns)]
        M, B = max(ms), len(ids)
        input_ids = torch.full((B, H + M), pad, dtype=torch.long, device=device)
        mask = torch.zeros((B, H + M), dtype=torch.long, device=device)
        for r, (x, n, m) in enumerate(zip(ids, ns, ms)):
            input_ids[r, H - n : H] = x[:n]
            input_ids[r, H + M - m :] = x[n:]
            mask[r, H - n : H] = 1
            mask[r, H + M - m :] = 1
        return input_ids, mask, cache, ns, ms, H, M

    def _bounds(self, max_new_tokens, rows: int) -> list[int]:
        """Each row's max_new_tokens: one int for every row, or one per row."""
        if isinstance(max_new_tokens, (list, tuple)):
            if len(max_new_tokens) != rows:
                raise ValueError(f"max_new_tokens: pass one int, or a list of {rows} (one per row)")
            bounds = [int(b) for b in max_new_tokens]
            if min(bounds) < 1:
                raise ValueError(f"per-row max_new_tokens must be >= 1, got {bounds}")
            return bounds
        return [int(max_new_tokens or self.model.generation_config.max_new_tokens or 20)] * rows

    def _check_context(self, ids, new_bounds: list[int]) -> None:
        limit = self.patched.options["max_context"]
        for cid, x, new_bound in zip(self.conv_ids, ids, new_bounds):
            if limit is not None and x.numel() + new_bound > limit:
                raise ValueError(
                    f"{cid!r}: {x.numel()} + {new_bound} new tokens exceed max_context={limit}; batched sessions do "
                    "not truncate: serve this conversation alone (cachedattn.session) or shorten it"
                )

    def generate(self, ids_list, row_streamers=None, row_stopping_criteria=None, row_logits_processors=None,
                 **kwargs):
        """One batched generate over the conversations' full ids; returns generate's
        output for the padded layout plus ``.rows``: each row's generated ids.

        Per row (a list with one entry per row, None where a row has none; see
        cachedattn.hf.batch_rows): ``row_streamers`` (put/end: the row's prompt, then
        each of its tokens, end() when the row finishes), ``row_stopping_criteria``
        and ``row_logits_processors`` (a callable or a list, called with the row's own
        ids and scores). ``max_new_tokens`` may be one int or one per row."""
        _check_batchable(self.patched, kwargs)
        ids = self._ids(ids_list)
        asked = kwargs.pop("max_new_tokens", None)
        bounds = self._bounds(asked, len(ids))
        self._check_context(ids, bounds)
        t0 = time.perf_counter()
        device = next(self.model.parameters()).device
        pad = kwargs.get("pad_token_id", self.model.generation_config.pad_token_id)
        pad = 0 if pad is None else int(pad if not isinstance(pad, (list, tuple)) else pad[0])
        eos = kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
        eos = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
        # Checked before any row's history is opened: bad hooks are the caller's input.
        # No max_new_tokens: generate's own length rules end the rows (bounds then served only the context check).
        ends = bounds if asked is not None else [float("inf")] * len(ids)
        hooks = RowHooks(ids, 0, ends, eos, row_streamers, row_stopping_criteria, row_logits_processors)
        path, histories = self._begin(ids)
        try:
            input_ids, mask, cache, ns, ms, H, M = self._layout(ids, histories, pad, device)
            hooks.start = H + M  # generated tokens begin after the layout's columns
            first = _FirstToken(self.on_first_token)
            procs = LogitsProcessorList([first, hooks.processor()])
            kwargs = {**kwargs, "use_cache": True, "pad_token_id": pad}
            if asked is not None:  # one bound is generate's own; several: the longest, each row stopped at its own
                kwargs["max_new_tokens"] = max(bounds) if isinstance(asked, (list, tuple)) else asked
            if hooks.has_row_hooks():
                kwargs["streamer"] = hooks
            self.streamed = hooks.streamed
            out = self.model.generate(
                input_ids, attention_mask=mask, logits_processor=procs, stopping_criteria=[hooks],
                **{self.patched.kv.cache_kwarg: cache}, **kwargs
            )
            seqs = getattr(out, "sequences", out)
            with_kv = cache.get_seq_length() - (H + M)  # generated tokens that went through the model
            gens = []
            for r, (row, x, n, m) in enumerate(zip(self.rows, ids, ns, ms)):
                g = seqs[r, H + M :]
                done = hooks.done[r]  # eos, its own bound or its own criteria (None: generate stopped first)
                g = g[: g.numel() if done is None else done]
                gens.append(g)
                row.reused_tokens, row.computed_tokens, row.generated_tokens = n, m, g.numel()
                row.ttft = (first.at or time.perf_counter()) - t0
                row.turns += 1
                row.hidden_from = None  # every real token was visible: the KV is what a later turn computes
                if row.save and row.weights_current:
                    kept = min(g.numel(), with_kv)
                    turn = torch.cat([x.to(g.device), g[:kept]])
                    cols = torch.arange(H + M - m, H + M + kept)
                    kv = _RowKV(cache, r, cols, turn[n:].cpu())
                    row.store_turn(path, Turn(row.conv_id, turn, n, kv, history=histories[r]))
        finally:
            _close_all(histories)  # the rows' conversations are in use until every row is saved
        if hasattr(out, "sequences"):
            out.rows = gens
        return out if hasattr(out, "sequences") else gens

    def forward_turns(self, ids_list, answers):
        """Teacher forcing for a batch (the engine's answer jobs, replays): each row's prompt
        (full ids) runs as one batched forward, then its given answer as a second one; each
        row stores the KV of its prompt and answer. Returns (last-prompt-position logits
        [B, vocab], each row's full sequence: prompt + answer, 1-D on the CPU).

        The answers are left-padded after the prompts: [.. prompt | A - a holes | a answer],
        holes masked and positions from the mask, so each answer token sits at its true
        position and sees exactly its conversation's tokens before it."""
        _check_batchable(self.patched, {})
        ids = self._ids(ids_list)
        answers = self._ids(answers)
        self._check_context([torch.cat([x, a]) for x, a in zip(ids, answers)], [0] * len(ids))
        t0 = time.perf_counter()
        device = next(self.model.parameters()).device
        pad = self.model.generation_config.pad_token_id
        pad = 0 if pad is None else int(pad if not isinstance(pad, (list, tuple)) else pad[0])
        kw = self.patched.kv.cache_kwarg
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        path, histories = self._begin(ids)
        try:
            input_ids, mask, cache, ns, ms, H, M = self._layout(ids, histories, pad, device)
            # Positions from the mask, as generate derives them: a hole repeats its neighbour's (it is masked).
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids[:, H:], attention_mask=mask, position_ids=pos[:, H:], use_cache=True,
                             **{kw: cache}, **keep)
            logits = out.logits[:, -1].float()
            if streams.is_async(streams.device_of(logits)):
                streams.synchronize(streams.device_of(logits))
            checkpoints.host_reads("the host takes the time of the first token", logits)
            ttft = time.perf_counter() - t0
            if self.on_first_token is not None:
                self.on_first_token()
            lens = [a.numel() for a in answers]
            if not any(row.save and row.weights_current for row in self.rows):
                lens = [0] * len(lens)  # nothing is stored: the answers' KV would be thrown away (as a session skips it)
            A = max(lens)
            a_ids = torch.full((len(ids), A), pad, dtype=torch.long, device=device)
            a_mask = torch.zeros((len(ids), A), dtype=torch.long, device=device)
            for r, (a, k) in enumerate(zip(answers, lens)):
                a_ids[r, A - k :] = a[:k].to(device)
                a_mask[r, A - k :] = 1
            if A:
                mask = torch.cat([mask, a_mask], 1)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                self.model(a_ids, attention_mask=mask, position_ids=pos[:, H + M :], use_cache=True, **{kw: cache},
                           **keep)
            seqs = []
            for r, (row, x, a, n, m, k) in enumerate(zip(self.rows, ids, answers, ns, ms, lens)):
                turn = torch.cat([x, a.to(x.device)])
                seqs.append(turn.cpu())
                row.reused_tokens, row.computed_tokens, row.generated_tokens = n, m, 0
                row.ttft = ttft
                row.turns += 1
                row.hidden_from = None
                if row.save and row.weights_current:
                    cols = torch.cat([torch.arange(H + M - m, H + M), torch.arange(H + M + A - k, H + M + A)])
                    kv = _RowKV(cache, r, cols, turn[n:].cpu())
                    row.store_turn(path, Turn(row.conv_id, turn, n, kv, history=histories[r]))
        finally:
            _close_all(histories)
        return logits, seqs


def _close_all(histories) -> None:
    for h in histories:
        if h is not None:
            h.close()


def batch_session(model, conv_ids, save: bool = True, readahead: int | None = None) -> BatchSession:
    """Several conversations' turns as one batch (see cachedattn.hf.batch)."""
    return BatchSession(model, conv_ids, save=save, readahead=readahead)
