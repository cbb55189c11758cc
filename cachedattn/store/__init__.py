"""The tiered KV store (host memory + disk)."""

from cachedattn.store.append import KVAppend
from cachedattn.store.config import StoreConfig
from cachedattn.store.eviction import EvictionPolicy, FIFOPolicy, LRUPolicy, QueueView, register_policy
from cachedattn.store.block_pool import HostMemoryFull
from cachedattn.store.load import ChunkCorruptError, KVLoad
from cachedattn.store.spec import KVSpec
from cachedattn.store.store import AttentionStore

__all__ = [
    "AttentionStore",
    "StoreConfig",
    "KVSpec",
    "KVAppend",
    "KVLoad",
    "EvictionPolicy",
    "LRUPolicy",
    "FIFOPolicy",
    "register_policy",
    "QueueView",
    "HostMemoryFull",
    "ChunkCorruptError",
]
