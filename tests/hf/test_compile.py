"""A compiled patched model works inside sessions and gives what the uncompiled model gives."""

import pytest
import torch

import cachedattn

from .models import VOCAB, tiny_model


def _gen(model, ids):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
        return_dict_in_generate=True, output_logits=True, pad_token_id=0,
    )  # fmt: skip


@pytest.mark.parametrize("how", ["model.compile", "torch.compile"])
def test_a_compiled_model_gives_the_uncompiled_answers_in_sessions(how, make_store):
    model, plain = tiny_model("llama", num_hidden_layers=2), tiny_model("llama", num_hidden_layers=2)
    cachedattn.patch(model, make_store())
    if how == "model.compile":
        model.compile()
        served = model
    else:
        served = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    hist = torch.zeros(1, 0, dtype=torch.long)
    with torch.no_grad():
        for turn in range(3):
            ids = torch.cat([hist, torch.randint(1, VOCAB, (1, 12), generator=g)], 1)
            with cachedattn.session(served, "c") as s:
                out = _gen(served, ids)
                answer = torch.randint(1, VOCAB, (1, 3), generator=g)
                full = torch.cat([out.sequences, answer], 1)
                logits = served(full).logits[0]  # a plain forward of the same turn
            assert s.reused_tokens == out.sequences.shape[1] - 1
            ref = _gen(plain, ids)
            assert torch.equal(out.sequences, ref.sequences)
            assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) <= 1e-4
            torch.testing.assert_close(logits, plain(full).logits[0, s.reused_tokens :], atol=1e-4, rtol=1e-4)
            hist = full
        if how == "model.compile":  # outside a session the model runs compiled, as before (one compile: slow on CI)
            torch.testing.assert_close(served(hist).logits, plain(hist).logits, atol=1e-4, rtol=1e-4)
