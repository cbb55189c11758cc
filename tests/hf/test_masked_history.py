"""Stored KV is reused only where the turn's attention mask lets every token see
the whole history: a token the mask hides (padding, or generate() hiding every
token equal to pad_token_id, generated ones included) changes the KV of all
tokens after it, so recompute differs from KV stored without that mask."""

import pytest
import torch

import cachedattn

from .models import VOCAB, tiny_model

PAD = 0


def _gen(model, ids, **kw):
    return model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=PAD, **kw)


def _same(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
    assert diff <= 1e-4, diff


def _history_with_pad(g, n=40, at=17):
    """A history in which the pad token occurs, as when the model generated it in an earlier turn."""
    ids = torch.randint(1, VOCAB, (1, n), generator=g)
    ids[0, at] = PAD
    return ids


@pytest.mark.parametrize("arch", ["qwen3_moe", "llama", "mixtral"])
def test_generate_after_a_pad_token_in_the_history_matches_recompute(arch, make_store):
    """The qwen3_moe case (4 experts, top-2): its tiny model generated token 0 == pad_token_id;
    from the next turn on generate() masked it in recompute, while the cache served KV of the
    tokens after it computed without the mask."""
    model = tiny_model(arch, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32) if arch == "qwen3_moe" \
        else tiny_model(arch)
    cachedattn.patch(model, make_store())
    g = torch.Generator().manual_seed(4)
    first = _history_with_pad(g)
    with torch.no_grad():
        with cachedattn.session(model, "p") as s:
            model(first)  # stored as computed: every token sees the pad token
        full = torch.cat([first, torch.randint(1, VOCAB, (1, 12), generator=g)], 1)
        with cachedattn.session(model, "p") as s:
            out = _gen(model, full)
        _same(out, _gen(model, full))
        assert s.reused_tokens == 17  # only the history before the masked token
        # The turn's KV after the masked token was computed under that mask: not stored,
        # so a plain forward (all tokens visible) of a longer conversation is exact too.
        longer = torch.cat([out.sequences, torch.randint(1, VOCAB, (1, 6), generator=g)], 1)
        with cachedattn.session(model, "p") as s:
            got = model(longer).logits
        assert (got - model(longer).logits[:, -got.shape[1]:]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("zero_at", [5, 30, 45])
def test_forward_with_an_attention_mask_hiding_tokens_matches_recompute(zero_at, make_store):
    """An explicit mask that hides a token of the history, of the new tokens, or none stored."""
    model = tiny_model("llama")
    cachedattn.patch(model, make_store())
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (1, 50), generator=g)
    mask = torch.ones_like(ids)
    mask[0, zero_at] = 0
    with torch.no_grad():
        with cachedattn.session(model, "m") as s:
            model(ids[:, :40])
        with cachedattn.session(model, "m") as s:
            got = model(ids, attention_mask=mask).logits
        ref = model(ids, attention_mask=mask).logits
        assert (got - ref[:, -got.shape[1]:]).abs().max().item() <= 1e-4
        assert s.reused_tokens == min(zero_at, 40)
        with cachedattn.session(model, "m") as s:  # what the masked turn stored is right for an unmasked one
            again = model(ids).logits
        assert (again - model(ids).logits[:, -again.shape[1]:]).abs().max().item() <= 1e-4


def test_compat_checker_qwen3_moe_configurations():
    """Each configuration the compat checker tries for qwen3_moe, through its mixed
    generate / forward / restart conversation (its generated tokens include pad_token_id)."""
    from cachedattn.hf import compat

    for v in range(len(compat.VARIANTS)):
        r = compat.check_variant("qwen3_moe", v)
        assert r["status"] == "works", (v, r)
