"""The same turn submitted twice (a client retry, or a regenerate with another answer):
the next turn still equals recompute, and after a store restart the whole stored prefix
is served from disk. Through a plain forward, generate() and the Engine."""

import pytest
import torch

import cachedattn
from cachedattn.serving import Engine

from .models import VOCAB, tiny_model

PROMPT, ANSWER, NEXT, GEN = 41, 9, 13, 5  # chunk_tokens is 16: turns end inside chunks


def _ids(seed, n):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _gen(model, ids, **kw):
    kw = {"do_sample": False, **kw}
    return model.generate(ids, max_new_tokens=GEN, return_dict_in_generate=True, output_logits=True,
                          pad_token_id=0, **kw)


def _settle(store, conv, to_disk):
    store.flush()
    if to_disk:
        store.demote(conv)
        store.flush()


def _reopen(model, store, make_store):
    store.close()
    cachedattn.unpatch(model)
    store = make_store()
    cachedattn.patch(model, store)
    return store


def _check_forward(model, ids, stored):
    """A plain forward of `ids` in a session reuses `stored` tokens and equals recompute."""
    with cachedattn.session(model, "c") as s:
        got = model(ids).logits
    ref = model(ids).logits
    assert s.reused_tokens == stored
    n = ids.shape[1] - stored
    assert (got[0, -n:] - ref[0, -n:]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("to_disk", [False, True])
@pytest.mark.parametrize("regenerate", [False, True])
def test_same_forward_turn_twice(make_store, regenerate, to_disk):
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    prompt = _ids(0, PROMPT)
    first = torch.cat([prompt, _ids(1, ANSWER)], 1)
    again = torch.cat([prompt, _ids(2, ANSWER)], 1) if regenerate else first.clone()
    with torch.no_grad():
        for ids in (first, again):
            with cachedattn.session(model, "c"):
                model(ids)
            _settle(store, "c", to_disk)
        nxt = torch.cat([again, _ids(3, NEXT)], 1)
        _check_forward(model, nxt, again.shape[1])
        _settle(store, "c", to_disk)
        store = _reopen(model, store, make_store)
        _check_forward(model, torch.cat([nxt, _ids(4, NEXT)], 1), nxt.shape[1])


@pytest.mark.parametrize("to_disk", [False, True])
@pytest.mark.parametrize("regenerate", [False, True])
def test_same_generate_turn_twice(make_store, regenerate, to_disk):
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    prompt = _ids(0, PROMPT)
    with torch.no_grad():
        outs = []
        for seed in (1, 2):
            torch.manual_seed(seed)  # a regenerate samples again with another seed
            with cachedattn.session(model, "c"):
                outs.append(_gen(model, prompt, do_sample=regenerate).sequences)
            _settle(store, "c", to_disk)
        if regenerate:
            assert not torch.equal(outs[0], outs[1])  # the stored answer was really replaced
        full = torch.cat([outs[1], _ids(3, NEXT)], 1)
        with cachedattn.session(model, "c") as s:
            out = _gen(model, full)
        ref = _gen(model, full)
        assert s.reused_tokens == outs[1].shape[1] - 1  # the last sampled token was never computed
        assert torch.equal(out.sequences, ref.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) <= 1e-4
        _settle(store, "c", to_disk)
        stored = out.sequences.shape[1] - 1
        store = _reopen(model, store, make_store)
        _check_forward(model, torch.cat([out.sequences, _ids(4, NEXT)], 1), stored)


@pytest.mark.parametrize("to_disk", [False, True])
@pytest.mark.parametrize("how", ["retry", "sampled again", "another answer"])
def test_same_engine_turn_twice(make_store, how, to_disk):
    model = tiny_model("llama")
    store = make_store()
    prompt = _ids(0, PROMPT)
    with torch.no_grad():
        with Engine(model, store, background=False) as engine:
            for seed in (1, 2):  # the same job submitted twice, or regenerated
                if how == "another answer":
                    job = engine.submit("c", prompt, answer=_ids(seed, ANSWER))
                else:
                    job = engine.submit("c", prompt, max_new_tokens=GEN, do_sample=how != "retry", pad_token_id=0)
                torch.manual_seed(seed)
                engine.step()
                hist = job.future.result()
                _settle(store, "c", to_disk)
            # Generated: the last token was never computed; a given answer was stored whole.
            stored = hist.shape[1] - (how != "another answer")
            full = torch.cat([hist, _ids(3, NEXT)], 1)
            job = engine.submit("c", full, max_new_tokens=GEN, do_sample=False, pad_token_id=0)
            engine.step()
            got = job.future.result()
            assert job.reused_tokens == stored
            assert torch.equal(got, _gen(model, full).sequences)
            _settle(store, "c", to_disk)
        stored = got.shape[1] - 1  # the last generated token was never computed
        store = _reopen(model, store, make_store)
        with Engine(model, store, background=False) as engine:
            job = engine.submit("c", torch.cat([got, _ids(5, NEXT)], 1), answer=_ids(6, 3))
            engine.step()
            job.future.result()
            assert job.reused_tokens == stored
