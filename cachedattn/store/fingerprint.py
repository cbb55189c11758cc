"""Model identity for KVSpec.model_digest: the architecture config plus a cheap
digest of the weights, the same in every process and on every machine.

The weights digest reads each tensor's name, shape, dtype and a fixed strided
sample of its values (the first, last and evenly spaced elements, at most
`sample` per tensor): far cheaper than hashing every byte of a large model,
and still different for any two checkpoints that differ beyond a rounding of
a few unsampled weights. Callers that need every byte checked can pass
``sample=None``.
"""

from __future__ import annotations

import hashlib
import json

import torch

# Config fields that name where a model came from or how it was loaded, not what it computes.
_VOLATILE = {"_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset", "name_or_path"}


def config_digest(config: dict) -> str:
    clean = {k: v for k, v in config.items() if k not in _VOLATILE}
    text = json.dumps(clean, sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=16, person=b"ca-config").hexdigest()


def _as_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.is_floating_point() or t.is_complex():
        t = t.view(torch.uint8) if t.element_size() == 1 else t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t.numpy().tobytes()


def weights_digest(module: torch.nn.Module, sample: int | None = 4096) -> str:
    h = hashlib.blake2b(digest_size=16, person=b"ca-weights")
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        flat = t.reshape(-1)
        n = flat.numel()
        if n == 0:
            continue
        if sample is None or n <= sample:
            picked = flat
        else:
            step = n // sample
            picked = torch.cat([flat[:: step][:sample], flat[-1:]])
        h.update(_as_bytes(picked))
    return h.hexdigest()


def model_digest(config: dict, module: torch.nn.Module, sample: int | None = 4096) -> str:
    """What KVSpec.model_digest should hold for a model."""
    return f"{config_digest(config)}-{weights_digest(module, sample)}"
