"""The one record codec of a stored chunk: a header, then the chunk's payload (its block).

The header holds the chunk's index, its key, its parent's key, its token ids
and one xxh3-64 checksum per layer of the payload, and checksums itself.

    [header][payload: ChunkGeometry.block_bytes]

A chunk file pads the header to header_bytes (4 KiB aligned, so the payload
can be read with direct I/O into a block); a remote value is the header
unpadded followed by the payload, one value written by one SET, so no reader
ever sees half a chunk. Both are checked the same way: the header's own
checksum, the key against the parent and tokens (a key commits to a whole
prefix), and each layer of the payload against its checksum before any byte
of it is used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from cachedattn.store import keys
from cachedattn.store.spec import FORMAT_VERSION, round_up

MAGIC = b"CAKVCHNK"
# magic, version, header_bytes, chunk_tokens, ntokens, num_layers, index, key, parent
_FIXED = struct.Struct("<8sIIIIIQ16s16s")


def header_bytes(num_layers: int, chunk_tokens: int) -> int:
    return round_up(_FIXED.size + 8 * num_layers + 4 * chunk_tokens + 8)


class ChunkCorruptError(OSError):
    """A stored chunk failed its checksum or could not be read; it was removed."""


@dataclass
class ChunkHeader:
    index: int
    key: bytes
    parent: bytes
    tokens: np.ndarray  # int32
    checksums: list[int]  # one per layer
    chunk_tokens: int

    def encode(self, pad: bool = True) -> bytes:
        """The header; padded to header_bytes (a file's) or not (a remote value's)."""
        full = header_bytes(len(self.checksums), self.chunk_tokens)
        size = full if pad else _FIXED.size + 8 * len(self.checksums) + 4 * len(self.tokens) + 8
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
    def decode(cls, data) -> ChunkHeader:
        """Parses and verifies a header; ValueError names what is wrong."""
        return cls.decode_sized(data)[0]

    @classmethod
    def decode_sized(cls, data) -> tuple[ChunkHeader, int]:
        """(the header, its size in bytes: where the payload starts)."""
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
        return cls(index, key, parent, tokens, checksums, chunk_tokens), size


def layer_checksum(block_u8_view) -> int:
    return xxhash.xxh3_64_intdigest(block_u8_view)


def bad_layer(geometry, payload, checksums) -> int | None:
    """The first layer of a chunk's payload (uint8, numpy or torch) that fails its checksum, or None."""
    for layer, (o, s) in enumerate(zip(geometry.layer_offset, geometry.layer_stride)):
        if layer_checksum(payload[o : o + s]) != checksums[layer]:
            return layer
    return None


def encode_value(header: ChunkHeader, payload) -> bytes:
    """A remote value: the unpadded header, then the payload."""
    return b"".join((header.encode(pad=False), memoryview(payload).cast("B")))


def decode_value(value, key: bytes, geometry) -> tuple[ChunkHeader, memoryview]:
    """(header, payload) of a remote value read under `key`; ValueError unless the header is
    sound, of this geometry and of this key (the payload's layers are checked by the reader)."""
    mv = memoryview(value)
    h, size = ChunkHeader.decode_sized(mv)
    if h.chunk_tokens != geometry.chunk_tokens or len(h.checksums) != geometry.spec.num_layers or not h.tokens.size:
        raise ValueError("chunk of another geometry")
    if len(mv) != size + geometry.block_bytes:
        raise ValueError("value of the wrong length")
    if h.key != key or keys.chunk_key(h.parent, h.tokens) != key:
        raise ValueError("key does not match the header's parent and tokens")
    return h, mv[size:]
