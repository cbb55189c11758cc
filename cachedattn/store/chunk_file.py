"""The on-disk form of one chunk: a header, then the chunk block.

    [header: header_bytes, 4 KiB aligned][block: ChunkGeometry.block_bytes]

The header holds the chunk's key, its parent's key, its token ids and one
xxh3-64 checksum per layer of the block, and checksums itself. A chunk file is
written under a temporary name and renamed into place once all of it is
written, so a crash leaves either a complete file or a temporary one (deleted
at the next open); the checksums catch damage after that.

File name: ``{index:08d}.{ntokens:05d}.{key hex}.{generation:016x}{tail}{random:06x}.kv``
inside the conversation's directory. The key names the content; the generation
(one per save, increasing, also across restarts) names this one write of it,
so that rewriting a chunk (the same turn twice, a conversation dropped and
stored anew) never produces the name of a file that something may still
delete, and recovery can tell the newest complete save; tail is 1 on the last
chunk of its save; the random part tells two writes of one chunk apart. Names with a random version or none (older stores) are
read too, ranked oldest.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from cachedattn.store.spec import FORMAT_VERSION, round_up

MAGIC = b"CAKVCHNK"
# magic, version, header_bytes, chunk_tokens, ntokens, num_layers, index, key, parent
_FIXED = struct.Struct("<8sIIIIIQ16s16s")
SUFFIX = ".kv"
TMP_PREFIX = ".tmp-"


def header_bytes(num_layers: int, chunk_tokens: int) -> int:
    return round_up(_FIXED.size + 8 * num_layers + 4 * chunk_tokens + 8)


class ChunkCorruptError(OSError):
    """A stored chunk failed its checksum or could not be read; it was removed."""


def file_name(index: int, ntokens: int, key: bytes, gen: int, tail: bool) -> str:
    """A fresh chunk file name. Its version: the generation of the save that made the chunk
    (16 hex digits, increasing across saves and restarts), whether the chunk was that save's
    last (a chain from the root to such a chunk is a complete save: recovery.py), and 6
    random hex digits, so that writing the same chunk again (after its file was evicted)
    never makes the name of a file whose deletion may still be pending."""
    return f"{index:08d}.{ntokens:05d}.{key.hex()}.{gen:016x}{int(bool(tail))}{os.urandom(3).hex()}{SUFFIX}"


def parse_version(name: str) -> tuple[int, bool]:
    """(generation, is a save's last chunk) of a chunk file name; (-1, False) for names
    of older stores (a random version, or none), which rank below every generation."""
    parts = name[: -len(SUFFIX)].split(".")
    if len(parts) == 4 and len(parts[3]) == 23 and parts[3][16] in "01":
        return int(parts[3][:16], 16), parts[3][16] == "1"
    return -1, False


def parse_file_name(name: str) -> tuple[int, int, bytes] | None:
    """(index, ntokens, key) from a chunk file name, or None if it is not one."""
    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    parts = name[: -len(SUFFIX)].split(".")
    if len(parts) not in (3, 4) or len(parts[2]) != 32:
        return None
    if len(parts) == 4 and not (parts[3] and all(ch in "0123456789abcdef" for ch in parts[3])):
        return None
    try:
        return int(parts[0]), int(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        return None


@dataclass
class ChunkHeader:
    index: int
    key: bytes
    parent: bytes
    tokens: np.ndarray  # int32
    checksums: list[int]  # one per layer
    chunk_tokens: int

    def encode(self) -> bytes:
        size = header_bytes(len(self.checksums), self.chunk_tokens)
        body = (
            _FIXED.pack(
                MAGIC,
                FORMAT_VERSION,
                size,
                self.chunk_tokens,
                len(self.tokens),
                len(self.checksums),
                self.index,
                self.key,
                self.parent,
            )
            + struct.pack(f"<{len(self.checksums)}Q", *self.checksums)
            + np.ascontiguousarray(self.tokens, dtype="<i4").tobytes()
        )
        body += struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
        return body + bytes(size - len(body))

    @classmethod
    def decode(cls, data: bytes) -> ChunkHeader:
        """Parses and verifies a header; ValueError names what is wrong."""
        if len(data) < _FIXED.size:
            raise ValueError("chunk header is truncated")
        magic, version, size, chunk_tokens, ntokens, nlayers, index, key, parent = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise ValueError("not a cachedattn chunk (bad magic)")
        if version != FORMAT_VERSION:
            raise ValueError(f"chunk format version {version}, this build reads {FORMAT_VERSION}")
        end = _FIXED.size + 8 * nlayers + 4 * ntokens
        if ntokens > chunk_tokens or end + 8 > min(size, len(data)):
            raise ValueError("chunk header sizes are inconsistent")
        (stored,) = struct.unpack_from("<Q", data, end)
        if xxhash.xxh3_64_intdigest(data[:end]) != stored:
            raise ValueError("chunk header checksum mismatch")
        checksums = list(struct.unpack_from(f"<{nlayers}Q", data, _FIXED.size))
        tokens = np.frombuffer(data, dtype="<i4", count=ntokens, offset=_FIXED.size + 8 * nlayers).astype(np.int32)
        return cls(index, key, parent, tokens, checksums, chunk_tokens)


def layer_checksum(block_u8_view) -> int:
    return xxhash.xxh3_64_intdigest(block_u8_view)

