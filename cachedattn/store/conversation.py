"""What the store holds for each conversation: its chunks, and the life of
each as two small state machines.

Every legal transition is listed here, in one table each; anything else
raises IllegalTransition at once (tests assert none ever occurs). States
change only under the store lock; the I/O a transition stands for runs
outside it, between a state that says "in progress" and the one that
records its outcome.

Chunk states (where the chunk's KV is):

    HOST       host memory only (write-back, no disk tier, or the disk failed)
    WRITING    host memory, its file being written
    DEMOTING   host memory, its file being written; leaves host memory once written
    HOST_DISK  host memory and disk
    DISK       disk only
    DROPPED    nowhere the store will look again (replaced, truncated, dropped, evicted)

Conversation states:

    FOUND      chunk files found on disk at open, headers not read yet
    RESOLVING  one thread reading those headers (outside the lock)
    READY      its chunks are known
    GONE       out of the index (dropped or evicted); its last owner finishes it
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from cachedattn.store.block_pool import HostBlock


class IllegalTransition(RuntimeError):
    """A state change that the store's tables do not allow: a bug in the store."""


class ChunkState(enum.Enum):
    HOST = "host"
    WRITING = "writing"
    DEMOTING = "demoting"
    HOST_DISK = "host+disk"
    DISK = "disk"
    DROPPED = "dropped"


CHUNK_TRANSITIONS: dict[ChunkState, frozenset[ChunkState]] = {
    # a write starts (write-back demotion starts it as DEMOTING)
    ChunkState.HOST: frozenset({ChunkState.WRITING, ChunkState.DEMOTING, ChunkState.DROPPED}),
    # written / failed (the host copy stays) / demoted meanwhile
    ChunkState.WRITING: frozenset({ChunkState.HOST_DISK, ChunkState.HOST, ChunkState.DEMOTING, ChunkState.DROPPED}),
    # written (the host copy goes) / failed (the host copy stays: it is the only one)
    ChunkState.DEMOTING: frozenset({ChunkState.DISK, ChunkState.HOST, ChunkState.DROPPED}),
    # host copy evicted / file evicted for space or lost
    ChunkState.HOST_DISK: frozenset({ChunkState.DISK, ChunkState.HOST, ChunkState.DROPPED}),
    # read back into host memory (a load or prefetch adopted its block)
    ChunkState.DISK: frozenset({ChunkState.HOST_DISK, ChunkState.DROPPED}),
    ChunkState.DROPPED: frozenset(),
}
CHUNK_INITIAL = frozenset({ChunkState.HOST, ChunkState.WRITING, ChunkState.DISK})

IN_HOST = frozenset({ChunkState.HOST, ChunkState.WRITING, ChunkState.DEMOTING, ChunkState.HOST_DISK})
ON_DISK = frozenset({ChunkState.HOST_DISK, ChunkState.DISK})
WRITE_IN_FLIGHT = frozenset({ChunkState.WRITING, ChunkState.DEMOTING})


class ConvState(enum.Enum):
    FOUND = "found"
    RESOLVING = "resolving"
    READY = "ready"
    GONE = "gone"


CONV_TRANSITIONS: dict[ConvState, frozenset[ConvState]] = {
    ConvState.FOUND: frozenset({ConvState.RESOLVING, ConvState.GONE}),
    ConvState.RESOLVING: frozenset({ConvState.READY, ConvState.GONE}),
    ConvState.READY: frozenset({ConvState.GONE}),
    ConvState.GONE: frozenset(),
}


def check(table: dict, old, new, what: str) -> None:
    if new not in table[old]:
        raise IllegalTransition(f"{what}: {old.value} -> {new.value} is not a legal transition")


@dataclass(eq=False)
class Lease:
    """One owner of a conversation (an open load, append, prefetch or resolution): it keeps the
    conversation from eviction and its files from deletion. A record: the index (Index.lease,
    Index.release) takes and lets go of it, exactly once."""

    conv: Conversation
    kind: str
    released: bool = False


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
