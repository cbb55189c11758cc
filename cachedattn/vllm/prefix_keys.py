"""Content keys of a token prefix, block by block: how the vLLM connector
finds KV without a conversation id.

Block i's key is a digest of block i-1's key and block i's tokens, so a key
names the whole prefix up to the end of its block: two requests share block
i's KV exactly when they share every token before it. The chain starts at a
namespace that names the model's weights, the KV dtype, the paged layout and
the block size, so KV is never found for other weights or another layout.

The digest is unsalted blake2b (keyed only by a fixed personalisation
string): the same prefix gives the same key in every process and on every
machine, which is what lets a second vLLM instance find, through Redis, what
the first stored.
"""

from __future__ import annotations

import hashlib

import numpy as np

KEY_PREFIX = "kv-"  # store conversation ids of content-keyed blocks start with this


def namespace(model_digest: str, dtype: str, layout: str, block_tokens: int) -> bytes:
    if not model_digest:
        raise ValueError("namespace: a model digest is required (KV is never served to other weights)")
    if block_tokens <= 0:
        raise ValueError(f"namespace: block_tokens must be positive, got {block_tokens}")
    text = f"cachedattn-prefix-v1\0{model_digest}\0{dtype}\0{layout}\0{block_tokens}"
    return hashlib.blake2b(text.encode(), digest_size=16, person=b"ca-prefix-ns").digest()


def salted(ns: bytes, salt: str | None) -> bytes:
    """The namespace of requests carrying vLLM's cache_salt: they share KV only with the same salt."""
    if salt is None:
        return ns
    h = hashlib.blake2b(ns, digest_size=16, person=b"ca-prefix-salt")
    h.update(salt.encode("utf-8", "surrogatepass"))
    return h.digest()


def block_keys(ns: bytes, token_ids, block_tokens: int, n_blocks: int | None = None, known: list[str] = ()) -> list[str]:
    """Keys of the first `n_blocks` whole blocks of token_ids (all whole blocks when None). `known`: keys
    of leading blocks of these tokens computed before; the chain goes on from the last of them."""
    toks = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int64).reshape(-1), dtype="<i8")
    whole = len(toks) // block_tokens
    n = whole if n_blocks is None else min(n_blocks, whole)
    out = list(known[:n])
    parent = bytes.fromhex(out[-1][len(KEY_PREFIX) :]) if out else ns
    for i in range(len(out), n):
        h = hashlib.blake2b(parent, digest_size=16, person=b"ca-prefix-blk")
        h.update(toks[i * block_tokens : (i + 1) * block_tokens].tobytes())
        parent = h.digest()
        out.append(KEY_PREFIX + parent.hex())
    return out
