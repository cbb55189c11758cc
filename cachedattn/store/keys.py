"""Deterministic names and keys: the same on every process and machine.

A conversation's root key commits to the model fingerprint and its id; each
chunk's key chains its parent's key with the chunk's token ids, so a key names
a whole prefix. Conversation directories are digests of the id, so no id,
whatever it holds ('/', '..', NUL, ...), can name a path outside the store.
"""

from __future__ import annotations

import hashlib

import numpy as np

MAX_ID_BYTES = 4096


def validate_conversation_id(conv_id: object) -> str:
    if not isinstance(conv_id, str):
        raise TypeError(f"conversation id must be a str, got {type(conv_id).__name__}")
    if not conv_id:
        raise ValueError("conversation id must not be empty")
    if "\0" in conv_id:
        raise ValueError("conversation id must not contain NUL")
    try:
        n = len(conv_id.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"conversation id is not valid unicode: {e}") from None
    if n > MAX_ID_BYTES:
        raise ValueError(f"conversation id is {n} bytes long; the limit is {MAX_ID_BYTES}")
    return conv_id


def conversation_dirname(conv_id: str) -> str:
    return hashlib.blake2b(conv_id.encode("utf-8"), digest_size=16, person=b"ca-conv-dir").hexdigest()


def root_key(fingerprint: str, conv_id: str) -> bytes:
    return hashlib.blake2b(f"{fingerprint}\0{conv_id}".encode(), digest_size=16, person=b"ca-conv-root").digest()


def chunk_key(parent: bytes, tokens: np.ndarray) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16, person=b"ca-chunk")
    h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    return h.digest()


def as_token_array(token_ids) -> np.ndarray:
    """Token ids as a 1-D int32 array (ids must fit: every vocabulary does)."""
    if hasattr(token_ids, "detach"):  # a torch tensor
        token_ids = token_ids.detach().cpu().numpy()
    arr = np.asarray(token_ids)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"token ids must be 1-D (or [1, n]), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**31):
        raise ValueError("token ids must lie in [0, 2**31)")
    return arr.astype(np.int32, copy=False)
