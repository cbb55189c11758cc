"""The connector's options: vLLM's ``kv_connector_extra_config``, read into
the store's own configuration (the same names as ``cachedattn serve``'s
flags), refused early and by name when wrong.

    {"host_bytes": "8G", "disk_dir": "/nvme/kv", "disk_bytes": "500G",
     "remote": "redis://host:6379", "eviction": "lru"}
"""

from __future__ import annotations

from cachedattn.store.config import StoreConfig

KNOWN = ("host_bytes", "disk_dir", "disk_bytes", "remote", "eviction", "sync_writes", "remote_ttl_s", "io_backend")


def store_config(extra: dict | None, block_tokens: int) -> StoreConfig:
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(KNOWN))
    if unknown:
        raise ValueError(f"kv_connector_extra_config: unknown option(s) {unknown}; known: {list(KNOWN)}")
    # One store chunk is one vLLM block: a block moves as one copy, and a prefix is found block by block.
    return StoreConfig(chunk_tokens=block_tokens, hugepages="off", **extra)
