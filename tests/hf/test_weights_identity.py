"""Stored KV is only ever served to the weights it was computed with: weights
changed after patch() (in place, replaced, reloaded) make the next turn a full
recompute that stores nothing, and a fresh patch of changed weights on the
same directory reuses nothing, however small the change."""

import logging

import pytest
import torch

import cachedattn
from cachedattn.hf.identity import WeightsIdentity
from cachedattn.hf import weights as fingerprint

from .models import VOCAB, tiny_model

GEN = 5


def _add_inplace(m):
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.add_(1e-2)


def _load_other_state_dict(m):
    m.load_state_dict(tiny_model("llama", seed=1).state_dict())


def _replace_data(m):
    p = m.model.layers[1].mlp.up_proj.weight
    p.data = p.detach() * 1.05


def _unsampled_embedding_row(m):
    # Row 1 of the embedding (token 1 is in the history): flat index 64, between the
    # every-5th-element samples a strided digest of this 320x64 table would take.
    with torch.no_grad():
        m.model.embed_tokens.weight[1, 0] += 0.5


def _between_strided_samples(m):
    # One element past the first 4096 of a 6144-element matrix, where a digest of
    # 4096 evenly spaced samples (plus the last) does not look.
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.view(-1)[5000] += 0.5


CHANGES = {
    "add_inplace": _add_inplace,
    "load_state_dict": _load_other_state_dict,
    "data_replaced": _replace_data,
    "unsampled_embedding_row": _unsampled_embedding_row,
    "between_strided_samples": _between_strided_samples,
}


def _generate(model, ids):
    return model.generate(
        ids, max_new_tokens=GEN, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0
    )


def _turn(model, ids, mode):
    """(tokens, logits) of one turn: generate, or a plain forward's logits for the last tokens."""
    if mode == "generate":
        out = _generate(model, ids)
        return out.sequences, torch.stack(out.logits)
    logits = model(ids).logits
    return ids, logits[:, -10:]


def _check_same(got, ref):
    assert torch.equal(got[0], ref[0])
    diff = (got[1] - ref[1]).abs().max().item()
    assert diff <= 1e-4, diff


def _history():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (1, 40), generator=g)
    ids[0, 7] = 1  # a token whose embedding row a change may touch
    return ids, torch.randint(2, VOCAB, (1, 12), generator=g)


