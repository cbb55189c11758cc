"""The remote tier's value: one Redis string per chunk, header then payload.

One value, written by one SET, so no reader ever sees half a chunk. The
header says what the chunk is (index, tokens, parent key, per-layer checksums,
layout version) and carries its own hash; the key it is stored under is the
chunk's content key, which commits to the parent key and the tokens, so a
value is checked against the key it was read from as well as its checksums.

    magic "CAKV" | u16 version | u16 0 | u32 index | u32 ntokens | u32 layers |
    u64 payload bytes | 16 B key | 16 B parent | i32 tokens[ntokens] |
    u64 checksums[layers] | u64 xxh3 of all the above | payload
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from cachedattn.store import keys

MAGIC = b"CAKV"
VERSION = 1
_FIXED = struct.Struct("<4sHHIIIQ16s16s")


class RemoteValueError(ValueError):
    """A remote value that is not a sound chunk (damaged, foreign or of another layout)."""


@dataclass
class RemoteChunk:
    index: int
    key: bytes
    parent: bytes
    tokens: np.ndarray
    checksums: list[int]
    payload: memoryview


def encode(index: int, key: bytes, parent: bytes, tokens: np.ndarray, checksums, payload) -> bytes:
    toks = np.ascontiguousarray(tokens, dtype="<i4")
    sums = np.asarray(checksums, dtype="<u8")
    payload = memoryview(payload).cast("B")
    head = _FIXED.pack(MAGIC, VERSION, 0, index, len(toks), len(sums), payload.nbytes, key, parent)
    head += toks.tobytes() + sums.tobytes()
    return b"".join((head, struct.pack("<Q", xxhash.xxh3_64_intdigest(head)), payload))


def decode(value: bytes, key: bytes, layers: int, payload_bytes: int, max_tokens: int) -> RemoteChunk:
    """The chunk in a value read under `key`; RemoteValueError unless its header is sound.
    (The payload is checked per layer against the header's checksums by the reader.)"""
    mv = memoryview(value)
    if len(mv) < _FIXED.size:
        raise RemoteValueError("value too short")
    magic, version, _, index, ntok, nl, nbytes, k, parent = _FIXED.unpack_from(mv)
    if magic != MAGIC:
        raise RemoteValueError("not a cachedattn chunk")
    if version != VERSION:
        raise RemoteValueError(f"layout version {version}, this build reads {VERSION}")
    if nl != layers or nbytes != payload_bytes or not 0 < ntok <= max_tokens:
        raise RemoteValueError("chunk of another geometry")
    end = _FIXED.size + 4 * ntok + 8 * nl
    if len(mv) != end + 8 + nbytes:
        raise RemoteValueError("value of the wrong length")
    (digest,) = struct.unpack_from("<Q", mv, end)
    if xxhash.xxh3_64_intdigest(mv[:end]) != digest:
        raise RemoteValueError("header checksum mismatch")
    tokens = np.frombuffer(mv, dtype="<i4", count=ntok, offset=_FIXED.size).astype(np.int32)
    sums = np.frombuffer(mv, dtype="<u8", count=nl, offset=_FIXED.size + 4 * ntok)
    if k != key or keys.chunk_key(parent, tokens) != key:
        raise RemoteValueError("key does not match the header's parent and tokens")
    return RemoteChunk(index, k, parent, tokens, [int(s) for s in sums], mv[end + 8 :])
