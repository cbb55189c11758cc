"""Host memory: chunk blocks from one pinned pool, reference counted so a block
goes back to the pool only when its last user (the chunk itself, a load
copying out of it, a disk write reading it) lets go.

Not a tier: every tier reads into and writes from these blocks (tier.py). A
chunk's host copy is its own reference to a block (Chunk.host)."""

from __future__ import annotations

import threading

import torch

from cachedattn import native
from cachedattn.store import lock_order
from cachedattn.transfer import checkpoints


class HostMemoryFull(RuntimeError):
    """Every host block is in use by loads or appends that are still open."""


class HostBlock:
    __slots__ = ("_tier", "block", "refs", "_view")

    def __init__(self, tier: BlockPool, block):
        self._tier = tier
        self.block = block
        self.refs = 1
        self._view = None

    @property
    def ptr(self) -> int:
        return self.block.ptr

    def view(self) -> torch.Tensor:
        """The whole block as a uint8 tensor (zero-copy)."""
        if self._view is None:
            self._view = torch.frombuffer(self.block, dtype=torch.uint8)
        return self._view

    def acquire(self) -> HostBlock:
        with self._tier.cond:
            if self.refs <= 0:
                raise RuntimeError("host block used after release")
            self.refs += 1
        return self

    def release(self) -> None:
        with self._tier.cond:
            if self.refs == 1:
                checkpoints.host_release(self.block.ptr, self.block.nbytes)  # no block freed under a pending copy
            self.refs -= 1
            if self.refs == 0:
                self._view = None
                self._tier.pool.free(self.block)
                self._tier.cond.notify_all()
            elif self.refs < 0:
                raise RuntimeError("host block released twice")


class BlockPool:
    def __init__(self, capacity_bytes: int, block_bytes: int, hugepages: str):
        self.pool = native.HostPool(capacity_bytes, block_bytes, hugepages=hugepages)
        self.cond = threading.Condition(lock_order.ordered(threading.RLock(), lock_order.HOST_POOL, "host pool"))

    def capacity(self) -> int:
        return self.capacity_blocks * self.block_bytes

    def used(self) -> int:
        return self.used_blocks * self.block_bytes

    @property
    def block_bytes(self) -> int:
        return self.pool.block_bytes

    @property
    def capacity_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    def try_alloc(self) -> HostBlock | None:
        with self.cond:
            b = self.pool.alloc()
        return None if b is None else HostBlock(self, b)

    def close(self) -> None:
        self.pool.close()