@pytest.mark.parametrize("mode", ["generate", "forward"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_weights_changed_after_patch_recompute_and_store_nothing(change, mode, make_store, caplog):
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    first, more = _history()
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            seq, _ = _turn(model, first, mode)
        full = torch.cat([seq, more], 1)
        stored = store.lookup("c", full[0])
        assert stored > 0
        CHANGES[change](model)
        for _ in range(2):  # the turn right after the change, and the one after it
            with caplog.at_level(logging.WARNING, "cachedattn"), cachedattn.session(model, "c") as s:
                got = _turn(model, full, mode)
            ref = _turn(model, full, mode)  # outside a session: recompute with the new weights
            _check_same(got, ref)
            assert s.reused_tokens == 0 and s.computed_tokens == full.shape[1]
            assert store.lookup("c", full[0]) == stored  # nothing of the new weights stored under the old
    assert sum("weights changed since patch()" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("change", list(CHANGES))
def test_fresh_patch_of_changed_weights_reuses_nothing(change, make_store):
    first, more = _history()
    old = tiny_model("llama")
    store = make_store()
    cachedattn.patch(old, store)
    with torch.no_grad(), cachedattn.session(old, "c"):
        seq = _generate(old, first).sequences
    store.close()  # another process, later, on the same directory
    new = tiny_model("llama")
    CHANGES[change](new)
    cachedattn.patch(new, make_store())
    full = torch.cat([seq, more], 1)
    with torch.no_grad():
        with cachedattn.session(new, "c") as s:
            got = _turn(new, full, "generate")
        _check_same(got, _turn(new, full, "generate"))
    assert s.reused_tokens == 0


def test_changed_and_changed_back_keeps_the_cache(make_store, caplog):
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    first, more = _history()
    p = model.model.layers[0].mlp.down_proj.weight
    saved = p.detach().clone()
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            seq = _generate(model, first).sequences
        full = torch.cat([seq, more], 1)
        p.view(-1)[5000] += 0.5
        p.copy_(saved)  # written twice, back to the very same bytes
        with caplog.at_level(logging.WARNING, "cachedattn"), cachedattn.session(model, "c") as s:
            got = _turn(model, full, "generate")
        _check_same(got, _turn(model, full, "generate"))
        assert s.reused_tokens == seq.shape[1] - 1
        assert store.lookup("c", got[0][0]) == got[0].shape[1] - 1  # and this turn was stored
    assert not [r for r in caplog.records if "weights" in r.getMessage()]


def test_changed_weights_cache_again_once_restored(make_store):
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    first, more = _history()
    saved = model.state_dict()
    saved = {k: v.clone() for k, v in saved.items()}
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            seq = _generate(model, first).sequences
        full = torch.cat([seq, more], 1)
        _add_inplace(model)
        with cachedattn.session(model, "c") as s:
            _turn(model, full, "generate")
        assert s.reused_tokens == 0
        model.load_state_dict(saved)
        with cachedattn.session(model, "c") as s:
            got = _turn(model, full, "generate")
        _check_same(got, _turn(model, full, "generate"))
        assert s.reused_tokens == seq.shape[1] - 1


# ---- the per-turn check itself -------------------------------------------------------


def _optimizer_step(m):
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    m(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()


def _assign_state_dict(m):
    m.load_state_dict({k: v.clone() + 1e-3 for k, v in m.state_dict().items()}, assign=True)


def _add_parameter(m):
    m.model.layers[0].self_attn.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))


def _remove_buffer(m):
    del m.model.rotary_emb.original_inv_freq


def _add_sparse_parameter(m):  # no storage to take the address of: the check cannot vouch for it
    m.model.layers[0].mlp.register_parameter("sparse", torch.nn.Parameter(torch.eye(3).to_sparse()))


def _edit_rotary_buffer(m):
    m.model.rotary_emb.inv_freq.mul_(1.5)


def _swap_module(m):
    torch.manual_seed(5)
    m.model.layers[1].mlp.gate_proj = torch.nn.Linear(64, 96, bias=False)


def _reshape_through_data(m):
    p = m.model.layers[0].self_attn.o_proj.weight  # square: same shape, other strides
    p.data = p.data.t()


DETECTED = {
    **CHANGES,
    "optimizer_step": _optimizer_step,
    "load_state_dict_assign": _assign_state_dict,
    "parameter_added": _add_parameter,
    "sparse_parameter_added": _add_sparse_parameter,
    "buffer_removed": _remove_buffer,
    "non_persistent_buffer_edited": _edit_rotary_buffer,
    "module_swapped": _swap_module,
    "transposed_through_data": _reshape_through_data,
}


@pytest.mark.parametrize("change", list(DETECTED))
def test_identity_check_sees_each_kind_of_change(change):
    model = tiny_model("llama")
    ident = WeightsIdentity(model)
    assert ident.check(model)
    DETECTED[change](model)
    assert not ident.check(model)
    assert not ident.check(model)  # still changed, now without re-hashing


def test_identity_check_rehashes_only_what_was_written(monkeypatch):
    model = tiny_model("llama")
    ident = WeightsIdentity(model)
    hashed = []
    real = fingerprint.tensor_digest
    monkeypatch.setattr(fingerprint, "tensor_digest", lambda t: hashed.append(t) or real(t))
    assert ident.check(model) and hashed == []
    with torch.no_grad():
        model.model.norm.weight.mul_(1.0)  # a write of the same values: counted, re-hashed, still current
    assert ident.check(model)
    assert len(hashed) == 1 and hashed[0] is model.model.norm.weight


def _unreadable(t):
    raise RuntimeError("cannot read this tensor")


def test_weights_that_cannot_be_hashed_are_never_served_stored_kv(make_store, monkeypatch):
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    first, more = _history()
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            seq = _generate(model, first).sequences
        monkeypatch.setattr(fingerprint, "tensor_digest", _unreadable)
        model.model.norm.weight.mul_(1.0)
        full = torch.cat([seq, more], 1)
        with cachedattn.session(model, "c") as s:
            got = _turn(model, full, "generate")
        _check_same(got, _turn(model, full, "generate"))
    assert s.reused_tokens == 0


def test_patch_refuses_weights_it_cannot_hash(make_store, monkeypatch):
    monkeypatch.setattr(fingerprint, "tensor_digest", _unreadable)
    with pytest.raises(cachedattn.UnsupportedModel, match="cannot hash its weights"):
        cachedattn.patch(tiny_model("llama"), make_store())


@pytest.mark.parametrize("policy", ["reapply", "recompute"])
def test_changed_weights_overflowing_the_window_compute_the_kept_window(policy, make_store):
    model = tiny_model("llama")
    cachedattn.patch(model, make_store(), max_context=64, position_policy=policy)
    first, more = _history()
    with torch.no_grad():
        with cachedattn.session(model, "c"):
            model(torch.cat([first, more], 1))
        _between_strided_samples(model)
        full = torch.cat([first, more, more], 1)  # 64 tokens, and 8 to leave room for: overflows
        with cachedattn.session(model, "c", reserve=8) as s:
            got = model(full).logits
        assert s.dropped_tokens > 0 and s.reused_tokens == 0
        ref = model(s.turn_ids[None]).logits
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("answer", [False, True], ids=["generate", "known_answer"])
def test_engine_jobs_after_a_weights_change_equal_recompute(answer, make_store):
    from cachedattn.serving import Engine

    model = tiny_model("llama")
    store = make_store()
    first, more = _history()
    known = torch.randint(2, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    kw = dict(answer=known) if answer else dict(max_new_tokens=GEN, do_sample=False, pad_token_id=0)
    with Engine(model, store, background=False) as engine:
        job = engine.submit("c", first, **kw)
        engine.step()
        seq = job.result()
        _unsampled_embedding_row(model)
        full = torch.cat([seq, more], 1)
        job = engine.submit("c", full, **kw)
        engine.step()
        got = job.result()
        stored = store.lookup("c", got[0])
    assert job.reused_tokens == 0
    assert stored <= seq.shape[1]  # the changed weights' turn was not stored
    if not answer:
        with torch.no_grad():
            assert torch.equal(got, model.generate(full, max_new_tokens=GEN, do_sample=False, pad_token_id=0))
