"""Turning the chunk files found at open into a conversation's chunk chain.

Run the first time a conversation is used after the store opens (so opening
costs one directory listing, not a read of every header), by the thread that
needs it, without the store lock: the conversation is RESOLVING meanwhile.

A chain is valid when every header verifies and the keys chain from the
conversation's root: chunk i's parent is chunk i-1's key, its key is the
digest of that parent and its tokens, and only its last chunk is partial.
Every file of a valid chain was fully written (files are renamed into place
complete), so its KV is what recomputing its tokens gives.

Which chain: the newest complete save. Each file name carries the
generation of the save that wrote it and whether it was that save's last
chunk (chunk_files.file_name); a valid chain from the root to such a last
chunk is a save all of whose files are on disk. The store keeps the files a
save replaced until the new save's are all written (index.Index.settle), so
a crash at any instant leaves the last complete save, or a newer one.
Without any (files of older stores, a save cut by eviction) the longest
valid chain wins. Everything else in the directory is deleted.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from cachedattn.store import keys
from cachedattn.store.chunk_files import parse_version
from cachedattn.store.conversation import Chunk
from cachedattn.store.conversation import ChunkState

log = logging.getLogger("cachedattn")


class _Headers:
    """Chunk headers read once each and checked against their file name (no store lock held)."""

    def __init__(self, disk, conv_id: str, dirname: str):
        self.disk, self.conv_id, self.dirname = disk, conv_id, dirname
        self.read: dict[str, object] = {}
        self.damaged = 0

    def valid(self, index: int, ntokens: int, key: bytes, name: str, last: bool):
        """The header of a file fit to be chunk `index` of a chain (the last one if `last`), or None."""
        if name not in self.read:
            try:
                self.read[name] = self.disk.read_header(self.dirname, name)
            except (OSError, ValueError) as e:
                log.warning("cachedattn: chunk file %s of %r is damaged (%s); removed", name, self.conv_id, e)
                self.damaged += 1
                self.read[name] = None
        h = self.read[name]
        geo = self.disk.geometry
        if h is None or not (
            h.index == index
            and h.key == key
            and len(h.tokens) == ntokens
            and h.chunk_tokens == geo.chunk_tokens
            and len(h.checksums) == geo.spec.num_layers
            and (last or ntokens == geo.chunk_tokens)
            and keys.chunk_key(h.parent, h.tokens) == key
        ):
            return None
        return h


def read_chain(disk, conv_id: str, dirname: str, root: bytes, files) -> tuple[list[Chunk], list[str], int]:
    """Reads the headers (no store lock held): (chunks, names of files to delete, damaged files)."""
    headers = _Headers(disk, conv_id, dirname)
    by_index = defaultdict(list)
    for index, ntokens, key, name in files:
        by_index[index].append((ntokens, key, name))
    for versions in by_index.values():  # newest first, then most tokens
        versions.sort(key=lambda f: (parse_version(f[2])[0], f[0]), reverse=True)
    tails = sorted((f for f in files if parse_version(f[3])[1]), key=lambda f: parse_version(f[3])[0], reverse=True)
    chain = None
    for index, ntokens, key, name in tails:
        chain = _back_from(headers, by_index, root, index, ntokens, key, name)
        if chain is not None:
            break
    if chain is None:
        chain = _longest_from_root(headers, by_index, root)
    chunks = []
    for i, (h, name) in enumerate(chain):
        gen, tail = parse_version(name)
        chunks.append(
            Chunk(i, h.tokens, h.key, h.parent, h.checksums, ChunkState.DISK, file=name, gen=max(gen, 0), tail=tail)
        )
    keep = {name for _, name in chain}
    return chunks, [name for *_, name in files if name not in keep], headers.damaged


def _back_from(headers: _Headers, by_index, root: bytes, index: int, ntokens: int, key: bytes, name: str):
    """The valid chain from the root to this save's last chunk, or None where a link is missing."""
    h = headers.valid(index, ntokens, key, name, last=True)
    if h is None:
        return None
    chain = [(h, name)]
    while index > 0:
        index -= 1
        want = chain[-1][0].parent
        found = None
        for n, k, nm in by_index.get(index, ()):
            if k == want:
                found = headers.valid(index, n, k, nm, last=False)
                if found is not None:
                    chain.append((found, nm))
                    break
        if found is None:
            return None
    if chain[-1][0].parent != root:
        return None
    return chain[::-1]


def _longest_from_root(headers: _Headers, by_index, root: bytes):
    """Without a complete save to go by: from the root, each index's newest file that chains."""
    parent, chain = root, []
    while len(chain) in by_index:
        i = len(chain)
        found = None
        for ntokens, key, name in sorted(by_index[i], key=lambda f: f[0], reverse=True):  # most tokens first
            h = headers.valid(i, ntokens, key, name, last=True)
            if h is not None and h.parent == parent:
                found = (h, name)
                break
        if found is None:
            break
        chain.append(found)
        if len(found[0].tokens) < headers.disk.geometry.chunk_tokens:
            break  # only the last chunk may be partial
        parent = found[0].key
    return chain
