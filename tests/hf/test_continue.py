"""Session.continue_turn (a known answer fed through the turn's cache), reserve, layerwise=False."""

import pytest
import torch

import cachedattn

from .models import VOCAB, tiny_model


def _plain_logits(model, ids):
    state = model._cachedattn
    cachedattn.unpatch(model)
    try:
        with torch.no_grad():
            return model(ids).logits[0]
    finally:
        cachedattn.patch(model, state.store)


def test_continue_turn_stores_the_answer_and_matches_recompute(make_store):
    model = tiny_model("llama")
    cachedattn.patch(model, make_store())
    g = torch.Generator().manual_seed(0)
    prompt, answer = torch.randint(1, VOCAB, (1, 40), generator=g), torch.randint(1, VOCAB, (1, 25), generator=g)
    full = torch.cat([prompt, answer], 1)
    with torch.no_grad(), cachedattn.session(model, "c") as s:
        model(prompt)
        out = s.continue_turn(answer)
        assert s.generated_tokens == 25 and s.computed_tokens == 40
    torch.testing.assert_close(out.logits[0], _plain_logits(model, full)[40:], atol=1e-4, rtol=1e-4)
    assert model._cachedattn.store.lookup("c", full[0]) == 65
    nxt = torch.cat([full, torch.randint(1, VOCAB, (1, 7), generator=g)], 1)
    with torch.no_grad(), cachedattn.session(model, "c") as s:
        got = model(nxt).logits[0]
    assert s.reused_tokens == 65
    torch.testing.assert_close(got, _plain_logits(model, nxt)[65:], atol=1e-4, rtol=1e-4)


def test_continue_turn_needs_a_forward_and_room_in_the_window(make_store):
    model = tiny_model("llama")
    cachedattn.patch(model, make_store(), max_context=64)
    ids = torch.randint(1, VOCAB, (1, 50))
    with torch.no_grad(), cachedattn.session(model, "w") as s:
        with pytest.raises(ValueError, match="follows a plain forward"):
            s.continue_turn(ids[:, :3])
        model(ids)
        with pytest.raises(ValueError, match="exceed max_context=64"):
            s.continue_turn(torch.randint(1, VOCAB, (1, 20)))
    # reserve= leaves the room: the prompt is truncated so the answer fits.
    with torch.no_grad(), cachedattn.session(model, "w2", reserve=20) as s:
        model(ids)
        assert s.dropped_tokens > 0
        s.continue_turn(torch.randint(1, VOCAB, (1, 20)))
    with pytest.raises(ValueError, match="reserve"):
        cachedattn.session(model, "w3", reserve=-1)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_loading_everything_first_gives_the_same_logits(make_store, arch):
    model = tiny_model(arch)
    store = make_store()
    cachedattn.patch(model, store)
    ids = torch.randint(1, VOCAB, (1, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), cachedattn.session(model, "l"):
        model(ids[:, :70])
    store.flush()
    store.demote("l")  # history from disk
    outs = {}
    for layerwise in (True, False):
        with torch.no_grad(), cachedattn.session(model, "l", save=False, layerwise=layerwise) as s:
            outs[layerwise] = model(ids).logits[0]
        assert s.reused_tokens == 70
    assert torch.equal(outs[True], outs[False])
    torch.testing.assert_close(outs[True], _plain_logits(model, ids)[70:], atol=1e-4, rtol=1e-4)
