"""The connector's options: vLLM's ``kv_connector_extra_config``, read into
the store's own configuration (the same names as ``cachedattn serve``'s
flags) and the connector's own, refused early and by name when wrong.

    {"host_bytes": "8G", "disk_dir": "/nvme/kv", "disk_bytes": "500G",
     "remote": "redis://host:6379", "eviction": "lru", "loads": "sync"}

``loads`` (the CPU plan; the GPU plan's are always "sync"):

- ``sync`` (default): a request's blocks are copied into vLLM's paged KV in
  the step that schedules it; its lookup, while it waits in vLLM's queue,
  brought them into host memory first;
- ``async``: the copy also runs while the request waits, and vLLM schedules
  it a step after the copy is reported: the running batch never waits for a
  copy, and each hit waits more steps.
"""

from __future__ import annotations

from cachedattn.store.config import StoreConfig

STORE = ("host_bytes", "disk_dir", "disk_bytes", "remote", "eviction", "sync_writes", "remote_ttl_s", "io_backend")
CONNECTOR = ("loads",)
LOADS = ("sync", "async")


def store_config(extra: dict | None, block_tokens: int) -> StoreConfig:
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(STORE) - set(CONNECTOR))
    if unknown:
        raise ValueError(f"kv_connector_extra_config: unknown option(s) {unknown}; known: {list(STORE + CONNECTOR)}")
    for name in CONNECTOR:
        extra.pop(name, None)
    # One store chunk is one vLLM block: a block moves as one copy, and a prefix is found block by block.
    return StoreConfig(chunk_tokens=block_tokens, hugepages="off", **extra)


def sync_loads(extra: dict | None) -> bool:
    mode = (extra or {}).get("loads", "sync")
    if mode not in LOADS:
        raise ValueError(f"kv_connector_extra_config: loads must be one of {list(LOADS)}, got {mode!r}")
    return mode == "sync"
