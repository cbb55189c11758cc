"""What a tier offers the store: chunks carried in and out of host blocks, one
layer at a time.

    reader = tier.open_read(conv, chunks)      # a load's chunks that are not in host memory
    reader.read_layer(layer, blocks).wait()     # that layer's bytes of each chunk, into its block
    reader.close()

    writer = tier.open_write(conv, n)           # an append's n new chunks, written as layers arrive
    writer.write_layer(layer, blocks)           # submitted; the writer waits for it at its end
    writer.finish(chunks) -> [(name, error)]    # complete, durable, published; or
    writer.abandon()                            # nothing of it stays

    tier.write_chunk(conv, chunk, block) -> name  # a whole chunk at once (demotion, write-through)

Loads (load.py) and appends (append.py) see only this; the disk tier
(disk_tier.py, files in chunk_files.py) implements all of it and the remote
tier (remote_tier.py) the reading and whole-chunk writing. Host memory is not
a tier: it is the block pool every tier reads into and writes from
(block_pool.py). Tiers keep no bookkeeping of their own: what is where, and
how much room is left, is the index's (index.py). Nothing here is called with
the store lock held.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Batch(ABC):
    """I/O submitted for one layer: wait() raises OSError (its filename names the chunk) on failure."""

    @abstractmethod
    def wait(self) -> None: ...

    @abstractmethod
    def done(self) -> bool: ...


class ChunkReader(ABC):
    #: chunks opened, from the first: fewer than asked when `open_error` stopped the opening
    opened: int
    #: why chunk `opened` could not be opened (None when all were)
    open_error: OSError | None

    @abstractmethod
    def read_layer(self, layer: int, blocks: list) -> Batch:
        """Starts reading one layer of each opened chunk into its block (blocks[i] for chunk i)."""

    @abstractmethod
    def position(self, err: OSError) -> int | None:
        """Which chunk a read error is about (None when it cannot tell)."""

    @abstractmethod
    def path(self, i: int) -> str:
        """Where chunk i lives, for messages."""

    @abstractmethod
    def close(self) -> None: ...


class ChunkWriter(ABC):
    @abstractmethod
    def write_layer(self, layer: int, blocks: list) -> None:
        """Starts writing one layer of each new chunk from its block."""

    @abstractmethod
    def finish(self, chunks: list) -> list[tuple[str | None, OSError | None]]:
        """Waits for the layers, completes each chunk's record and publishes it:
        (its name, None) or (None, the error), per chunk."""

    @abstractmethod
    def abandon(self) -> None:
        """Waits for the layers in flight (they read the blocks), then removes what was written."""


class Tier(ABC):
    name = "tier"

    @abstractmethod
    def open_read(self, conv, chunks: list) -> ChunkReader: ...

    @abstractmethod
    def write_chunk(self, conv, chunk, block) -> str:
        """Stores a whole chunk from a host block; returns its name in this tier."""

    def open_write(self, conv, n: int) -> ChunkWriter:
        raise NotImplementedError(f"the {self.name} tier stores whole chunks only (write_chunk)")
