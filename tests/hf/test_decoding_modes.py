"""Every generate() decoding mode either reuses stored KV exactly or is refused
before any work: the turn with the mode gives what it gives without the store,
the KV it stores is the KV of the tokens stored, and the next turn equals
recompute."""

import pytest
import torch
from transformers import DynamicCache

import cachedattn

from .models import VOCAB, tiny_model

ARCHS = {"llama": {}, "mistral": {"sliding_window": 24}, "gpt2": {}}
GEN = 8


class Collect:
    """A streamer: put()/end() is all generate() asks of one."""

    def __init__(self):
        self.parts, self.ended = [], 0

    def put(self, value):
        self.parts.append(value.clone())

    def end(self):
        self.ended += 1


def _draft():
    return tiny_model("llama", seed=7, num_hidden_layers=1)


MODES = {
    "greedy": lambda: dict(do_sample=False),
    "sampling": lambda: dict(do_sample=True, top_k=0),
    "sampling_several": lambda: dict(do_sample=True, top_k=0, num_return_sequences=3),
    "beam_search": lambda: dict(num_beams=3, do_sample=False),
    "beam_search_several": lambda: dict(num_beams=4, num_return_sequences=2, do_sample=False),
    "beam_sample": lambda: dict(num_beams=3, do_sample=True, top_k=0),
    "prompt_lookup": lambda: dict(prompt_lookup_num_tokens=3, do_sample=False),
    "assisted": lambda: dict(assistant_model=_draft(), do_sample=False),
    "streamer": lambda: dict(streamer=Collect(), do_sample=False),
}


def _generate(model, ids, seed=0, **kw):
    torch.manual_seed(seed)
    # An explicit mask: sampled ids may contain pad_token_id, which generate() would otherwise mask out.
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN, return_dict_in_generate=True,
        output_logits=True, pad_token_id=0, **kw,
    )  # fmt: skip


def _check_same(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits)
    diff = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
    assert diff <= 1e-4, diff


def _unpatched(model, fn):
    state = model._cachedattn
    cachedattn.unpatch(model)
    try:
        return fn()
    finally:
        cachedattn.patch(model, state.store)


def _check_stored_kv(model, conv):
    """The stored KV is the KV a plain forward computes for the stored tokens."""
    store, kwarg = model._cachedattn.store, model._cachedattn.kv.cache_kwarg
    toks = torch.as_tensor(store.stored_tokens(conv), dtype=torch.long)[None]
    cache = DynamicCache()  # full layers everywhere: every token's KV, sliding-window layers included
    _unpatched(model, lambda: model(toks, use_cache=True, **{kwarg: cache}))
    with store.load(conv, toks.shape[1]) as ld:
        for i in range(len(model._cachedattn.kv.sliding)):
            k, v = ld.read_layer(i)
            torch.testing.assert_close(k, cache.layers[i].keys[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v, cache.layers[i].values[0], atol=1e-4, rtol=1e-4)
    return toks.shape[1]


def _prompt(g, n, repeat=False):
    if repeat:  # n-grams that recur, so prompt lookup proposes candidates (mostly rejected: crops)
        base = torch.randint(1, VOCAB, (1, 5), generator=g)
        return base.repeat(1, -(-n // 5))[:, :n]
    return torch.randint(1, VOCAB, (1, n), generator=g)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_decoding_mode_stores_the_returned_sequence_kv(arch, mode, make_store):
    model = tiny_model(arch, **ARCHS[arch])
    store = make_store()
    cachedattn.patch(model, store)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        # Turn 0: some history in the store, so the mode's turn restores it (into every beam / sequence row).
        ids = _prompt(g, 30)
        with cachedattn.session(model, "m"):
            first = _generate(model, ids)
        # Turn 1: the mode under test.
        ids = torch.cat([first.sequences, _prompt(g, 21, repeat=True)], 1)
        kw = MODES[mode]()
        with cachedattn.session(model, "m") as s:
            out = _generate(model, ids, seed=3, **kw)
        assert s.reused_tokens == first.sequences.shape[1] - 1
        ref_kw = MODES[mode]()
        ref = _unpatched(model, lambda: _generate(model, ids, seed=3, **ref_kw))
        _check_same(out, ref)
        if mode == "streamer":
            assert [p.tolist() for p in kw["streamer"].parts] == [p.tolist() for p in ref_kw["streamer"].parts]
            assert kw["streamer"].ended == 1
        # What was stored is the KV of what was stored, and it is a prefix of sequence 0 beyond the prompt.
        n_stored = _check_stored_kv(model, "m")
        seq0 = out.sequences[0]
        assert n_stored >= ids.shape[1]
        assert torch.equal(torch.as_tensor(store.stored_tokens("m")), seq0[:n_stored])
        # Turn 2, greedy, on sequence 0: reuses what was stored and equals recompute.
        nxt = torch.cat([seq0[None], _prompt(g, 9)], 1)
        with cachedattn.session(model, "m") as s:
            out2 = _generate(model, nxt)
        assert s.reused_tokens == n_stored
        _check_same(out2, _unpatched(model, lambda: _generate(model, nxt)))


REFUSED = {
    "contrastive_search": dict(penalty_alpha=0.6, top_k=4),
    "dola_generation": dict(dola_layers="low"),
    "group_beam_search": dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
    "constrained_beam_search": dict(num_beams=2, force_words_ids=[[5]]),
    "custom_generate": dict(custom_generate=lambda *a, **k: None),
    "assistant_early_exit": dict(assistant_early_exit=1),
    "token_healing": dict(token_healing=True),
}


@pytest.mark.parametrize("mode", list(REFUSED))
def test_unserved_decoding_modes_are_refused_before_any_forward(mode, make_store):
    model = tiny_model("llama")
    cachedattn.patch(model, make_store())
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(1, VOCAB, (1, 20))
    with torch.no_grad(), cachedattn.session(model, "r"):
        with pytest.raises(ValueError, match=mode):
            model.generate(ids, max_new_tokens=3, **REFUSED[mode])
    assert calls == []


def test_beam_search_with_a_streamer_is_refused_before_any_forward(make_store):
    model = tiny_model("llama")
    cachedattn.patch(model, make_store())
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), cachedattn.session(model, "r"):
        with pytest.raises(ValueError, match="beam"):
            model.generate(torch.randint(1, VOCAB, (1, 20)), max_new_tokens=3, num_beams=2, streamer=Collect())
    assert calls == []
