"""Which weights vLLM runs: a digest of the model directory's weight files
and config, the namespace of every key the connector stores (KV is never
served to other weights, nor found by them).

The files are hashed whole (xxh3-128, a few GB/s), once per process: an 8B
model costs a few seconds at start. A model given by hub id is found in the
local hub cache; one that is not on disk at all is refused, naming why.
"""

from __future__ import annotations

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
