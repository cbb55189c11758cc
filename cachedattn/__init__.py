"""cachedattn: serve multi-turn LLM conversations without recomputing their history."""

from cachedattn import native
from cachedattn.native import HAS_CUDA, HAS_URING, cuda_available
from cachedattn.store import AttentionStore, ChunkCorruptError, KVSpec, StoreConfig

__version__ = "0.1.0"

_HF = {"patch", "unpatch", "session", "batch_session", "UnsupportedModel"}
_SERVING = {"Engine", "Job", "QueueAwarePolicy", "PredictivePolicy"}


def __getattr__(name):
    # transformers is imported only when the integration is used.
    if name in _HF:
        from cachedattn import hf

        return getattr(hf, name)
    if name in _SERVING:
        from cachedattn import serving

        return getattr(serving, name)
    raise AttributeError(f"module 'cachedattn' has no attribute {name!r}")

__all__ = [
    "patch",
    "unpatch",
    "session",
    "batch_session",
    "UnsupportedModel",
    "Engine",
    "Job",
    "QueueAwarePolicy",
    "PredictivePolicy",
    "AttentionStore",
    "StoreConfig",
    "KVSpec",
    "ChunkCorruptError",
    "native",
    "HAS_CUDA",
    "HAS_URING",
    "cuda_available",
    "__version__",
]
