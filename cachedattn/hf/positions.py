"""How a model puts positions into its cached keys, found by probing it.

Re-applying positions to stored keys (the decoupled positional encoding of
the paper) needs, per layer, the model's RoPE frequencies and layout. They
are taken from the model itself: `inv_freq` from its rotary module (per layer
type where there is one per type, e.g. Gemma3), never its cos/sin, which
carry `attention_scaling` (YaRN); then a probe checks them. Layer 0's keys of
the same tokens computed at positions p and p + d must be related by the
rotation of angle d * inv_freq, in rotate-half or interleaved layout over the
rotated dims; whichever layout reproduces them is the model's. If none does,
positions are not a rotation of the keys (learned absolute positions: gpt2,
opt, ...) and a truncated window must be recomputed; if the keys do not
depend on position at all (ALiBi: bloom, mpt, ...), they need no change.
Dynamic and longrope scaling change inv_freq with the sequence length, so
re-rotation cannot be exact there: recompute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cachedattn import kernels

ROTATE, UNCHANGED, RECOMPUTE = "rotate", "unchanged", "recompute"
_INEXACT_ROPE = {"dynamic", "longrope"}


@dataclass
class PositionScheme:
    kind: str  # ROTATE, UNCHANGED or RECOMPUTE
    reason: str
    interleaved: bool = False
    inv_freq: list[torch.Tensor] = field(default_factory=list)  # per layer, float32

    def rotate_(self, keys: torch.Tensor, layer: int, delta: int) -> torch.Tensor:
        """Moves post-RoPE keys ``[..., head_dim]`` of one layer by ``delta`` positions, in place."""
        if self.kind != ROTATE:
            raise ValueError(f"keys of this model are not re-rotated ({self.kind}: {self.reason})")
        if delta == 0:
            return keys
        src = keys.contiguous() if not keys.is_contiguous() else keys
        out = kernels.rope_rotate(src.cpu(), delta, self.inv_freq[layer], interleaved=self.interleaved)
        keys.copy_(out)
        return keys


def _rope_types(cfg) -> set[str]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return set()
    if "rope_type" in params or "type" in params:
        return {params.get("rope_type", params.get("type"))}
    return {p.get("rope_type", p.get("type")) for p in params.values() if isinstance(p, dict)}


def _inv_freqs(model, cfg, n_layers: int) -> list[torch.Tensor] | None:
    """One inv_freq per layer from the model's rotary module(s), else from the config."""
    layer_types = getattr(cfg, "layer_types", None)
    for module in model.modules():
        if layer_types and all(hasattr(module, f"{t}_inv_freq") for t in set(layer_types)):
            return [getattr(module, f"{t}_inv_freq").detach().float().cpu() for t in layer_types[:n_layers]]
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.dim() == 1:
            return [inv.detach().float().cpu()] * n_layers
    dim = getattr(cfg, "rotary_dim", None)
    if not dim:
        return None
    base = float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    return [1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))] * n_layers


def _layer0_keys(model, ids: torch.Tensor, start: int, kwarg: str) -> torch.Tensor:
    cache = DynamicCache(config=model.config)
    pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, use_cache=True, **{kwarg: cache})
    return cache.layers[0].keys.float().cpu()


def probe_positions(model, kwarg: str, n_layers: int) -> PositionScheme:
    cfg = model.config.get_text_config(decoder=True)
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    start, delta = 7, max(1, min(1000, max_pos // 2 - 16))  # stay inside learned position tables
    inexact = _rope_types(cfg) & _INEXACT_ROPE
    if inexact:
        return PositionScheme(RECOMPUTE, f"{'/'.join(sorted(inexact))} RoPE scaling changes inv_freq with length")
    ids = torch.randint(1, min(getattr(cfg, "vocab_size", 100) or 100, 1000), (1, 6),
                        generator=torch.Generator().manual_seed(1)).to(model.device)
    try:
        a = _layer0_keys(model, ids, start, kwarg)
        b = _layer0_keys(model, ids, start + delta, kwarg)
    except Exception as e:  # e.g. no position_ids argument
        return PositionScheme(RECOMPUTE, f"cannot probe positions: {type(e).__name__}: {e}")
    scale = max(1.0, a.abs().max().item())
    tol = 1e-4 * scale if a.dtype == torch.float32 and model.dtype == torch.float32 else 2e-2 * scale
    if (a - b).abs().max().item() <= tol:
        return PositionScheme(UNCHANGED, "keys do not depend on position (e.g. ALiBi): reused as they are")
    inv = _inv_freqs(model, cfg, n_layers)
    if inv is not None and 2 * inv[0].numel() <= a.shape[-1]:
        for interleaved in (False, True):
            moved = kernels.rope_rotate(a.contiguous(), delta, inv[0], interleaved=interleaved)
            if (moved - b).abs().max().item() <= tol:
                layout = "interleaved" if interleaved else "rotate-half"
                part = "" if 2 * inv[0].numel() == a.shape[-1] else f", rotary dims {2 * inv[0].numel()}/{a.shape[-1]}"
                return PositionScheme(ROTATE, f"RoPE, {layout}{part}", interleaved, inv)
    return PositionScheme(RECOMPUTE, "positions are not a rotation of the cached keys (e.g. learned absolute positions)")
