"""How a model puts positions into its cached keys, found by probing every layer.

Re-applying positions to stored keys (the decoupled positional encoding of
the paper) needs, per layer, whether the layer's keys carry RoPE at all and if
so its frequencies and layout. Layers of one model differ: cohere2, smollm3
and llama4 leave some layers without RoPE (NoPE), Gemma3 keeps one inv_freq
per layer type, partial rotary and interleaved layouts exist. So every layer
is probed on its own.

The probe runs single tokens at positions p and p + d. A one-token sequence
attends only to itself (softmax over one key is exactly 1), so with RoPE or
NoPE the hidden state entering every layer does not depend on the position;
layer i's cached key at p + d is then layer i's key at p rotated by d with
that layer's RoPE, or the same key for a NoPE layer. Candidate frequencies are
the model's own `inv_freq` buffers (every rotary module, every layer type),
never its cos/sin, which carry `attention_scaling` (YaRN); a layer gets the
first candidate and layout (rotate-half or interleaved pairs, over all or the
leading head dims) that reproduces its probed keys. A layer that matches none
(learned absolute positions bake position into the hidden state: gpt2, opt,
...) makes the whole model's overflow recompute, with the reason. If no layer
depends on position (ALiBi: bloom, mpt, ...), keys need no change. Dynamic
and longrope scaling change inv_freq with the sequence length, so re-rotation
cannot be exact there: recompute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cachedattn import kernels
from cachedattn.transfer import streams

ROTATE, UNCHANGED, RECOMPUTE = "rotate", "unchanged", "recompute"
_INEXACT_ROPE = {"dynamic", "longrope"}
PROBE_BATCH = 4  # independent one-token sequences: more key vectors to match, one forward


@dataclass(frozen=True)
class LayerPositions:
    """How one layer's cached keys hold positions: ROTATE (with inv_freq, layout) or UNCHANGED (NoPE)."""

    kind: str
    inv_freq: torch.Tensor | None = None  # float32, rotary_dim / 2 entries
    interleaved: bool = False

    def describe(self, head_dim: int) -> str:
        if self.kind != ROTATE:
            return "no positions (NoPE)"
        rot = 2 * self.inv_freq.numel()
        part = "" if rot == head_dim else f", rotary dims {rot}/{head_dim}"
        return f"RoPE, {'interleaved' if self.interleaved else 'rotate-half'}{part}"


@dataclass
class PositionScheme:
    kind: str  # ROTATE (some layer rotates), UNCHANGED (no layer holds positions) or RECOMPUTE
    reason: str
    layers: list[LayerPositions] = field(default_factory=list)

    @property
    def inv_freq(self) -> list[torch.Tensor | None]:
        return [lp.inv_freq for lp in self.layers]

    def rotate_(self, keys: torch.Tensor, layer: int, delta: int, engine=None) -> torch.Tensor:
        """Moves post-RoPE keys ``[..., head_dim]`` of one layer by ``delta`` positions, in place.
        Keys of a layer without RoPE are left as they are. Contiguous keys on a GPU are
        rotated there by the copy `engine`'s kernel, on its H2D stream (the caller waits)."""
        if self.kind == RECOMPUTE:
            raise ValueError(f"keys of this model are not re-rotated ({self.kind}: {self.reason})")
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer {layer} out of range: the scheme has {len(self.layers)} layers")
        lp = self.layers[layer]
        if delta == 0 or lp.kind != ROTATE:
            return keys
        if keys.is_cuda or (engine is not None and streams.is_async(streams.device_of(keys))):
            if engine is None or not keys.is_contiguous():
                raise ValueError("keys on the GPU are rotated in place: they must be contiguous, with engine=")
            return kernels.rope_rotate(keys, delta, lp.inv_freq, interleaved=lp.interleaved, out=keys, engine=engine)
        src = keys.contiguous() if not keys.is_contiguous() else keys
        out = kernels.rope_rotate(src.cpu(), delta, lp.inv_freq, interleaved=lp.interleaved)
        keys.copy_(out)
        return keys


def _rope_types(cfg) -> set[str]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return set()
    if "rope_type" in params or "type" in params:
        return {params.get("rope_type", params.get("type"))}
    return {p.get("rope_type", p.get("type")) for p in params.values() if isinstance(p, dict)}


