"""How much of a turn the stored KV may cover, given the turn's attention mask.

The store only ever holds KV computed with every earlier token visible (an
all-ones attention mask): that is what a later turn reuses without knowing
how the KV was made. A turn whose mask hides token j (padding, or generate()
hiding every token equal to pad_token_id, a token the model generated in an
earlier turn included) computes every token from j on differently. Such a
turn reuses stored KV only before j and stores none from j on; tokens before
j are untouched by the mask (attention is causal).
"""

from __future__ import annotations

import torch


def _token_set(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, torch.Tensor):
        return {int(v) for v in value.reshape(-1).tolist()}
    if isinstance(value, (list, tuple, set)):
        return {int(v) for v in value}
    return {int(value)}


def generate_pad_eos(model, kwargs: dict) -> tuple[set[int], set[int]]:
    """The pad and eos token ids generate() will use for this call."""
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    pad = kwargs["pad_token_id"] if "pad_token_id" in kwargs else getattr(gc, "pad_token_id", None)
    eos = kwargs["eos_token_id"] if "eos_token_id" in kwargs else getattr(gc, "eos_token_id", None)
    return _token_set(pad), _token_set(eos)


def first_hidden(input_ids: torch.Tensor, attention_mask=None, pad: set[int] = frozenset(),
                 eos: set[int] = frozenset()) -> int | None:
    """Index of the first token the turn's mask hides, None if it hides none.

    ``attention_mask``: the caller's 2-D mask, if any (any other form: 0, nothing
    reused or stored). Without one, generate() hides the pad tokens when the
    ids contain one and pad is not an eos token (``pad``/``eos``: generate's
    ids; empty for a plain forward, which then sees every token)."""
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[-1] != input_ids.shape[-1]:
            return 0
        hidden = (attention_mask[0] == 0).nonzero()
        return int(hidden[0, 0]) if len(hidden) else None
    if not pad or pad & eos:
        return None
    hidden = torch.isin(input_ids[0], torch.tensor(sorted(pad), device=input_ids.device)).nonzero()
    return int(hidden[0, 0]) if len(hidden) else None
