"""Context-window overflow without recompute (the paper's decoupled positional
encoding).

When a turn's history + new tokens would exceed `max_context`, the oldest
tokens are dropped: `truncate_ratio` of the window at a time, rounded up to
whole chunks, starting right after the first `keep_first` tokens (attention
sinks or a system prompt), as often as needed. The stored KV of what is kept is
then rewritten in the store for its new positions:

- policy "reapply" (default, CA in the paper): keys after the dropped span are
  rotated by -dropped, layer by layer with that layer's own RoPE (frequencies
  and layout, PositionScheme); keys of layers without RoPE (NoPE layers of
  cohere2, smollm3, llama4) stay as they are, and the first `keep_first`
  tokens keep theirs. Only layer 0 is exact: deeper layers still carry context
  of the dropped tokens, which is the paper's trade-off. Models whose keys do
  not hold positions (ALiBi) reuse the keys as they are; models where rotation
  cannot be exact (learned absolute positions, dynamic or longrope scaling, a
  layer the probe cannot explain) recompute the window instead, and say so.
- policy "recompute" (TT): the kept window is computed from scratch.
- policy "keep" (NKVT, for experiments): the stored keys are reused without
  re-applying positions, which is wrong; it exists to measure how wrong.
"""

from __future__ import annotations

import logging
import math

import torch

from cachedattn.hf.positions import RECOMPUTE, ROTATE, UNCHANGED
from cachedattn.transfer import streams

log = logging.getLogger("cachedattn")
POLICIES = ("reapply", "recompute", "keep")


def plan_drop(length: int, extra: int, window: int, ratio: float, keep_first: int, chunk: int) -> int:
    """Tokens to drop after the first keep_first so that length - drop + extra fits the window."""
    if length + extra <= window:
        return 0
    step = max(chunk, math.ceil(ratio * window / chunk) * chunk)
    drop = math.ceil((length + extra - window) / step) * step
    # Keep at least one token after the sinks, so the turn has something to compute.
    return min(drop, max(0, length - keep_first - 1))


def truncate_turn(session, input_ids: torch.Tensor, extra: int) -> tuple[torch.Tensor, int, str]:
    """(kept ids, tokens dropped, what happened to the stored KV)."""
    o = session.options
    st = session.patched
    window = o["max_context"]
    chunk = st.store.config.chunk_tokens
    if o["keep_first"] + extra >= window:
        raise ValueError(f"keep_first={o['keep_first']} plus {extra} new tokens leave no room in max_context={window}")
    drop = plan_drop(input_ids.shape[1], extra, window, o["truncate_ratio"], o["keep_first"], chunk)
    if drop == 0:
        return input_ids, 0, ""
    k = o["keep_first"]
    kept = torch.cat([input_ids[:, :k], input_ids[:, k + drop :]], 1)
    stored = st.store.lookup(session.conv_id, input_ids[0])
    scheme = st.positions
    policy = o["position_policy"]
    if policy == "reapply" and scheme.kind == RECOMPUTE:
        policy, note = "recompute", f"recomputed the kept window: {scheme.reason}"
    elif policy == "recompute":
        note = "recomputed the kept window (policy)"
    elif policy == "keep":
        note = "reused keys WITHOUT re-applying positions (policy 'keep', experiments only)"
    else:
        note = "reused keys as they are (" + scheme.reason + ")" if scheme.kind == UNCHANGED else "re-rotated stored keys"
    if policy == "recompute" or stored <= k + drop:
        if session.conv_id in st.store:
            st.store.drop(session.conv_id)
        if policy != "recompute":
            note = "nothing stored after the dropped span: the window is computed"
    else:
        try:
            _rewrite(session, input_ids, kept, stored, drop, rotate=policy == "reapply" and scheme.kind == ROTATE)
        except Exception as e:  # e.g. host memory full: the cache's trouble, never the turn's
            st.store.drop(session.conv_id)
            note = f"the kept window is computed (its KV could not be rewritten: {type(e).__name__}: {e})"
    log.info("cachedattn: %r overflowed max_context=%d: dropped %d tokens; %s", session.conv_id, window, drop, note)
    return kept, drop, note


def _rewrite(session, input_ids, kept, stored: int, drop: int, rotate: bool) -> None:
    """Replaces the stored conversation by the kept window's KV at its new positions."""
    st = session.patched
    store, spec, k = st.store, st.kv.spec, session.options["keep_first"]
    engine, device = _gpu_engine(session)
    with store.load(session.conv_id, stored) as ld:
        stored = ld.n_tokens  # fewer when host memory ran out meanwhile
        if stored <= k + drop:  # nothing after the dropped span: the window is computed
            store.drop(session.conv_id)
            return
        n_kept = stored - drop  # tokens of the kept window that have stored KV
        layers = []
        for layer in range(spec.num_layers):
            keys, values = ld.read_layer(layer)
            keys = torch.cat([keys[:, :k], keys[:, k + drop :]], 1)
            values = torch.cat([values[:, :k], values[:, k + drop :]], 1)
            layers.append((keys, values))
    if rotate and engine is not None:
        _rotate_on_gpu(st.positions, [keys[:, k:] for keys, _ in layers], -drop, engine, device)
    elif rotate:
        for layer, (keys, _) in enumerate(layers):
            st.positions.rotate_(keys[:, k:], layer, -drop)
    with store.begin_append(session.conv_id, kept[0, :n_kept], start=0) as txn:
        for layer, (keys, values) in enumerate(layers):
            txn.put_layer(layer, keys, values)
        txn.commit()


def _gpu_engine(session):
    """(copy engine, its device) of a model served on a GPU (or a simulated one), else (None, None)."""
    return session.path.cuda_engine()


def _rotate_on_gpu(positions, kept_keys: list[torch.Tensor], delta: int, engine, device) -> None:
    """Re-rotates every layer's kept keys on the GPU, in place in the host tensors.

    The CPU reference rotates a 4K-token window of an 8B model (268 MB of keys)
    in a good fraction of a second; the kernel does it in well under a
    millisecond per layer, so the cost is the copies: all layers up, rotated on
    the engine's stream after the upload, one host wait, all layers back."""
    on_gpu = [torch.empty(keys.shape, dtype=keys.dtype, device=device).copy_(keys) for keys in kept_keys]
    for layer, g in enumerate(on_gpu):
        positions.rotate_(g, layer, delta, engine=engine)
    engine.synchronize("h2d")  # the kernels ran on the engine's stream: done before the copies back
    for keys, g in zip(kept_keys, on_gpu):
        keys.copy_(g)
