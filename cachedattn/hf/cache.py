"""StoreBackedCache: a DynamicCache whose history comes from the store, one
layer at a time, exactly when that layer's attention asks for it.

Before the forward pass it already reports the restored length (positions and
masks come from get_seq_length / get_mask_sizes), while the store's load reads
layers ahead. update(layer i) is the one call every attention makes: it waits
for layer i's history only, installs it, and records the new tokens' KV so the
session can save it after the turn. Sliding-window layers get the last
window-1 tokens and their cumulative length, as DynamicSlidingWindowLayer
keeps them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class StoreBackedCache(DynamicCache):
    def __init__(self, config, load, n_history: int, sliding: list[int | None], layerwise: bool = True):
        super().__init__(config=config)
        self._load = load
        # layerwise=False: every layer's history is read before the forward starts (load, then compute).
        self._loaded = {i: load.read_layer(i) for i in range(len(sliding))} if load and not layerwise else {}
        self._n = n_history
        self._sliding = sliding
        self._pending = set(range(len(sliding))) if n_history else set()
        self.new_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for i, window in enumerate(sliding):
            if window is not None and n_history and i < len(self.layers):
                self.layers[i].cumulative_length = n_history

    def _restore(self, layer_idx: int, like: torch.Tensor) -> None:
        k, v = self._loaded.pop(layer_idx) if self._loaded else self._load.read_layer(layer_idx)
        k = k.unsqueeze(0).to(like.device, non_blocking=True)
        v = v.unsqueeze(0).to(like.device, non_blocking=True)
        layer = self.layers[layer_idx]
        layer.lazy_initialization(k, v)
        window = self._sliding[layer_idx]
        if window is not None:
            k, v = k[:, :, -(window - 1) :], v[:, :, -(window - 1) :]
            layer.cumulative_length = self._n
        layer.keys, layer.values = k, v

    def _restore_full(self, layer_idx: int, key_states, value_states):
        """Full-attention layer on the CPU: the history is read straight into the
        front of the tensors the layer will hold, the new tokens copied behind it
        (one copy of the history instead of read-then-concatenate)."""
        b, h, q, d = key_states.shape
        k = key_states.new_empty(b, h, self._n + q, d)
        v = value_states.new_empty(b, h, self._n + q, d)
        if self._loaded:
            hk, hv = self._loaded.pop(layer_idx)
            k[0, :, : self._n], v[0, :, : self._n] = hk, hv
        else:
            self._load.read_layer(layer_idx, k[0, :, : self._n], v[0, :, : self._n])
        k[:, :, self._n :] = key_states
        v[:, :, self._n :] = value_states
        layer = self.layers[layer_idx]
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        return k, v

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new_kv.setdefault(layer_idx, []).append((key_states, value_states))
        if layer_idx in self._pending:
            self._pending.discard(layer_idx)
            if self._sliding[layer_idx] is None and key_states.device.type == "cpu" and key_states.shape[0] == 1:
                return self._restore_full(layer_idx, key_states, value_states)
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

    def new_tokens(self) -> int:
        """Tokens whose KV this cache computed (prefill and decode), same for every layer."""
        parts = self.new_kv.get(0, [])
        return sum(k.shape[-2] for k, _ in parts)

    def layer_new_kv(self, layer_idx: int, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """KV of the tokens this cache computed for one layer, leaving out the first `skip`."""
        parts = self.new_kv[layer_idx]
        k = torch.cat([p[0] for p in parts], dim=-2)[0, :, skip:]
        v = torch.cat([p[1] for p in parts], dim=-2)[0, :, skip:]
        return k, v
