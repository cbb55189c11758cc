"""A cached turn gives the same logits and tokens as recomputing the whole history."""

import pytest
import torch

import cachedattn

from .models import CONFIGS, VOCAB, tiny_model

TURNS = [37, 120, 20, 90]  # new user tokens per turn; chunk boundaries (16) fall inside turns
GEN = 6


def _gen(model, ids):
    return model.generate(
        ids, max_new_tokens=GEN, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0
    )


def _check_same(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_four_turns_match_recompute(arch, make_store):
    model = tiny_model(arch)
    store = make_store()
    cachedattn.patch(model, store)
    g = torch.Generator().manual_seed(1)
    history = torch.zeros(1, 0, dtype=torch.long)
    with torch.no_grad():
        for turn, n_new in enumerate(TURNS):
            full = torch.cat([history, torch.randint(1, VOCAB, (1, n_new), generator=g)], 1)
            with cachedattn.session(model, "conv") as s:
                out = _gen(model, full)
            ref = _gen(model, full)  # outside a session: the plain model, full recompute
            _check_same(out, ref)
            # The last generated token of a turn never went through the model: it is computed next turn.
            stored = max(history.shape[1] - 1, 0)
            assert s.reused_tokens == stored and s.computed_tokens == full.shape[1] - stored
            history = out.sequences
            if turn == 1:  # from disk after a restart of the store
                store.close()
                cachedattn.unpatch(model)
                store = make_store()
                cachedattn.patch(model, store)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_plain_forward_in_a_session(arch, make_store):
    model = tiny_model(arch)
    store = make_store()
    cachedattn.patch(model, store)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (1, 150), generator=g)
    with torch.no_grad():
        ref = model(ids).logits
        with cachedattn.session(model, "f") as s:
            first = model(ids[:, :70]).logits
            assert s.reused_tokens == 0
            second = model(input_ids=ids).logits  # reuses the 70 stored tokens
            assert s.reused_tokens == 70 and second.shape[1] == 80
    assert (first - ref[:, :70]).abs().max() <= 1e-4
    assert (second - ref[:, 70:]).abs().max() <= 1e-4


def test_divergence_in_the_middle_reuses_only_the_prefix(make_store):
    model = tiny_model("llama")
    cachedattn.patch(model, make_store())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (1, 100), generator=g)
    with torch.no_grad():
        with cachedattn.session(model, "d") as s:
            model(ids)
            other = ids.clone()
            other[0, 43] = (other[0, 43] + 1) % VOCAB
            other = torch.cat([other, torch.randint(1, VOCAB, (1, 20), generator=g)], 1)
            out = _gen(model, other)
            assert s.reused_tokens == 43
        _check_same(out, _gen(model, other))


def test_interleaved_conversations(make_store):
    model = tiny_model("qwen2")
    cachedattn.patch(model, make_store())
    g = torch.Generator().manual_seed(4)
    hist = {"a": torch.zeros(1, 0, dtype=torch.long), "b": torch.zeros(1, 0, dtype=torch.long)}
    with torch.no_grad():
        for conv in ["a", "b", "a", "b", "a"]:
            full = torch.cat([hist[conv], torch.randint(1, VOCAB, (1, 25), generator=g)], 1)
            with cachedattn.session(model, conv) as s:
                out = _gen(model, full)
            assert s.reused_tokens == max(hist[conv].shape[1] - 1, 0)
            _check_same(out, _gen(model, full))
            hist[conv] = out.sequences


def test_many_back_to_back_turns_stay_exact(make_store):
    # Small host memory: history goes to disk and comes back between turns.
    model = tiny_model("llama")
    store = make_store(host_bytes=6 * 16 * 3 * 2 * 2 * 16 * 4 + (1 << 16))
    cachedattn.patch(model, store)
    g = torch.Generator().manual_seed(5)
    hist = {c: torch.zeros(1, 0, dtype=torch.long) for c in "xyz"}
    with torch.no_grad():
        for i in range(15):
            c = "xyz"[i % 3]
            full = torch.cat([hist[c], torch.randint(1, VOCAB, (1, 11), generator=g)], 1)
            with cachedattn.session(model, c):
                out = _gen(model, full)
            _check_same(out, _gen(model, full))
            hist[c] = out.sequences
    assert store.stats()["disk"]["hits"] > 0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("readahead", [1, None])
def test_attention_implementations_and_readahead(impl, readahead, make_store):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import CONFIGS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **CONFIGS["llama"]), attn_implementation=impl)
    model.eval()
    store = make_store()
    cachedattn.patch(model, store, readahead=readahead)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, VOCAB, (1, 70), generator=g)
    with torch.no_grad():
        with cachedattn.session(model, "r"):
            model(ids)
        store.demote("r")  # the history comes back from disk, layer by layer
        full = torch.cat([ids, torch.randint(1, VOCAB, (1, 30), generator=g)], 1)
        with cachedattn.session(model, "r") as s:
            out = _gen(model, full)
        assert s.reused_tokens == 70
        _check_same(out, _gen(model, full))