def _candidate_inv_freqs(model, cfg) -> list[torch.Tensor]:
    """Every distinct inv_freq the model holds (one per rotary module or layer type), then the config's."""
    found: list[torch.Tensor] = []

    def add(t: torch.Tensor) -> None:
        t = t.detach().float().cpu().reshape(-1)
        if t.numel() and not any(t.shape == f.shape and torch.equal(t, f) for f in found):
            found.append(t)

    for name, buf in model.named_buffers():
        if name.rsplit(".", 1)[-1].endswith("inv_freq") and isinstance(buf, torch.Tensor) and buf.dim() == 1:
            add(buf)
    for module in model.modules():  # inv_freq kept as a plain attribute rather than a buffer
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.dim() == 1:
            add(inv)
    dim = getattr(cfg, "rotary_dim", None)
    if dim:
        params = getattr(cfg, "rope_parameters", None) or {}
        base = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)) if isinstance(params, dict) else 10000.0)
        add(1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    return found


def layer_keys(model, ids: torch.Tensor, start: int, kwarg: str) -> list[torch.Tensor]:
    """Every layer's cached keys of ``ids`` placed at positions start, start + 1, ... (float32, CPU)."""
    cache = DynamicCache(config=model.config)
    pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, use_cache=True, **{kwarg: cache})
    return [layer.keys.float().cpu() for layer in cache.layers]


def _match(a: torch.Tensor, b: torch.Tensor, delta: int, candidates, tol: float) -> LayerPositions | None:
    """The position scheme that takes this layer's keys at p (a) to its keys at p + delta (b)."""
    if (a - b).abs().max().item() <= tol:
        return LayerPositions(UNCHANGED)
    for inv in candidates:
        if 2 * inv.numel() > a.shape[-1]:
            continue
        for interleaved in (False, True):
            moved = kernels.rope_rotate(a.contiguous(), delta, inv, interleaved=interleaved)
            if (moved - b).abs().max().item() <= tol:
                return LayerPositions(ROTATE, inv, interleaved)
    return None


def _summary(layers: list[LayerPositions], head_dims: list[int]) -> str:
    groups: dict[str, list[int]] = {}
    for i, (lp, hd) in enumerate(zip(layers, head_dims)):
        groups.setdefault(lp.describe(hd), []).append(i)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{what} in layers {','.join(map(str, idx))}" for what, idx in groups.items())


def probe_positions(model, kwarg: str, n_layers: int) -> PositionScheme:
    cfg = model.config.get_text_config(decoder=True)
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    start, delta = 7, max(1, min(1000, max_pos // 2 - 16))  # stay inside learned position tables
    inexact = _rope_types(cfg) & _INEXACT_ROPE
    if inexact:
        return PositionScheme(RECOMPUTE, f"{'/'.join(sorted(inexact))} RoPE scaling changes inv_freq with length")
    ids = torch.randint(1, min(getattr(cfg, "vocab_size", 100) or 100, 1000), (PROBE_BATCH, 1),
                        generator=torch.Generator().manual_seed(1)).to(model.device)
    try:
        at_p = layer_keys(model, ids, start, kwarg)
        at_pd = layer_keys(model, ids, start + delta, kwarg)
    except Exception as e:  # e.g. no position_ids argument, or no batch > 1
        return PositionScheme(RECOMPUTE, f"cannot probe positions: {type(e).__name__}: {e}")
    if len(at_p) != n_layers:
        return PositionScheme(RECOMPUTE, f"the probe saw {len(at_p)} cache layers for {n_layers} layers")
    exact = model.dtype == torch.float32
    candidates = _candidate_inv_freqs(model, cfg)
    layers = []
    for i, (a, b) in enumerate(zip(at_p, at_pd)):
        scale = max(1.0, a.abs().max().item())
        lp = _match(a, b, delta, candidates, (1e-4 if exact else 2e-2) * scale)
        if lp is None:
            return PositionScheme(
                RECOMPUTE,
                f"positions are not a rotation of layer {i}'s cached keys (e.g. learned absolute positions)",
            )
        layers.append(lp)
    if all(lp.kind == UNCHANGED for lp in layers):
        return PositionScheme(UNCHANGED, "keys do not depend on position (e.g. ALiBi): reused as they are", layers)
    return PositionScheme(ROTATE, _summary(layers, [a.shape[-1] for a in at_p]), layers)
