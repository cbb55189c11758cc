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

Refused for batches, by name: sliding-window layers (the window counts cache
columns, and the holes would shorten it per row: not exact), decoding modes
other than greedy and sampling (beams, assisted, contrastive, penalties that
read the padded ids), and turns longer than max_context (no per-row
truncation yet). The single-conversation session serves all of those.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from cachedattn.hf.saving import save_turn
from cachedattn.hf.session import Session

log = logging.getLogger("cachedattn")

# generate() options a batch serves exactly (every other option is refused by name).
ALLOWED = {
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "eos_token_id", "pad_token_id", "return_dict_in_generate", "output_logits", "output_scores", "use_cache",
}  # fmt: skip


class _FirstToken(LogitsProcessor):
    """Marks the moment the first forward's logits exist (every row's TTFT)."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            if scores.is_cuda:
                torch.cuda.synchronize()
            self.at = time.perf_counter()
        return scores


class _RowKV:
    """One row's new KV as save_turn reads it (row 0, tokens of the turn after its history)."""

    def __init__(self, cache: DynamicCache, row: int, first: int, tokens: torch.Tensor):
        self._cache, self._row, self._first, self._tokens = cache, row, first, tokens

    def computed_tokens(self):
        return self._tokens[None]

    def row_new_kv(self, layer_idx, row, start, end):
        layer = self._cache.layers[layer_idx]
        a, b = self._first + start, self._first + end
        return layer.keys[self._row, :, a:b], layer.values[self._row, :, a:b]


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
            "(beam search, assisted/contrastive decoding, penalties over the ids, streamers, "
            "several sequences per row): use cachedattn.session per conversation for those"
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
        self._state = model._cachedattn
        self.rows = [Session(model, c, readahead=readahead, save=save) for c in conv_ids]

    def __enter__(self) -> BatchSession:
        return self

    def __exit__(self, *exc) -> None:
        pass

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

    def _restore(self, row: Session, ids: torch.Tensor) -> tuple[list | None, int]:
        """Row's stored history read in full: ([(k, v) per layer], n) or (None, 0)."""
        if not row._weights_current or ids.numel() < 2:
            return None, 0
        load = None
        try:
            load = row._load_prefix(ids, ids.numel() - 1)
            if load is None:
                return None, 0
            layers = [load.read_layer(i) for i in range(self._state.kv.spec.num_layers)]
            row.tier_tokens = load.tier_tokens()
            return layers, load.n_tokens
        except OSError as e:  # a bad chunk or a failing store: this row computes its history
            self._state.store._stats.add(recovered_turns=1)
            log.warning("cachedattn: %r: %s; the row computes its whole history", row.conv_id, e)
            return None, 0
        finally:
            if load is not None:
                load.close()

    def generate(self, ids_list, **kwargs):
        """One batched generate over the conversations' full ids; returns generate's
        output for the padded layout plus ``.rows``: each row's generated ids."""
        _check_batchable(self._state, kwargs)
        ids = self._ids(ids_list)
        limit = self._state.options["max_context"]
        new_bound = int(kwargs.get("max_new_tokens") or self.model.generation_config.max_new_tokens or 20)
        for cid, x in zip(self.conv_ids, ids):
            if limit is not None and x.numel() + new_bound > limit:
                raise ValueError(
                    f"{cid!r}: {x.numel()} + {new_bound} new tokens exceed max_context={limit}; batched sessions do "
                    "not truncate: serve this conversation alone (cachedattn.session) or shorten it"
                )
        t0 = time.perf_counter()
        device = next(self.model.parameters()).device
        hist = []
        for row, x in zip(self.rows, ids):
            row._weights_current = self._state.kv.identity.check(self.model)
            row.tier_tokens = {"host": 0, "disk": 0}
            hist.append(self._restore(row, x))
        ns = [n for _, n in hist]
        ms = [x.numel() - n for x, n in zip(ids, ns)]
        H, M, B = max(ns), max(ms), len(ids)
        pad = kwargs.get("pad_token_id", self.model.generation_config.pad_token_id)
        pad = 0 if pad is None else int(pad if not isinstance(pad, (list, tuple)) else pad[0])
        input_ids = torch.full((B, H + M), pad, dtype=torch.long, device=device)
        mask = torch.zeros((B, H + M), dtype=torch.long, device=device)
        for r, (x, n, m) in enumerate(zip(ids, ns, ms)):
            input_ids[r, H - n : H] = x[:n]
            input_ids[r, H + M - m :] = x[n:]
            mask[r, H - n : H] = 1
            mask[r, H + M - m :] = 1
        cache = DynamicCache(config=self.model.config)
        if H:
            dtype = next(self.model.parameters()).dtype
            for layer in range(self._state.kv.spec.num_layers):
                ks, vs = [], []
                for (layers, n) in hist:
                    k0, v0 = (layers[layer] if layers is not None else hist_like(hist, layer))
                    k = k0.new_zeros(k0.shape[0], H, k0.shape[2])
                    v = v0.new_zeros(v0.shape[0], H, v0.shape[2])
                    if n:
                        k[:, H - n :], v[:, H - n :] = k0, v0
                    ks.append(k)
                    vs.append(v)
                cache.update(torch.stack(ks).to(device, dtype), torch.stack(vs).to(device, dtype), layer)
        first = _FirstToken()
        procs = LogitsProcessorList([first])
        kwargs = {**kwargs, "use_cache": True, "pad_token_id": pad}
        out = self.model.generate(
            input_ids, attention_mask=mask, logits_processor=procs, **{self._state.kv.cache_kwarg: cache}, **kwargs
        )
        seqs = getattr(out, "sequences", out)
        with_kv = cache.get_seq_length() - (H + M)  # generated tokens that went through the model
        eos = kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
        eos = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
        gens = []
        for r, (row, x, n, m) in enumerate(zip(self.rows, ids, ns, ms)):
            g = seqs[r, H + M :]
            stop = next((i + 1 for i, t in enumerate(g.tolist()) if t in eos), g.numel())
            g = g[:stop]
            gens.append(g)
            row.reused_tokens, row.computed_tokens, row.generated_tokens = n, m, g.numel()
            row.ttft = (first.at or time.perf_counter()) - t0
            row.turns += 1
            row._hidden_from = None  # every real token was visible: the KV is what a later turn computes
            if row.save and row._weights_current:
                kept = min(g.numel(), with_kv)
                turn = torch.cat([x.to(g.device), g[:kept]])
                save_turn(row, _RowKV(cache, r, H + M - m, turn[n:].cpu()), turn, n)
        if hasattr(out, "sequences"):
            out.rows = gens
        return out if hasattr(out, "sequences") else gens


def hist_like(hist, layer):
    """Zero-length KV shaped like another row's (a row with no history among rows with one)."""
    for layers, _ in hist:
        if layers is not None:
            k, v = layers[layer]
            return k[:, :0], v[:, :0]
    raise RuntimeError("no row of the batch has history")  # unreachable: H > 0 means some row has one


def batch_session(model, conv_ids, save: bool = True, readahead: int | None = None) -> BatchSession:
    """Several conversations' turns as one batch (see cachedattn.hf.batch)."""
    return BatchSession(model, conv_ids, save=save, readahead=readahead)
