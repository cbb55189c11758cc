"""The patched model's transfer path (hf.paths) is chosen once, at patch, and every consumer
(a session, a batched session, the serving engine, preload) goes through that one object; a save
takes a hf.turn.Turn value, not a session."""

import copy
import importlib

import pytest
import torch

import cachedattn
from cachedattn.hf import paths
from cachedattn.hf.paths import EnginePath, HostPath
from cachedattn.hf.turn import Turn
from cachedattn.serving import Engine
from cachedattn.transfer import streams
from cachedattn.transfer.factory import FAKE_ENV

from .models import VOCAB, tiny_model

hp = importlib.import_module("cachedattn.hf.patch")  # `cachedattn.hf.patch` as an attribute is the function


def _choose(monkeypatch, engine: bool) -> None:
    """What patch will find: the fake copy engine for CPU models, or none (the host path)."""
    if engine:
        monkeypatch.setenv(FAKE_ENV, "1")
    else:
        monkeypatch.delenv(FAKE_ENV, raising=False)


def _ids(n, seed=0):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("engine", [False, True])
def test_the_path_is_chosen_at_patch_and_kept_however_the_environment_changes(engine, make_store, monkeypatch):
    _choose(monkeypatch, engine)
    model = cachedattn.patch(tiny_model("llama"), make_store())
    path = model._cachedattn.path
    assert isinstance(path, EnginePath if engine else HostPath)
    # Changed after patch: the path is not chosen again at the next turn (only a device change does that).
    if engine:
        monkeypatch.delenv(FAKE_ENV)
    else:
        monkeypatch.setenv(FAKE_ENV, "1")
    with torch.no_grad():
        for n in (20, 40):
            with cachedattn.session(model, "c") as s:
                model(_ids(n))
            assert s.path is path and model._cachedattn.path is path
    assert s.reused_tokens == 20  # a plain forward stores the KV of every token it computed
    assert (model._cachedattn.gpu is not None) == engine and (model._cachedattn.saver is not None) == engine


def _record(monkeypatch, cls):
    """Every load_history and save of `cls`, as (call, path object)."""
    calls = []
    for name in ("load_history", "save", "preload", "trim"):
        real = getattr(cls, name)

        def spy(self, *a, _real=real, _name=name, **k):
            calls.append((_name, self))
            return _real(self, *a, **k)

        monkeypatch.setattr(cls, name, spy)
    return calls


@pytest.mark.parametrize("engine", [False, True])
def test_a_session_a_batch_and_the_engine_use_the_one_path_chosen_at_patch(engine, make_store, monkeypatch):
    _choose(monkeypatch, engine)
    model = cachedattn.patch(tiny_model("llama"), make_store())
    path = model._cachedattn.path
    calls = _record(monkeypatch, type(path))
    a, b = _ids(40, 1), _ids(33, 2)
    with torch.no_grad():
        for conv, ids in (("a", a), ("b", b)):
            with cachedattn.session(model, conv):
                model(ids)
        assert {c for c, _ in calls} >= {"load_history", "save"}
        with cachedattn.batch_session(model, ["a", "b"]) as bs:
            bs.generate([torch.cat([a, _ids(3, 3)], 1), torch.cat([b, _ids(4, 4)], 1)], max_new_tokens=2,
                        do_sample=False, pad_token_id=0)
        assert [r.reused_tokens for r in bs.rows] == [40, 33]
        assert hp.preload(model, "a", torch.cat([a, _ids(5, 5)], 1)) == engine
    gen = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
    with Engine(model, model._cachedattn.store, background=False, max_batch=2) as eng:
        jobs = [eng.submit("a", torch.cat([a, _ids(6, 6)], 1), **gen), eng.submit("c", _ids(10, 7), **gen),
                eng.submit("b", torch.cat([b, _ids(6, 8)], 1), **gen)]
        sizes = []
        while batch := eng.step_batch():
            sizes.append(len(batch))
    assert sizes == [2, 1]  # a batch, then a job alone (a session)
    for j in jobs:
        j.result()
    assert jobs[0].reused_tokens >= 40 and jobs[2].reused_tokens >= 33
    assert {c for c, _ in calls} == {"load_history", "save", "preload", "trim"}
    assert all(p is path for _, p in calls) and model._cachedattn.path is path


class _Rows:
    """A cache as a save reads it: one row whose new KV (after the history) is given per layer."""

    def __init__(self, tokens, kv):
        self.tokens, self.kv = tokens, kv

    def computed_tokens(self):
        return self.tokens[None]

    def row_new_kv(self, layer, row, start, end):
        k, v = self.kv[layer]
        return k[:, start:end], v[:, start:end]


