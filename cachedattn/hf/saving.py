"""After a turn: which of the cache's rows holds the KV of the returned tokens,
which tokens of it may be stored, and storing them through the store's append
on the turn's thread (the host path; the copy-engine path issues the same
range through hf.async_saving). A save that fails never costs the caller the
answer: it is counted and warned about once.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

import torch

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


def saved_range(turn, start: int | None = None) -> tuple[int, int, int] | None:
    """(row, start, end): the cache row and the tokens [start, end) of turn.ids to store, or None
    when there is nothing to store. `start` defaults to the end of the reused history."""
    n = turn.reused
    start = n if start is None else start
    row, length = provable_row(turn.cache.computed_tokens(), turn.ids[n:].cpu())
    m = n + length
    if turn.hidden_from is not None:  # KV after a token the mask hid is not what a later turn computes
        m = min(m, turn.hidden_from)
    return None if m <= start else (row, start, m)


def save_on_host(store, num_layers: int, turn, row: int, start: int, m: int) -> Future:
    """Stores tokens [start, m) of `row` through one append; returns its commit (done once on disk)."""
    n = turn.reused
    with store.begin_append(turn.conv_id, turn.ids[:m], start=start) as txn:
        for layer in range(num_layers):
            k, v = turn.cache.row_new_kv(layer, row, start - n, m - n)
            txn.put_layer(layer, k.detach(), v.detach())
        return txn.commit()


def warn_once(warned: set, kind: str, msg: str, *args) -> None:
    """Logs a warning the first time `kind` happens (per patched model: `warned` is its set), later ones at debug level."""
    if kind in warned:
        log.debug(msg, *args)
    else:
        warned.add(kind)
        log.warning(msg + " (warned once per model; later ones are logged at debug level)", *args)


def skipped(store, warned: set, conv_id: str, e: Exception) -> None:
    """The answer is computed and right: losing its KV costs only a later recompute."""
    store.count("skipped_saves")
    warn_once(
        warned, f"save:{type(e).__name__}", "cachedattn: the KV of a turn of %r was not stored (%s: %s)",
        conv_id, type(e).__name__, e,
    )  # fmt: skip
