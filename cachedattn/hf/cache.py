"""StoreBackedCache: a DynamicCache whose history comes from the store, one
layer at a time, exactly when that layer's attention asks for it.

Before the forward pass it already reports the restored length (positions and
masks come from get_seq_length / get_mask_sizes), while the store's load reads
layers ahead. update(layer i) is the one call every attention makes: it waits
for layer i's history only and installs it in every batch row (beam search and
several sampled sequences run with one row each). Sliding-window layers get the
last window-1 tokens and their cumulative length, as DynamicSlidingWindowLayer
keeps them.

What gets saved after a turn is read from the cache's own final state, never
from a log of update() calls: transformers reorders rows (beam search), selects
and repeats them, and crops rejected draft tokens (assisted decoding), and only
the final tensors reflect all of that. Full-attention layers already hold every
new token; sliding-window layers keep only their window, so the cache keeps the
new tokens' KV of those layers aside and applies every reorder / select /
repeat / crop to it too. Alongside, it keeps the token ids fed through the
model per row under the same operations, so row r's new KV is provably the KV
of `tokens[r]` after the history (KV at a position depends only on the row's
tokens up to it; every operation moves or cuts whole rows).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

_disable = torch._dynamo.disable  # the store is plain Python and I/O: compiled code calls it, never traces it


class StoreBackedCache(DynamicCache):
    def __init__(self, config, load, n_history: int, sliding: list[int | None], layerwise: bool = True, gpu=None):
        super().__init__(config=config)
        self._load = load
        self._gpu = gpu  # a transfer.gpu_load.GpuLoad: the history comes through the copy engine
        # layerwise=False: every layer's history is read before the forward starts (load, then compute);
        # on the GPU path every layer is staged by the copy engine and waited for here.
        self._loaded = {}
        if load and not layerwise:
            if gpu is None:
                self._loaded = {i: load.read_layer(i) for i in range(len(sliding))}
            elif gpu.readahead >= len(sliding):  # (a preloaded load taken over stays layer by layer)
                gpu.wait_all()
        self._n = n_history
        self._sliding = sliding
        self._pending = set(range(len(sliding))) if n_history else set()
        # New KV of sliding-window layers ([rows, heads, tokens, dim]), kept in step with the layer's rows,
        # in buffers grown by doubling (a decode step appends in place: no re-concatenation per token).
        self._side: dict[int, _Growing] = {}
        # Token ids fed through the model per row: pieces ([rows, tokens], on the device they came on)
        # joined only when read or remapped (no host copy, no sync per decode step); None once a
        # forward ran without ids.
        self._tokens: list[torch.Tensor] | None = []
        for i, window in enumerate(sliding):
            if window is not None and n_history and i < len(self.layers):
                self.layers[i].cumulative_length = n_history

    # ---- history ------------------------------------------------------------

    @_disable
    def _restore(self, layer_idx: int, like: torch.Tensor) -> None:
        k, v = self._loaded.pop(layer_idx) if self._loaded else self._load.read_layer(layer_idx)
        rows = like.shape[0]
        k = k.unsqueeze(0).to(like.device, non_blocking=True).expand(rows, -1, -1, -1)
        v = v.unsqueeze(0).to(like.device, non_blocking=True).expand(rows, -1, -1, -1)
        layer = self.layers[layer_idx]
        layer.lazy_initialization(k, v)
        window = self._sliding[layer_idx]
        if window is not None:
            k, v = k[:, :, -(window - 1) :], v[:, :, -(window - 1) :]
            layer.cumulative_length = self._n
        layer.keys, layer.values = k.contiguous(), v.contiguous()

    @_disable
    def _restore_gpu(self, layer_idx: int, like: torch.Tensor) -> None:
        """GPU path, sliding-window layer: the compute stream waits for this layer's copies, no host
        sync (see transfer.gpu_load); the window is copied out of the staging slot once."""
        k, v = self._gpu.layer(layer_idx, device=like.device)  # already only the window
        rows = like.shape[0]
        layer = self.layers[layer_idx]
        k, v = k.unsqueeze(0).expand(rows, -1, -1, -1), v.unsqueeze(0).expand(rows, -1, -1, -1)
        layer.lazy_initialization(k, v)
        layer.cumulative_length = self._n
        layer.keys, layer.values = k.contiguous(), v.contiguous()  # no copy for one row

    def close_load(self) -> None:
        """Ends the store's load (after the copies reading its blocks, on the GPU path)."""
        if self._gpu is not None:
            self._gpu.close()
        elif self._load is not None:
            self._load.close()

    @_disable
    def _restore_full(self, layer_idx: int, key_states, value_states):
        """Full-attention layer: the history is written straight into the front of the tensors
        the layer will hold (from the staging slot on the GPU path, from the host blocks on the
        CPU), the new tokens copied behind it: one copy of the history, no concatenation."""
        b, h, q, d = key_states.shape
        k = key_states.new_empty(b, h, self._n + q, d)
        v = value_states.new_empty(b, h, self._n + q, d)
        if self._gpu is not None:
            self._gpu.layer(layer_idx, k[0, :, : self._n], v[0, :, : self._n])
        elif self._loaded:
            hk, hv = self._loaded.pop(layer_idx)
            k[0, :, : self._n], v[0, :, : self._n] = hk, hv
        else:
            self._load.read_layer(layer_idx, k[0, :, : self._n], v[0, :, : self._n])
        if b > 1:
            k[1:, :, : self._n] = k[:1, :, : self._n]
            v[1:, :, : self._n] = v[:1, :, : self._n]
        k[:, :, self._n :] = key_states
        v[:, :, self._n :] = value_states
        layer = self.layers[layer_idx]
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        return k, v

    def _take_pending(self, layer_idx: int) -> bool:
        if layer_idx in self._pending:
            self._pending.discard(layer_idx)
            return True
        return False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self._sliding[layer_idx] is not None:
            side = self._side.get(layer_idx)
            if side is None:
                self._side[layer_idx] = _Growing(key_states, value_states)
            else:
                side.append(key_states, value_states)
        if self._pending and self._take_pending(layer_idx):
            if self._sliding[layer_idx] is None and (self._gpu is not None or key_states.device.type == "cpu"):
                return self._restore_full(layer_idx, key_states, value_states)
            if self._gpu is not None:
                self._restore_gpu(layer_idx, key_states)
            else:
                self._restore(layer_idx, key_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx in self._pending:
            return self._n
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int):
        if layer_idx in self._pending and self._sliding[layer_idx] is None:
            return self._n + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def history_consumed(self) -> bool:
        """True when every layer's stored history has been installed (read and checked)."""
        return not self._pending

    @property
    def history_tokens(self) -> int:
        """Tokens of stored history this cache starts with (restored, not computed)."""
        return self._n

    @_disable
    def check_unread_history(self) -> None:
        """Reads (and so verifies) the history of layers no forward asked for yet: a bad chunk
        surfaces now, while the turn can still be redone (before anything is sampled)."""
        if self._pending and self._load is not None:
            self._load.read_all()

    # ---- what transformers does to the rows, applied to the saved side too ----

    @_disable
    def note_tokens(self, input_ids) -> None:
        """The ids a forward through this cache is about to compute ([rows, tokens])."""
        if self._tokens is None:
            return
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            self._tokens = None  # embeddings or something else: what the KV belongs to is unknown
            return
        if self._tokens and self._tokens[0].shape[0] != input_ids.shape[0]:
            self._tokens = None
            return
        self._tokens.append(input_ids.detach().clone())  # a clone: generate reuses its buffers

    def _joined_tokens(self) -> torch.Tensor | None:
        if self._tokens is None:
            return None
        if not self._tokens:
            return torch.zeros(1, 0, dtype=torch.long)
        if len(self._tokens) > 1 or self._tokens[0].device.type != "cpu":
            dev = self._tokens[0].device
            self._tokens = [torch.cat([t.to(dev, torch.long) for t in self._tokens], 1).to("cpu", torch.long)]
        return self._tokens[0]

    def _map_rows(self, fn) -> None:
        for side in self._side.values():
            side.map(fn)
        if self._tokens:
            joined = torch.cat([t.to(self._tokens[0].device, torch.long) for t in self._tokens], 1)
            self._tokens = [fn(joined)]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # refuses what DynamicLayer refuses (a positive, absolute length)
        if tokens_to_remove < 0:
            cut = -tokens_to_remove
            for side in self._side.values():
                side.crop(cut)
            if self._tokens:
                self._tokens = [self._joined_tokens()[:, :-cut]]

    def reset(self) -> None:
        super().reset()
        self._side, self._tokens = {}, None  # nothing of what this cache held can be saved any more

    # ---- the turn's new KV, as the cache holds it at the end -----------------

    def computed_tokens(self) -> torch.Tensor | None:
        """[rows, tokens] ids (CPU) whose KV this cache holds after the history, or None if unknown."""
        return self._joined_tokens()

    def row_new_kv(self, layer_idx: int, row: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of new tokens [start, end) (counted after the history) of one row and layer."""
        if self._sliding[layer_idx] is not None:
            k, v = self._side[layer_idx].view()
            return k[row, :, start:end], v[row, :, start:end]
        layer = self.layers[layer_idx]
        return layer.keys[row, :, self._n + start : self._n + end], layer.values[row, :, self._n + start : self._n + end]


class _Growing:
    """K and V ``[rows, heads, tokens, dim]`` growing along tokens in place: capacity doubles, so
    appending one decode step costs that step's bytes (amortised), not the whole length."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self._k, self._v, self.n = k, v, k.shape[-2]

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k[:, :, : self.n], self._v[:, :, : self.n]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        m = self.n + k.shape[-2]
        if m > self._k.shape[-2]:
            cap = max(m, 2 * self._k.shape[-2], 16)
            ok, ov = self.view()
            self._k = ok.new_empty(*ok.shape[:2], cap, ok.shape[-1])
            self._v = ov.new_empty(*ov.shape[:2], cap, ov.shape[-1])
            self._k[:, :, : self.n], self._v[:, :, : self.n] = ok, ov
        self._k[:, :, self.n : m], self._v[:, :, self.n : m] = k, v
        self.n = m

    def map(self, fn) -> None:
        """The rows reordered / selected / repeated as the cache's rows are."""
        k, v = self.view()
        self._k, self._v = fn(k), fn(v)
        self.n = self._k.shape[-2]

    def crop(self, cut: int) -> None:
        self.n = max(0, self.n - cut)