@pytest.mark.parametrize("engine", [False, True])
def test_a_turn_value_carries_everything_a_save_needs(engine, make_store, monkeypatch):
    """No session: a Turn (conversation, ids, reused tokens, the hidden-from point, the cache) saved
    through the path stores the tokens before the hidden-from point, and nothing after it."""
    _choose(monkeypatch, engine)
    model = tiny_model("llama")
    store = make_store()
    cachedattn.patch(model, store)
    ids = _ids(50, 9)
    with torch.no_grad():
        cachedattn.unpatch(model)
        pkv = model(ids, use_cache=True).past_key_values  # the KV a turn over ids computes
        cachedattn.patch(model, store)
    st = model._cachedattn
    kv = [(layer.keys[0], layer.values[0]) for layer in pkv.layers]
    turn = Turn("t", ids[0], 0, _Rows(ids[0], kv), hidden_from=37)
    done = st.path.save(turn)
    assert done is not None
    st.path.wait_saved("t")
    done.result(timeout=30)
    assert store.lookup("t", ids[0]) == 37  # the hidden-from point bounds what is stored
    with store.load("t", 37) as load:
        for layer, (k, v) in enumerate(kv):
            gk, gv = load.read_layer(layer)
            torch.testing.assert_close(gk, k[:, :37], atol=0, rtol=0)
            torch.testing.assert_close(gv, v[:, :37], atol=0, rtol=0)
    # A later start stores only what follows it; nothing new stores nothing.
    assert st.path.save(Turn("t", ids[0], 37, _Rows(ids[0, 37:], [(k[:, 37:], v[:, 37:]) for k, v in kv])),
                        start=37) is not None
    st.path.wait_saved("t")
    assert store.lookup("t", ids[0]) == 50
    assert st.path.save(Turn("t", ids[0], 50, _Rows(ids[0, 50:], kv))) is None


def test_a_model_moved_after_patch_gets_a_path_for_its_new_devices_and_the_old_one_lets_go(
    make_store, monkeypatch
):
    """The devices the path was chosen for no longer being the model's: at the next turn the old
    path is closed (its read buffer's lease ends, its saves in flight commit first) and a new one
    is chosen; the next turn still reuses what the old path saved."""
    monkeypatch.setenv(FAKE_ENV, "1")
    model = cachedattn.patch(tiny_model("llama"), make_store())
    st = model._cachedattn
    old = st.path
    ids = _ids(60, 11)
    with torch.no_grad():
        with cachedattn.session(model, "m"):
            model(ids[:, :40])
        assert hp.preload(model, "m", ids[:, :45])
        held = old.loader._ahead[2].load
        drained = []
        real_drain = old.saver.drain
        monkeypatch.setattr(old.saver, "drain", lambda: drained.append(1) or real_drain())
        old.loader.devices = [(torch.device("meta"), torch.device("meta"))] * 3  # as if the model had moved
        with cachedattn.session(model, "m") as s:
            out = model(ids).logits
    assert st.path is not old and isinstance(st.path, EnginePath) and s.path is st.path
    assert held._closed and old.preloaded_conversation() is None and drained == [1]
    assert s.reused_tokens == 40
    cachedattn.unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids).logits[:, 40:], atol=1e-4, rtol=0)


def test_host_path_is_chosen_again_when_the_devices_change(make_store, monkeypatch):
    monkeypatch.delenv(FAKE_ENV, raising=False)
    model = cachedattn.patch(tiny_model("llama"), make_store())
    old = model._cachedattn.path
    old.devices = [(torch.device("meta"), torch.device("meta"))] * 3
    monkeypatch.setenv(FAKE_ENV, "1")  # what the new devices get is chosen then
    with torch.no_grad(), cachedattn.session(model, "h") as s:
        model(_ids(10))
    assert isinstance(old, HostPath) and isinstance(s.path, EnginePath) and model._cachedattn.path is s.path


def test_a_layer_swapped_for_one_on_another_device_gets_a_path_for_it(make_store, monkeypatch):
    """A turn does not walk the model to find where its layers live: it reads the devices of the
    parameters it found before, and looks again when the weights identity saw tensors replaced.
    A layer swapped for a copy elsewhere (its parameters are new objects) must be seen."""
    monkeypatch.delenv(FAKE_ENV, raising=False)
    model = cachedattn.patch(tiny_model("llama"), make_store())
    st = model._cachedattn
    ids = _ids(30, 5)
    with torch.no_grad(), cachedattn.session(model, "w"):
        model(ids[:, :20])
    old = st.path
    moved = copy.deepcopy(model.model.layers[1].self_attn)
    elsewhere = {p.untyped_storage().data_ptr() for p in moved.parameters()}
    real = streams.device_of
    monkeypatch.setattr(streams, "device_of", lambda t: torch.device("meta") if t.untyped_storage().data_ptr() in elsewhere else real(t))
    model.model.layers[1].self_attn = moved
    with torch.no_grad(), cachedattn.session(model, "w") as s:
        out = model(ids).logits
    assert st.path is not old and s.path is st.path and st.path.devices[1][0] == torch.device("meta")
    assert s.reused_tokens == 20  # same weights: the store still serves them
    cachedattn.unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids).logits[:, 20:], atol=1e-4, rtol=0)


def test_the_transfer_path_module_holds_no_session():
    """Saving reads a Turn: the paths and saving modules never name a Session."""
    import inspect

    from cachedattn.hf import async_saving, saving

    for mod in (paths, saving, async_saving):
        src = inspect.getsource(mod)
        assert "session." not in src and ".patched" not in src, mod.__name__
