"""What a store holds for one model: per-layer KV shapes, dtype, identity,
and how a chunk of tokens is laid out in one block.

Chunk block layout (host memory and the data part of a chunk file alike):
layer 0 | layer 1 | ... , each layer K then V, each ``[kv_heads, chunk_tokens,
head_dim]`` in the model's dtype; every layer starts on a 4 KiB boundary so a
single layer of a single chunk is one aligned, contiguous (O_DIRECT) range.
A partial chunk uses the same geometry; its unused token slots are zeroed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import torch

FORMAT_VERSION = 1
ALIGN = 4096
_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def round_up(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class KVSpec:
    """The KV geometry of one model, plus a digest of what the model is.

    ``layers``: ``(kv_heads, head_dim)`` per layer. ``model_digest``: the
    caller's identity of the model (architecture config, weights digest);
    together with shapes and dtype it forms :attr:`fingerprint`, which keys
    every stored chunk, so KV is never served to a different model.
    """

    layers: tuple[tuple[int, int], ...]
    dtype: torch.dtype
    model_digest: str = ""
    # Derived in __post_init__: plain attributes, as loads read them for every layer.
    num_layers: int = field(init=False, repr=False, compare=False)
    element_size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        layers = tuple((int(h), int(d)) for h, d in self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers:
            raise ValueError("KVSpec.layers: a model needs at least one layer")
        for i, (h, d) in enumerate(layers):
            if h <= 0 or d <= 0:
                raise ValueError(f"KVSpec.layers[{i}]: kv_heads and head_dim must be positive, got ({h}, {d})")
        if self.dtype not in _DTYPES:
            raise ValueError(f"KVSpec.dtype: {self.dtype} is not supported (float32, float16, bfloat16)")
        object.__setattr__(self, "num_layers", len(layers))
        object.__setattr__(self, "element_size", self.dtype.itemsize)

    @classmethod
    def uniform(cls, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, model_digest: str = ""):
        return cls(((kv_heads, head_dim),) * int(num_layers), dtype, model_digest)

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"cachedattn-kv-v{FORMAT_VERSION}\0{_DTYPES[self.dtype]}\0{self.model_digest}\0".encode())
        h.update(repr(self.layers).encode())
        return h.hexdigest()

    def kv_bytes_per_token(self) -> int:
        return sum(2 * h * d for h, d in self.layers) * self.element_size


class ChunkGeometry:
    """Byte offsets of each layer's K and V inside one chunk block."""

    def __init__(self, spec: KVSpec, chunk_tokens: int):
        self.spec = spec
        self.chunk_tokens = chunk_tokens
        es = spec.element_size
        self.k_bytes = [h * chunk_tokens * d * es for h, d in spec.layers]
        self.layer_stride = [round_up(2 * kb) for kb in self.k_bytes]
        self.layer_offset = [0]
        for s in self.layer_stride[:-1]:
            self.layer_offset.append(self.layer_offset[-1] + s)
        self.block_bytes = sum(self.layer_stride)

    def layer_range(self, layer: int) -> tuple[int, int]:
        """(offset, length) of one layer inside the block (and the chunk file's data)."""
        return self.layer_offset[layer], self.layer_stride[layer]

    def kv_views(self, block_u8: torch.Tensor, layer: int, start: int = 0, end: int | None = None):
        """Zero-copy K and V views ``[kv_heads, end - start, head_dim]`` of tokens [start, end) of a block
        (default: all chunk_tokens); two as_strided views of one typed view, as a load makes these for
        every chunk of every layer it reads."""
        h, d = self.spec.layers[layer]
        C = self.chunk_tokens
        end = C if end is None else end
        es = self.spec.element_size
        typed = block_u8.view(self.spec.dtype)
        k_off = typed.storage_offset() + self.layer_offset[layer] // es + start * d  # layer offsets: 4 KiB multiples
        shape, stride = (h, end - start, d), (C * d, d, 1)
        return typed.as_strided(shape, stride, k_off), typed.as_strided(shape, stride, k_off + self.k_bytes[layer] // es)
