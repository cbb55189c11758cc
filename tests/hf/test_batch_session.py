"""A batched session gives every row what its conversation alone gives with recompute."""

import pytest
import torch

import cachedattn

from .models import VOCAB, tiny_model

GEN = 5
HISTORY = [0, 5, 37, 70]  # tokens of the earlier turn per row (0: none; 37, 70 cross 16-token chunks)
NEW = [9, 3, 21, 14]


def _gen(model, ids):
    return model.generate(
        ids, max_new_tokens=GEN, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0
    )


def _reopen(model, store, make_store):
    store.close()
    cachedattn.unpatch(model)
    store = make_store()
    cachedattn.patch(model, store)
    return store


def _histories(model, g):
    """Runs each row's first turn alone; returns each conversation's ids so far."""
    hist = []
    for r, n in enumerate(HISTORY):
        if n == 0:
            hist.append(torch.zeros(0, dtype=torch.long))
            continue
        ids = torch.randint(1, VOCAB, (1, n), generator=g)
        with cachedattn.session(model, f"c{r}"):
            out = _gen(model, ids)
        hist.append(out.sequences[0])
    return hist


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt_neox", "falcon", "mixtral"])
def test_batch_rows_match_recompute(arch, make_store):
    model = tiny_model(arch)
    store = make_store()
    cachedattn.patch(model, store)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hist = _histories(model, g)
        store = _reopen(model, store, make_store)  # the batch reads its histories from disk
        full = [torch.cat([h, torch.randint(1, VOCAB, (m,), generator=g)]) for h, m in zip(hist, NEW)]
        bs = cachedattn.batch_session(model, [f"c{r}" for r in range(len(full))])
        out = bs.generate(full, max_new_tokens=GEN, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=0)
        for r, ids in enumerate(full):
            ref = _gen(model, ids[None])
            ref_gen = ref.sequences[0, ids.numel():]
            assert torch.equal(out.rows[r], ref_gen), r
            diff = max((out.logits[j][r] - ref.logits[j][0]).abs().max().item() for j in range(ref_gen.numel()))
            assert diff <= 1e-4, (r, diff)
            row = bs.rows[r]
            assert row.reused_tokens == max(hist[r].numel() - 1, 0), r
            assert row.computed_tokens == ids.numel() - row.reused_tokens
            assert row.generated_tokens == ref_gen.numel() and row.ttft is not None
        store.wait_idle() if hasattr(store, "wait_idle") else None
        # The stored KV of every row equals recompute of that row's tokens.
        for r, ids in enumerate(full):
            turn = torch.cat([ids, out.rows[r]])
            load = store.load_prefix(f"c{r}", turn)
            assert load is not None and load.n_tokens >= ids.numel(), r
            pkv = model(turn[None, : load.n_tokens], use_cache=True).past_key_values
            for layer in range(len(pkv.layers)):
                k, v = load.read_layer(layer)
                assert (k - pkv.layers[layer].keys[0]).abs().max() <= 1e-4, (r, layer)
                assert (v - pkv.layers[layer].values[0]).abs().max() <= 1e-4, (r, layer)
            load.close()


def test_next_batch_turn_reuses_the_batch_turn(make_store):
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    g = torch.Generator().manual_seed(4)
    ids = [torch.randint(1, VOCAB, (n,), generator=g) for n in (4, 30, 17, 50)]
    with torch.no_grad():
        bs = cachedattn.batch_session(model, ["a", "b", "c", "d"])
        out = bs.generate(ids, max_new_tokens=GEN, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        full = [torch.cat([x, o, torch.randint(1, VOCAB, (6,), generator=g)]) for x, o in zip(ids, out.rows)]
        out2 = bs.generate(full, max_new_tokens=GEN, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        for r, x in enumerate(full):
            assert bs.rows[r].reused_tokens == ids[r].numel() + out.rows[r].numel() - 1
            ref = _gen(model, x[None]).sequences[0, x.numel():]
            assert torch.equal(out2.rows[r], ref)


def test_sampling_runs_and_rows_are_stored(make_store):
    model = tiny_model("qwen2")
    store = make_store()
    cachedattn.patch(model, store)
    ids = [torch.randint(1, VOCAB, (n,)) for n in (8, 20)]
    bs = cachedattn.batch_session(model, ["s0", "s1"])
    with torch.no_grad():
        out = bs.generate(ids, max_new_tokens=4, do_sample=True, top_k=20, temperature=0.8,
                          return_dict_in_generate=True, pad_token_id=0)
    for r, x in enumerate(ids):
        assert store.lookup(f"s{r}", torch.cat([x, out.rows[r]])) >= x.numel()


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_models_are_refused_by_name(arch, make_store):
    model = tiny_model(arch)
    cachedattn.patch(model, make_store())
    bs = cachedattn.batch_session(model, ["a", "b"])
    with pytest.raises(ValueError, match="sliding-window"):
        bs.generate([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], max_new_tokens=2)


def test_other_decoding_modes_are_refused_by_name(make_store):
    model = tiny_model("llama")
    cachedattn.patch(model, make_store())
    bs = cachedattn.batch_session(model, ["a", "b"])
    with pytest.raises(ValueError, match="num_beams"):
        bs.generate([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="twice"):
        cachedattn.batch_session(model, ["a", "a"])


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_forward_turns_feed_answers_like_recompute(arch, make_store):
    """Teacher forcing in a batch (the engine's answer jobs): prompt logits and the stored
    prompt + answer KV of every row equal its conversation alone, recomputed."""
    model = tiny_model(arch)
    store = make_store()
    cachedattn.patch(model, store)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        hist = _histories(model, g)
        store = _reopen(model, store, make_store)
        full = [torch.cat([h, torch.randint(1, VOCAB, (m,), generator=g)]) for h, m in zip(hist, NEW)]
        answers = [torch.randint(1, VOCAB, (k,), generator=g) for k in (4, 11, 1, 7)]
        bs = cachedattn.batch_session(model, [f"c{r}" for r in range(len(full))])
        logits, seqs = bs.forward_turns(full, answers)
        for r, (ids, a) in enumerate(zip(full, answers)):
            assert torch.equal(seqs[r], torch.cat([ids, a]))
            assert bs.rows[r].reused_tokens == max(hist[r].numel() - 1, 0), r
            assert (logits[r] - model(ids[None]).logits[0, -1]).abs().max() <= 1e-4, r
            load = store.load_prefix(f"c{r}", seqs[r])
            assert load is not None and load.n_tokens == seqs[r].numel(), r
            pkv = model(seqs[r][None], use_cache=True).past_key_values
            for layer in range(len(pkv.layers)):
                k, v = load.read_layer(layer)
                assert (k - pkv.layers[layer].keys[0]).abs().max() <= 1e-4, (r, layer)
                assert (v - pkv.layers[layer].values[0]).abs().max() <= 1e-4, (r, layer)
            load.close()
