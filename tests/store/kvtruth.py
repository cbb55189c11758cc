"""KV that is a function of (token id, position) only: whatever prefix of whatever
version of a conversation the store serves, the truth for it is known."""

import numpy as np
import torch

from .conftest import SPEC


def truth_kv(tokens, start: int = 0, spec=SPEC):
    """K and V of tokens[start:], per layer, [kv_heads, n, head_dim]."""
    toks = np.asarray(tokens, dtype=np.int64)[start:]
    pos = np.arange(start, start + len(toks), dtype=np.int64)
    out = []
    for layer, (h, d) in enumerate(spec.layers):
        grid = (toks[None, :, None] * 31 + pos[None, :, None] * 7 + np.arange(h)[:, None, None] * 3
                + np.arange(d)[None, None, :] + layer * 1000) % 997
        k = torch.from_numpy(grid.astype(np.float32) / 997.0).to(spec.dtype)
        out.append((k, -k))
    return out


def check_load(ld, tokens, spec=SPEC):
    """Every layer of an open load equals the truth of tokens[:ld.n_tokens]."""
    want = truth_kv(tokens[: ld.n_tokens], spec=spec)
    for layer, (wk, wv) in enumerate(want):
        k, v = ld.read_layer(layer)
        assert torch.equal(k, wk) and torch.equal(v, wv), f"layer {layer} differs from the truth"
