"""In-memory records of what the store holds for each conversation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cachedattn.store.block_pool import HostBlock
from cachedattn.store.state import (
    CHUNK_INITIAL,
    CHUNK_TRANSITIONS,
    CONV_TRANSITIONS,
    IN_HOST,
    ON_DISK,
    ChunkState,
    ConvState,
    IllegalTransition,
    Lease,
    check,
)


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
    state: ChunkState
    host: HostBlock | None = None  # the chunk's own reference to its block (IN_HOST states)
    file: str | None = None  # its file's name, unique to this chunk (ON_DISK states, or being written)
    gen: int = 0  # the generation of the save that made it (its file name carries it)
    tail: bool = False  # the last chunk of that save

    def __post_init__(self):
        if self.state not in CHUNK_INITIAL:
            raise IllegalTransition(f"a chunk cannot start as {self.state.value}")

    @property
    def ntokens(self) -> int:
        return len(self.tokens)

    @property
    def in_host(self) -> bool:
        return self.state in IN_HOST

    @property
    def on_disk(self) -> bool:
        return self.state in ON_DISK

    def move(self, new: ChunkState) -> None:
        """Store lock held."""
        check(CHUNK_TRANSITIONS, self.state, new, f"chunk {self.index}")
        self.state = new


@dataclass(eq=False)
class Conversation:
    id: str
    dirname: str
    root: bytes
    state: ConvState = ConvState.READY
    chunks: list[Chunk] = field(default_factory=list)
    # FOUND: chunk files found at open, read when first used: (index, ntokens, key, name).
    found: list[tuple[int, int, bytes, str]] | None = None
    owners: int = 0  # open leases (loads, appends, prefetches)
    writer: Lease | None = None  # the open append, if any (one at a time)
    writes: int = 0  # chunk writes in flight into this conversation's directory
    doomed: list[str] = field(default_factory=list)  # files to delete once no owner may read them
    # Files of chunks a save replaced: the last complete save on disk, kept until every current
    # chunk has its file (a crash in between reopens the old save, never less).
    superseded: list[str] = field(default_factory=list)

    @property
    def ntokens(self) -> int:
        return sum(c.ntokens for c in self.chunks)

    def tokens(self) -> np.ndarray:
        if not self.chunks:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate([c.tokens for c in self.chunks])

    def move(self, new: ConvState) -> None:
        """Store lock held."""
        check(CONV_TRANSITIONS, self.state, new, f"conversation {self.id!r}")
        self.state = new

    def lease(self, kind: str) -> Lease:
        """Store lock held."""
        if self.state is ConvState.GONE:
            raise IllegalTransition(f"lease on gone conversation {self.id!r}")
        self.owners += 1
        lease = Lease(self, kind)
        if kind == "append":
            self.writer = lease
        return lease

    def host_chunks(self) -> list[Chunk]:
        return [c for c in self.chunks if c.in_host]

    def disk_chunks(self) -> list[Chunk]:
        return [c for c in self.chunks if c.on_disk]

    def all_on_disk(self) -> bool:
        return all(c.on_disk for c in self.chunks)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n
