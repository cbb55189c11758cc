"""cachedattn: serve multi-turn LLM conversations without recomputing their history."""

from cachedattn import native
from cachedattn.native import HAS_CUDA, HAS_URING, cuda_available
from cachedattn.store import AttentionStore, ChunkCorruptError, KVSpec, StoreConfig

__version__ = "0.1.0"

__all__ = [
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
