"""patch() refuses models whose cached decoding cannot reproduce a full forward, naming why."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import cachedattn
from cachedattn import UnsupportedModel

from .models import COMMON

BIDIRECTIONAL = "logits depend on later tokens"
TOKEN_POSITIONS = "does not reproduce a full forward"
EXTRA = {"rembert": dict(input_embedding_size=64, output_embedding_size=64), "roformer": dict(embedding_size=64)}


def _model(arch, **kw):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **{**COMMON, **EXTRA.get(arch, {}), **kw})
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize(
    "arch", ["roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm", "rembert", "roformer", "bert"]
)
def test_encoders_without_causal_attention_are_refused_at_patch(make_store, arch):
    # is_decoder=False (the configs' default): every token attends to later ones, so a turn's
    # logits depend on tokens of later turns and no stored KV can match a recompute.
    model = _model(arch)
    with pytest.raises(UnsupportedModel, match=BIDIRECTIONAL):
        cachedattn.patch(model, make_store())
    assert not hasattr(model, "_cachedattn")


@pytest.mark.parametrize("arch", ["roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm"])
def test_positions_counted_from_token_ids_are_refused_at_patch(make_store, arch):
    # Causal, but positions count the non-pad tokens of each call (padding_idx): after a pad id in
    # the history, the cached turn's positions are off by the pads seen.
    model = _model(arch, is_decoder=True)
    with pytest.raises(UnsupportedModel, match=TOKEN_POSITIONS):
        cachedattn.patch(model, make_store())


@pytest.mark.parametrize("arch", ["bert", "rembert", "roformer", "electra"])
def test_causal_decoders_of_encoder_families_are_served_exactly(make_store, arch):
    model = _model(arch, is_decoder=True)
    cachedattn.patch(model, make_store())
    g = torch.Generator().manual_seed(3)
    first, second = torch.randint(2, 300, (1, 12), generator=g), torch.randint(2, 300, (1, 7), generator=g)
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            model(input_ids=first)
        with cachedattn.session(model, "c"):
            got = model(input_ids=torch.cat([first, second], 1)).logits
        cachedattn.unpatch(model)
        ref = model(input_ids=torch.cat([first, second], 1)).logits
    assert (got[0, -7:] - ref[0, -7:]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("limit", [-1, 0])
def test_config_without_a_context_limit_patches_with_no_limit(make_store, limit):
    # xlnet's config says max_position_embeddings=-1 ("no limit"): patch derives no window from it.
    model = _model("llama", num_key_value_heads=2, max_position_embeddings=limit)
    cachedattn.patch(model, make_store())
    assert model._cachedattn.options["max_context"] is None


def test_xlnet_is_refused_for_its_cache_not_for_its_context_limit(make_store):
    # xlnet keeps "mems" instead of a KV cache: refused with that reason (it used to fail on -1).
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("xlnet", vocab_size=320, d_model=64, n_layer=2, n_head=4, d_inner=96)
    ).eval()
    with pytest.raises(UnsupportedModel, match="does not use a KV cache"):
        cachedattn.patch(model, make_store())


@pytest.mark.parametrize("variant", [1, 2])
def test_a_window_the_cache_keeps_and_the_mask_does_not_is_refused_at_patch(make_store, variant):
    # moshi's DynamicCache keeps only `sliding_window` tokens, its full forward's causal mask
    # attends to all of them: equal until the window is exceeded, different after.
    from cachedattn.hf.tiny import tiny_model as compat_model

    model = compat_model("moshi", variant)
    with pytest.raises(UnsupportedModel, match="sliding"):
        cachedattn.patch(model, make_store())
