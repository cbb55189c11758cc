"""After a turn: which of the cache's rows holds the KV of the returned tokens,
and storing it best effort (a save that fails never costs the caller the answer).
"""

from __future__ import annotations

import logging

import torch

from cachedattn.hf.async_saving import copy_engine, save_async

log = logging.getLogger("cachedattn")


def provable_row(computed: torch.Tensor | None, wanted: torch.Tensor) -> tuple[int, int]:
    """(row, length): the cache row whose computed ids share the longest prefix with
    `wanted` (the returned sequence after the history), and that prefix's length.

    Row r's KV at a position is the KV of row r's ids up to it, so the first
    `length` new tokens of `wanted` have exactly that row's KV. Beam search
    returns a finished beam that may differ from every running row after some
    point (then only the shared part, at least the prompt, is provable);
    several sampled sequences keep one row each (sequence 0 is row 0).
    """
    if computed is None or computed.shape[1] == 0 or wanted.numel() == 0:
        return 0, 0
    t = min(computed.shape[1], wanted.shape[0])
    same = computed[:, :t] == wanted[:t].to(computed.device)[None]
    lengths = same.long().cumprod(1).sum(1)
    row = int(lengths.argmax())
    return row, int(lengths[row])


def warn_once(state, kind: str, msg: str, *args) -> None:
    """Logs a warning the first time `kind` happens for this patched model, later ones at debug level."""
    if kind in state.warned:
        log.debug(msg, *args)
    else:
        state.warned.add(kind)
        log.warning(msg + " (warned once per model; later ones are logged at debug level)", *args)


def save_turn(session, cache, token_ids: torch.Tensor, n: int, start: int | None = None) -> None:
    """Stores the KV of tokens [start, n + provable) (start defaults to n), or nothing if the store refuses."""
    st = session.patched
    start = n if start is None else start
    row, length = provable_row(cache.computed_tokens(), token_ids[n:].cpu())
    m = n + length
    if session.hidden_from is not None:  # KV after a token the mask hid is not what a later turn computes
        m = min(m, session.hidden_from)
    if m <= start:
        return
    if copy_engine(st) is not None:  # the GPU path: copies on the engine's D2H stream, commit in the background
        try:
            save_async(session, cache, token_ids, row, n, start, m, lambda e: _skipped(session, e))
        except Exception as e:
            _skipped(session, e)
        return
    try:
        with st.store.begin_append(session.conv_id, token_ids[:m], start=start) as txn:
            for layer in range(st.kv.spec.num_layers):
                k, v = cache.row_new_kv(layer, row, start - n, m - n)
                txn.put_layer(layer, k.detach(), v.detach())
            session.last_save = txn.commit()
    except Exception as e:
        _skipped(session, e)


def _skipped(session, e: Exception) -> None:
    """The answer is computed and right: losing its KV costs only a later recompute."""
    st = session.patched
    st.store.count("skipped_saves")
    warn_once(
        st, f"save:{type(e).__name__}", "cachedattn: the KV of a turn of %r was not stored (%s: %s)",
        session.conv_id, type(e).__name__, e,
    )  # fmt: skip
