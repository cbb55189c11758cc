"""In-memory records of what the store holds for each conversation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cachedattn.store.host_tier import HostBlock


@dataclass(eq=False)
class Chunk:
    """Up to chunk_tokens tokens of KV, all layers. Immutable once committed:
    extending a partial chunk makes a new Chunk (copy on write), so loads and
    disk writes of the old one never see it change."""

    index: int
    tokens: np.ndarray
    key: bytes
    parent: bytes
    checksums: list[int]
    host: HostBlock | None = None  # the chunk's own reference to its block
    file: str | None = None  # chunk file name once published on disk
    writing: bool = False  # a write to disk is in flight
    supersedes: str | None = None  # older file of the same index, deleted once this one is on disk
    evict_after_write: bool = False  # demoted while its write was in flight: leave host memory once on disk
    live: bool = True  # False once replaced, dropped or evicted from both tiers

    @property
    def ntokens(self) -> int:
        return len(self.tokens)


@dataclass(eq=False)
class Conversation:
    id: str
    dirname: str
    root: bytes
    chunks: list[Chunk] = field(default_factory=list)
    # Chunk files found at open, validated on first use: (index, ntokens, key, name).
    unresolved: list[tuple[int, int, bytes, str]] | None = None
    pins: int = 0  # open loads and appends
    appending: bool = False
    dropped: bool = False

    @property
    def ntokens(self) -> int:
        return sum(c.ntokens for c in self.chunks)

    def tokens(self) -> np.ndarray:
        if not self.chunks:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate([c.tokens for c in self.chunks])

    def host_chunks(self) -> list[Chunk]:
        return [c for c in self.chunks if c.host is not None]

    def evictable_host_chunks(self) -> list[Chunk]:
        """Host copies that may go now: a chunk still being written keeps its copy until it is on disk."""
        return [c for c in self.chunks if c.host is not None and not c.writing]

    def disk_chunks(self) -> list[Chunk]:
        return [c for c in self.chunks if c.file is not None]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n
