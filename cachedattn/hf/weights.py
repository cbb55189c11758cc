"""Model identity for KVSpec.model_digest: the architecture config plus a
digest of every byte of every parameter and buffer, the same in every process
and on every machine. (The store only compares the digest it is given; the
hashing of a torch module's weights lives here, with the model integration.)

Stored KV is only valid for the exact weights it was computed with, and two
checkpoints can differ in a single element (a fine-tune touching a few
embedding rows, a merged adapter): a digest that samples the weights would let
such a model be served the other's KV. So each tensor's bytes are hashed whole
with xxh3-128 (several GB/s per core, read in place, no copy for contiguous
CPU tensors), and the per-tensor digests are combined with each tensor's
name, shape and dtype. Per-tensor digests let a caller re-hash only the
tensors that changed (cachedattn.hf.identity).
"""

from __future__ import annotations

import hashlib
import json

import torch
import xxhash

# Config fields that name where a model came from or how it was loaded, not what it computes.
_VOLATILE = {"_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset", "name_or_path"}
# Tensors not in host memory are copied out in pieces of this many bytes, to bound the extra memory.
_PIECE_BYTES = 64 << 20


def config_digest(config: dict) -> str:
    clean = {k: v for k, v in config.items() if k not in _VOLATILE}
    text = json.dumps(clean, sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=16, person=b"ca-config").hexdigest()


def model_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `module` and its submodules, by qualified
    name. Buffers kept out of state_dict (rotary frequency tables, embedding
    scales) shape the output too, so they are included. A tensor shared by
    several modules (tied embeddings) appears under each name."""
    out = []
    for prefix, m in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        for group in (m._parameters, m._buffers):
            for name, t in group.items():
                if t is not None:
                    out.append((dot + name, t))
    return out


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as a flat uint8 tensor, a view where the layout allows."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.dequantize()  # the values the model computes with, whatever the quantization scheme
    t = t.resolve_conj().resolve_neg()  # lazy flags: the bytes in memory are not the values
    return t.reshape(-1).view(torch.uint8)  # reshape copies only a non-contiguous tensor


def tensor_digest(t: torch.Tensor) -> bytes:
    """xxh3-128 of the tensor's element bytes, in row-major order, wherever it lives."""
    h = xxhash.xxh3_128()
    flat = _byte_view(t)
    if flat.device.type == "cpu":
        h.update(flat.numpy())  # hashed in place: the buffer protocol, no copy
        return h.digest()
    for start in range(0, flat.numel(), _PIECE_BYTES):
        h.update(flat[start : start + _PIECE_BYTES].cpu().numpy())
    return h.digest()


def combine(items: list[tuple[str, torch.Tensor, bytes]]) -> str:
    """The weights digest of (name, tensor, tensor_digest) triples: names, shapes, dtypes and contents."""
    h = hashlib.blake2b(digest_size=16, person=b"ca-weights2")
    for name, t, digest in sorted(items, key=lambda item: item[0]):
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(digest)
    return h.hexdigest()


def tensor_digests(tensors: list[tuple[str, torch.Tensor]], known: dict[int, bytes] | None = None) -> list[bytes]:
    """tensor_digest of each, hashing a tensor shared by several names once.
    ``known``: digests by id(tensor) to reuse instead of hashing (filled in)."""
    known = {} if known is None else known
    out = []
    for _, t in tensors:
        d = known.get(id(t))
        if d is None:
            d = known[id(t)] = tensor_digest(t)
        out.append(d)
    return out


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of every byte of every parameter and buffer of `module`."""
    tensors = model_tensors(module)
    return combine([(n, t, d) for (n, t), d in zip(tensors, tensor_digests(tensors))])


def model_digest(config: dict, module_or_weights) -> str:
    """What KVSpec.model_digest should hold for a model: its config digest and
    weights digest (pass the module, or a weights_digest already computed)."""
    weights = module_or_weights if isinstance(module_or_weights, str) else weights_digest(module_or_weights)
    return f"{config_digest(config)}-{weights}"
