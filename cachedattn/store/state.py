"""The life of a chunk and of a conversation, as two small state machines.

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


class Lease:
    """One owner of a conversation (an open load, append or prefetch): it keeps the
    conversation from eviction and its files from deletion. Released exactly once."""

    __slots__ = ("conv", "kind", "released")

    def __init__(self, conv, kind: str):
        self.conv = conv
        self.kind = kind
        self.released = False

    def release(self) -> None:
        """Lock held by the caller."""
        if self.released:
            raise IllegalTransition(f"{self.kind} lease on conversation {self.conv.id!r} released twice")
        self.released = True
        self.conv.owners -= 1
        if self.conv.writer is self:
            self.conv.writer = None
