"""Turning the chunk files found at open into a conversation's chunk chain.

Run the first time a conversation is used after the store opens (so opening
costs one directory listing, not a read of every header), by the thread that
needs it, without the store lock: the conversation is RESOLVING meanwhile. Walks the files by
index from the conversation's root key and keeps the longest chain whose
headers verify and whose keys chain: chunk i's parent is chunk i-1's key and
its key is the digest of that parent and its tokens. Where a crash left an
older and a newer version of the last chunk, the longer one wins. Everything
else in the directory (damaged, stale, from another chain) is deleted.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from cachedattn.store import keys
from cachedattn.store.conversation import Chunk
from cachedattn.store.state import ChunkState

log = logging.getLogger("cachedattn")


def read_chain(disk, conv_id: str, dirname: str, root: bytes, files) -> tuple[list[Chunk], list[str], int]:
    """Reads the headers (no store lock held): (chunks, names of files to delete, damaged files)."""
    geo = disk.geometry
    by_index = defaultdict(list)
    for index, ntokens, key, name in files:
        by_index[index].append((ntokens, key, name))
    parent, chunks, keep, damaged = root, [], set(), 0
    while len(chunks) in by_index:
        i = len(chunks)
        found = None
        for ntokens, key, name in sorted(by_index[i], reverse=True):  # most tokens first
            try:
                h = disk.read_header(dirname, name)
            except (OSError, ValueError) as e:
                log.warning("cachedattn: chunk file %s of %r is damaged (%s); removed", name, conv_id, e)
                damaged += 1
                continue
            if (
                h.index == i
                and h.key == key
                and h.parent == parent
                and len(h.tokens) == ntokens
                and h.chunk_tokens == geo.chunk_tokens
                and len(h.checksums) == geo.spec.num_layers
                and keys.chunk_key(parent, h.tokens) == key
            ):
                found = (h, name)
                break
        if found is None:
            break
        h, name = found
        chunks.append(Chunk(i, h.tokens, h.key, h.parent, h.checksums, ChunkState.DISK, file=name))
        keep.add(name)
        if len(h.tokens) < geo.chunk_tokens:
            break  # only the last chunk may be partial
        parent = h.key
    return chunks, [name for *_, name in files if name not in keep], damaged
