"""Which weights vLLM runs: a digest of the model directory's weight files
and config, and of the settings with which vLLM changes what the same files
compute (its dtype, a quantization it applies at load, config overrides):
the namespace of every key the connector stores (KV is never served to
other weights, nor found by them).

The files are hashed whole (xxh3-128, a few GB/s), once per process: an 8B
model costs a few seconds at start. A model given by hub id is found in the
local hub cache; one that is not on disk at all is refused, naming why.
"""

from __future__ import annotations

import json
import os

import xxhash

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CONFIGS = ("config.json",)


def model_dir(model: str, revision: str | None = None) -> str:
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, revision=revision, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not on this disk
        raise ValueError(
            f"cachedattn connector: model {model!r} is not a local directory nor in the local hub cache "
            f"({type(e).__name__}); its weights must be readable to key the stored KV by them"
        ) from None


def weights_digest(directory: str) -> str:
    names = sorted(n for n in os.listdir(directory) if n.endswith(_WEIGHTS) or n in _CONFIGS)
    if not any(n.endswith(_WEIGHTS) for n in names):
        raise ValueError(f"cachedattn connector: no weight files ({', '.join(_WEIGHTS)}) in {directory}")
    h = xxhash.xxh3_128()
    for name in names:
        h.update(name.encode() + b"\0")
        with open(os.path.join(directory, name), "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def model_digest(model_config) -> str:
    """The weights digest of vLLM's model, with the settings that change the KV those weights give."""
    overrides = getattr(model_config, "hf_overrides", None)
    if callable(overrides):
        raise ValueError(
            "cachedattn connector: hf_overrides is a function; the connector cannot name what it changes in the "
            "model, so it cannot key stored KV by it (give the overrides as a dict)"
        )
    settings = {
        "dtype": str(getattr(model_config, "dtype", None)),
        "quantization": getattr(model_config, "quantization", None),
        "hf_overrides": overrides or None,
    }
    weights = weights_digest(model_dir(model_config.model, getattr(model_config, "revision", None)))
    h = xxhash.xxh3_128(weights.encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()
