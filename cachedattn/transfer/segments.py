"""Which bytes of which chunk blocks one layer's history needs, as a few large
copies straight from the store's chunk layout.

In a chunk block, one layer of one chunk is K ``[kv_heads, chunk_tokens,
head_dim]`` immediately followed by V of the same shape (spec.ChunkGeometry):
one contiguous range of ``2 * k_bytes``. So a layer's history is one copy per
chunk, never one per head. The destination (a staging slot) holds those
ranges back to back, ``[chunks, 2, kv_heads, chunk_tokens, head_dim]``;
:func:`place` copies it out as ``[kv_heads, tokens, head_dim]`` K and V on the
compute stream (into new tensors, or straight into the cache's own). A partial last chunk is copied whole (its
unused slots are zeros and are sliced away); a sliding-window layer copies
only the chunks holding its last ``window - 1`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    first_chunk: int  # chunk position of the slot's first range
    chunks: int  # ranges (one per chunk) in the slot
    start: int  # first history token this layer needs
    end: int  # one past the last
    src_offset: int  # of the layer's K inside each chunk block
    range_bytes: int  # K and V of one chunk

    @property
    def nbytes(self) -> int:
        return self.chunks * self.range_bytes

    def positions(self) -> range:
        return range(self.first_chunk, self.first_chunk + self.chunks)

    def segments(self, block_ptrs, dst_ptr: int, positions=None) -> list[tuple[int, int, int]]:
        """(src, dst, bytes) for the given chunk positions (default: all of them).

        ``block_ptrs[pos]``: address of chunk position pos's block."""
        out = []
        for pos in self.positions() if positions is None else positions:
            if not self.first_chunk <= pos < self.first_chunk + self.chunks:
                raise ValueError(f"chunk {pos} is not part of layer {self.layer}'s plan")
            out.append(
                (block_ptrs[pos] + self.src_offset, dst_ptr + (pos - self.first_chunk) * self.range_bytes, self.range_bytes)
            )
        return out


def plan_layer(geo, layer: int, n_tokens: int, window: int | None = None) -> LayerPlan:
    """The copies layer `layer` needs for a history of `n_tokens` tokens.

    ``window``: the layer's sliding window (it keeps the last window - 1 tokens), None for full attention."""
    if not 0 <= layer < geo.spec.num_layers:
        raise ValueError(f"layer {layer} out of range (model has {geo.spec.num_layers})")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    C = geo.chunk_tokens
    start = 0 if window is None else max(0, n_tokens - (window - 1))
    if n_tokens == start:
        return LayerPlan(layer, 0, 0, start, start, geo.layer_offset[layer], 2 * geo.k_bytes[layer])
    first, last = start // C, (n_tokens - 1) // C
    return LayerPlan(layer, first, last - first + 1, start, n_tokens, geo.layer_offset[layer], 2 * geo.k_bytes[layer])


def place(plan: LayerPlan, slot: torch.Tensor, geo, k_out=None, v_out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[kv_heads, plan.end - plan.start, head_dim]`` copied out of a filled slot.

    ``slot``: the uint8 staging region of at least ``plan.nbytes`` bytes on the compute device.
    ``k_out``/``v_out``: where to write (any views of that shape, e.g. the front of the tensors
    the cache layer will hold); new tensors when None. The result never shares storage with the
    slot: the copies out run on the current stream, so the slot may be refilled once that stream
    passed this point (a view would be read later, after a refill). At most three copies per K/V:
    the first chunk's tail, the whole chunks in between (one 4-D copy), the last chunk's head."""
    h, d = geo.spec.layers[plan.layer]
    C, n = geo.chunk_tokens, plan.end - plan.start
    kv = slot[: plan.nbytes].view(geo.spec.dtype).view(plan.chunks, 2, h, C, d)
    outs = []
    for part, out in ((0, k_out), (1, v_out)):
        if out is None:
            out = torch.empty(h, n, d, dtype=geo.spec.dtype, device=slot.device)
        elif tuple(out.shape) != (h, n, d):
            raise ValueError(f"output is {tuple(out.shape)}, layer {plan.layer} needs {(h, n, d)}")
        src = kv[:, part]  # [chunks, h, C, d]
        for t0, c, off, m in _pieces(plan.start - plan.first_chunk * C, plan.end - plan.first_chunk * C, C):
            if off < 0:  # `m` whole chunks from chunk c
                out[:, t0 : t0 + m * C].unflatten(1, (m, C)).copy_(src[c : c + m].permute(1, 0, 2, 3))
            else:
                out[:, t0 : t0 + m].copy_(src[c, :, off : off + m])
        outs.append(out)
    return outs[0], outs[1]


def _pieces(a: int, b: int, C: int) -> list[tuple[int, int, int, int]]:
    """Tokens [a, b) of back-to-back chunks of C as (out offset, chunk, offset in chunk, tokens);
    offset -1: `tokens` is a count of whole chunks."""
    out, u = [], a
    if u % C and u < b:  # the first chunk's tail
        m = min(b, (u // C + 1) * C) - u
        out.append((u - a, u // C, u % C, m))
        u += m
    whole = (b - u) // C
    if whole:
        out.append((u - a, u // C, -1, whole))
        u += whole * C
    if u < b:  # the last chunk's head
        out.append((u - a, u // C, 0, b - u))
    return out
