"""Views of vLLM's paged KV cache: K and V of one block of one layer as
``[kv_heads, block_tokens, head_dim]``, the store's own chunk layout, so a
block moves with one copy each way.

Only the layouts the tests run are accepted; any other is refused when the
caches are registered, naming the shape, rather than read wrongly.

- ``cpu``: vLLM's CPU attention backend, ``[blocks, kv_heads, block_tokens,
  2 * head_dim]`` per layer, whose kernels read each (block, head) as
  ``2 * block_tokens`` rows of ``head_dim``: the first ``block_tokens`` rows
  are K, the rest V.
"""

from __future__ import annotations

import torch


class PagedKV:
    def __init__(self, caches: list[torch.Tensor], block_tokens: int, kv_heads: int, head_dim: int):
        if not caches:
            raise ValueError("paged KV: no layers registered")
        self.block_tokens, self.kv_heads, self.head_dim = block_tokens, kv_heads, head_dim
        want = (kv_heads, block_tokens, 2 * head_dim)
        self._halves = []
        for i, t in enumerate(caches):
            if t.dim() != 4 or tuple(t.shape[1:]) != want or not t.is_contiguous():
                raise ValueError(
                    f"paged KV layer {i}: shape {tuple(t.shape)} is not a layout the connector supports "
                    f"(vLLM's CPU backend, [blocks, {kv_heads}, {block_tokens}, {2 * head_dim}], contiguous)"
                )
            v = t.view(t.shape[0], kv_heads, 2 * block_tokens, head_dim)
            self._halves.append((v[:, :, :block_tokens], v[:, :, block_tokens:]))
        self.dtype = caches[0].dtype
        self.num_blocks = caches[0].shape[0]
        self.layout = "cpu"

    @property
    def num_layers(self) -> int:
        return len(self._halves)

    def block(self, layer: int, block_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views of one block: ``[kv_heads, block_tokens, head_dim]`` each (writable)."""
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} outside the paged cache's {self.num_blocks} blocks")
        k, v = self._halves[layer]
        return k[block_id], v[block_id]
