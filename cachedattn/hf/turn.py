"""What one turn is, as the parts after it read it: a Turn (what saving needs)
and the History it started from (the stored prefix it reused, opened).

A Session or a BatchSession builds them; the model's transfer path
(hf.paths) opens the History and saves the Turn. Nothing downstream reads a
session: what a save needs is in the Turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class History:
    """A turn's stored prefix, opened: the store's load (the conversation stays leased, so in use
    and never evicted, until close) and, on the copy-engine path, its staging (a
    transfer.gpu_load.GpuLoad: started by stage(), or already started when the read buffer
    held this conversation)."""

    def __init__(self, load, staged=None, start=None):
        self.load = load
        self.staged = staged
        self._start = start  # (load, readahead) -> GpuLoad: the engine path's staging; None on the host path

    @property
    def n_tokens(self) -> int:
        return self.load.n_tokens

    def tier_tokens(self) -> dict:
        return self.load.tier_tokens()

    def stage(self, readahead: int | None):
        """The copy engine starts issuing the layers (`readahead` layers ahead); returns the GpuLoad,
        or None on the host path (layers are then read from the host blocks when asked)."""
        if self.staged is None and self._start is not None:
            self.staged = self._start(self.load, readahead)
        return self.staged

    def read_layer_into(self, i: int, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """Layer i's history written into k_out / v_out ``[kv_heads, n_tokens, head_dim]``."""
        if self.staged is not None:
            self.staged.layer(i, k_out, v_out)
        else:
            self.load.read_layer(i, k_out, v_out)

    def release_staging(self) -> None:
        """Gives the staging back once this load's copies are done; the load itself stays open."""
        if self.staged is not None:
            self.staged.release_staging()

    def close(self) -> None:
        """Ends the load (after the copies reading its blocks, on the engine path) and its staging."""
        if self.staged is not None:
            self.staged.close()
        else:
            self.load.close()


@dataclass(frozen=True)
class Turn:
    """One turn of one conversation, as its save reads it.

    ``ids`` (1-D) are the conversation's tokens as the model saw them (after any truncation):
    the reused history, then the tokens computed this turn (prompt and generated). The first
    ``reused`` of them came from the store; ``cache`` holds the KV from there on
    (``computed_tokens()``: the ids each of its rows computed; ``row_new_kv(layer, row, start,
    end)``: a row's K and V of new tokens [start, end), counted after the history).
    ``hidden_from``: the first token the turn's attention mask hid (None: every token was
    visible); nothing from there on is stored. ``history``: the stored prefix the turn was
    opened with (None: nothing reused).
    """

    conv_id: str
    ids: torch.Tensor
    reused: int
    cache: object
    hidden_from: int | None = None
    history: History | None = None
