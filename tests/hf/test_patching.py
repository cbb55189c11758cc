import pytest
import torch

import cachedattn
from cachedattn import UnsupportedModel

from .models import VOCAB, tiny_model


def test_unpatch_restores_the_original_forward(make_store):
    model = tiny_model("llama")
    orig_forward, orig_generate = model.forward, model.generate
    assert cachedattn.patch(model, make_store()) is model
    assert model.forward is not orig_forward
    cachedattn.unpatch(model)
    assert model.forward == orig_forward and model.generate == orig_generate
    assert "forward" not in vars(model) and not hasattr(model, "_cachedattn")
    with pytest.raises(ValueError, match="not patched"):
        cachedattn.session(model, "x")


def test_outside_a_session_the_model_is_unchanged(make_store):
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 30))
    with torch.no_grad():
        before = model(ids).logits
        cachedattn.patch(model, make_store())
        after = model(ids).logits
    assert torch.equal(before, after)
    assert model._cachedattn.store.stats()["lookups"] == 0


def test_batch_larger_than_one_is_refused(make_store):
    model = tiny_model("llama")
    cachedattn.patch(model, make_store())
    with cachedattn.session(model, "b"):
        with pytest.raises(ValueError, match="batch size 1"):
            model.generate(torch.randint(1, VOCAB, (2, 10)), max_new_tokens=2)
        with pytest.raises(ValueError, match="store provides the cache"):
            from transformers import DynamicCache

            model.generate(torch.randint(1, VOCAB, (1, 10)), max_new_tokens=2, past_key_values=DynamicCache())


def test_patching_twice_and_another_store(make_store, tmp_path):
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    cachedattn.patch(model, store)  # idempotent
    from cachedattn import AttentionStore

    other = AttentionStore(host_bytes=1 << 24, chunk_tokens=16)
    with pytest.raises(ValueError, match="already patched"):
        cachedattn.patch(model, other)
    other.close()


def test_probing_keeps_the_callers_random_state(make_store):
    model = tiny_model("llama")
    torch.manual_seed(123)
    cachedattn.patch(model, make_store())
    a = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(3))


def test_different_weights_never_share_kv(make_store, store_dir):
    ids = torch.randint(1, VOCAB, (1, 40))
    a = tiny_model("llama", seed=0)
    store = make_store()
    cachedattn.patch(a, store)
    with torch.no_grad(), cachedattn.session(a, "c"):
        a(ids)
    store.close()
    b = tiny_model("llama", seed=1)  # same architecture, other weights
    store2 = make_store()
    cachedattn.patch(b, store2)
    with torch.no_grad(), cachedattn.session(b, "c") as s:
        b(ids)
        assert s.reused_tokens == 0


@pytest.mark.parametrize(
    "arch,kw,match",
    [
        ("mamba", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4), "recurrent"),
        ("deepseek_v3", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             kv_lora_rank=16, q_lora_rank=16, intermediate_size=64, moe_intermediate_size=32,
                             n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2), "latent"),
    ],
)
def test_models_a_kv_store_cannot_serve_are_refused(arch, kw, match, make_store):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw)).eval()
    with pytest.raises(UnsupportedModel, match=match):
        cachedattn.patch(model, make_store())
    assert not hasattr(model, "_cachedattn")
