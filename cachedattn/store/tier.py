"""The interface every tier implements (host memory, local disk; a remote
store later), in the spirit of LMCache's storage backends.

A tier stores whole chunks, named by their conversation and chunk record.
Bookkeeping (capacity, used, contains, reserve/unreserve) is cheap and is
called under the store lock; data movement (get_into, put_from, remove) may
block on I/O and is never called under it. Tiers know nothing of chunk
states, eviction or each other: cachedattn.store.tiering moves chunks between
them and asks the eviction policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Tier(ABC):
    name = "tier"

    @abstractmethod
    def capacity(self) -> int:
        """Bytes this tier may hold (a hard limit)."""

    @abstractmethod
    def used(self) -> int:
        """Bytes held or reserved now."""

    @abstractmethod
    def contains(self, conv, chunk) -> bool:
        """Whether the chunk has a copy in this tier (from the store's records)."""

    @abstractmethod
    def get_into(self, conv, chunk, block) -> None:
        """Copies the chunk into a host block, verified; raises OSError when it cannot."""

    @abstractmethod
    def put_from(self, conv, chunk, block):
        """Stores the chunk from a host block; returns its location in this tier."""

    @abstractmethod
    def remove(self, conv, chunk) -> None:
        """Lets go of the chunk's copy in this tier."""

    def reserve(self) -> bool:
        """Claims room for one chunk before a put; False when full."""
        return True

    def unreserve(self) -> None:
        """Gives back a claim (a put that failed or was abandoned, a chunk removed)."""
