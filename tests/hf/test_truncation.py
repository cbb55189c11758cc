"""Context-window overflow: dropping the oldest tokens and reusing the rest's KV."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import cachedattn
from cachedattn.hf.positions import ROTATE, UNCHANGED
from cachedattn.hf.truncation import plan_drop

from .models import NOPE_LAYERS, VOCAB
from .test_positions import CASES

COMPAT = Path(__file__).resolve().parents[2] / "docs" / "compat.json"


def _rotating_compat_archs() -> list[str]:
    """Every architecture docs/compat.md lists as served whose overflow re-rotates keys."""
    table = json.loads(COMPAT.read_text())
    return sorted(a for a, r in table.items() if r["status"] == "works" and r.get("positions", "").startswith(ROTATE))

W = 96  # max_context; chunks are 16 tokens, so the default drop is 48


def _model(case):
    arch, kw, _, _ = CASES[case]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw)).eval()


def _ids(n, seed=3):
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _layer0_keys_from_scratch(model, ids):
    cache = DynamicCache(config=model.config)
    kwarg = model._cachedattn.kv.cache_kwarg
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kwarg: cache})
    return cache.layers[0].keys[0].float()


def test_plan_drop():
    assert plan_drop(90, 0, 96, 0.5, 0, 16) == 0
    assert plan_drop(120, 0, 96, 0.5, 0, 16) == 48
    assert plan_drop(300, 10, 96, 0.5, 0, 16) == 240  # dropped repeatedly, whole steps
    assert plan_drop(100, 0, 96, 0.1, 0, 16) == 16  # at least a chunk
    assert plan_drop(50, 60, 96, 0.5, 4, 16) == 45  # never everything after the sinks


@pytest.mark.parametrize(
    "case", ["llama-default", "llama-linear", "llama-llama3", "llama-yarn", "gpt_neox-partial", "phi-partial",
             "gptj-interleaved", "cohere-interleaved"]
)
@pytest.mark.parametrize("keep_first", [0, 4])
def test_layer0_keys_after_truncation_equal_recomputed_window(case, keep_first, make_store):
    model = _model(case)
    store = make_store()
    cachedattn.patch(model, store, max_context=W, keep_first=keep_first)
    ids = _ids(120)
    with torch.no_grad():
        with cachedattn.session(model, "c") as s:
            model(ids[:, :80])
            model(ids)  # 120 > 96: drops 48 tokens after the first keep_first
            assert s.dropped_tokens == 48 and s.reused_tokens == 80 - 48 and "re-rotated" in s.position_note
    kept = torch.cat([ids[:, :keep_first], ids[:, keep_first + 48 :]], 1)
    assert torch.equal(torch.as_tensor(store.stored_tokens("c")).long(), kept[0])
    with store.load("c", kept.shape[1]) as ld:
        got, _ = ld.read_layer(0)
    want = _layer0_keys_from_scratch(model, kept)
    assert (got.float() - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def _distributions(policy, layers, make_store, tmp_path):
    """Next-token log-probabilities over the turn's new tokens after a 48-token drop.

    initializer_range 0.3: sharp enough attention for positions to matter in a random model."""
    from .models import COMMON

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", **dict(COMMON, num_key_value_heads=2, num_hidden_layers=layers,
                                               initializer_range=0.3))
    model = AutoModelForCausalLM.from_config(cfg).eval()
    cachedattn.patch(model, make_store(disk_dir=str(tmp_path / policy)), max_context=W, position_policy=policy)
    ids = _ids(120)
    with torch.no_grad(), cachedattn.session(model, "c") as s:
        model(ids[:, :80])
        logits = model(ids).logits[0, -40:]  # the 40 new tokens (TT computes the whole kept window)
        assert s.dropped_tokens == 48
    return torch.log_softmax(logits.double(), -1)


def _kl(p, q):
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("layers,factor", [(1, 1e6), (3, 3.0)])
def test_reapplied_positions_are_much_closer_to_recompute_than_not(layers, factor, make_store, tmp_path):
    """CA vs TT vs NKVT. One layer: re-rotated keys are exactly the recomputed ones,
    so CA equals TT. Three layers: deeper layers still carry the dropped context
    (the paper's trade-off), yet CA stays several times closer to TT than NKVT."""
    tt, ca, nk = (_distributions(p, layers, make_store, tmp_path) for p in ("recompute", "reapply", "keep"))
    kl_ca, kl_nk = _kl(tt, ca), _kl(tt, nk)
    assert kl_nk > 0.5 and kl_ca * factor < kl_nk, (kl_ca, kl_nk)


def test_recompute_policy_equals_the_plain_model_on_the_kept_window(make_store):
    model = _model("llama-default")
    cachedattn.patch(model, make_store(), max_context=W, position_policy="recompute")
    ids = _ids(120)
    with torch.no_grad():
        with cachedattn.session(model, "c") as s:
            model(ids[:, :80])
            got = model(ids).logits
            assert s.reused_tokens == 0 and s.computed_tokens == 72
        ref = model(ids[:, 48:]).logits
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case,word", [("gpt2-absolute", "recomputed"), ("llama-dynamic", "recomputed"),
                                        ("bloom-alibi", "as they are")])
def test_where_rotation_cannot_apply_it_says_so(case, word, make_store):
    model = _model(case)
    cachedattn.patch(model, make_store(), max_context=W)
    ids = _ids(120)
    with torch.no_grad():
        with cachedattn.session(model, "c") as s:
            model(ids[:, :80])
            got = model(ids).logits
            assert word in s.position_note, s.position_note
        if word == "recomputed":  # exact: the same as the plain model on the kept window
            assert (got - model(ids[:, 48:]).logits).abs().max().item() <= 1e-4


def test_repeated_overflow_keeps_working_and_adds_up(make_store):
    model = _model("llama-default")
    store = make_store()
    cachedattn.patch(model, store, max_context=W, keep_first=8)
    g = torch.Generator().manual_seed(9)
    history = torch.zeros(1, 0, dtype=torch.long)
    dropped = []
    with torch.no_grad(), cachedattn.session(model, "long") as s:
        for turn in range(8):
            full = torch.cat([history, torch.randint(1, VOCAB, (1, 30), generator=g)], 1)
            out = model.generate(full, max_new_tokens=5, do_sample=False, pad_token_id=0)
            dropped.append(s.dropped_tokens)
            assert out.shape[1] <= W
            if s.dropped_tokens:
                assert s.reused_tokens > 0  # kept KV is reused, not recomputed
            history = out  # the returned sequence is the kept window plus the answer
    assert sum(d > 0 for d in dropped) >= 3
    assert s.total_dropped == sum(dropped)
    stored = torch.as_tensor(store.stored_tokens("long")).long()
    assert torch.equal(stored, history[0, : len(stored)]) and len(stored) == history.shape[1] - 1


def test_bad_options(make_store):
    model = _model("llama-default")
    with pytest.raises(ValueError, match="truncate_ratio"):
        cachedattn.patch(model, make_store(disk_dir=None), truncate_ratio=0)
    cachedattn.patch(model, make_store(), max_context=W)
    with pytest.raises(ValueError, match="position_policy"):
        cachedattn.session(model, "x", position_policy="guess")
    with pytest.raises(TypeError, match="unknown session options"):
        cachedattn.session(model, "x", max_contxt=5)


class _RecordingCache(DynamicCache):
    """Keeps every key each layer computed, sliding-window layers included."""

    def __init__(self, config):
        super().__init__(config=config)
        self.keys_seen: dict[int, list[torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys_seen.setdefault(layer_idx, []).append(key_states.detach().float())
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _keys_at_positions(model, ids, positions) -> list[torch.Tensor]:
    cache = _RecordingCache(model.config)
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions[None], use_cache=True, **{model._cachedattn.kv.cache_kwarg: cache})
    return [torch.cat(cache.keys_seen[i], -2)[0] for i in sorted(cache.keys_seen)]


def _read_all_layers(store, conv, n, layers):
    with store.load(conv, n) as ld:
        return [ld.read_layer(i)[0].float().clone() for i in range(layers)]


def _check_every_layer_after_overflow(model, store, keep_first, nope_layers=()):
    """Turn 1 stores 30 tokens computed at positions 16..45; turn 2 (40 tokens, window 32) drops
    16 after the first keep_first and moves the rest's stored keys by -16.

    Truth per layer, from the model itself: the same 30 tokens run at positions 0..29 keep every
    relative position, so each layer's key of a kept token there is its stored key moved by -16
    with that layer's own RoPE, or unchanged without RoPE (for layer 0: exactly the key computed
    from scratch at the new position). The first keep_first tokens keep their positions and keys.
    (Turn 1 starts at 16 rather than the truth at -16: some models look positions up in a table.)"""
    ids, drop, stored = _ids(40, seed=11), 16, 30
    layers = model._cachedattn.kv.spec.num_layers
    with torch.no_grad(), cachedattn.session(model, "w") as s:
        model(ids[:, :stored], position_ids=(torch.arange(stored) + drop)[None])
        if model._cachedattn.saver is not None:  # the GPU path saves asynchronously (tests/transfer runs this too)
            model._cachedattn.saver.wait("w")
        old = _read_all_layers(store, "w", stored, layers)
        model(ids)
        assert s.dropped_tokens == drop and "re-rotated" in s.position_note, s.position_note
    if model._cachedattn.saver is not None:
        model._cachedattn.saver.wait("w")
    kept = stored - drop
    new = _read_all_layers(store, "w", kept, layers)
    shifted = _keys_at_positions(model, ids[:, :stored], torch.arange(stored))
    scheme = model._cachedattn.positions
    k = keep_first
    for layer in range(layers):
        want = torch.cat([old[layer][:, :k], shifted[layer][:, k + drop : stored]], 1)
        tol = 1e-4 * max(1.0, want.abs().max().item())
        assert (new[layer] - want).abs().max().item() <= tol, f"layer {layer} ({scheme.layers[layer].kind})"
        if scheme.layers[layer].kind == UNCHANGED or layer in nope_layers:
            # not rotated at all: bit for bit the keys stored before the drop
            assert torch.equal(new[layer], torch.cat([old[layer][:, :k], old[layer][:, k + drop :]], 1)), layer
    assert [i for i, lp in enumerate(scheme.layers) if lp.kind == UNCHANGED] == sorted(nope_layers) or not nope_layers


ROTATING_CASES = [c for c in CASES if CASES[c][2] == ROTATE]


@pytest.mark.parametrize("case", ROTATING_CASES)
@pytest.mark.parametrize("keep_first", [0, 4])
def test_every_layers_keys_after_overflow_are_the_truth(case, keep_first, make_store):
    model = _model(case)
    store = make_store()
    cachedattn.patch(model, store, max_context=32, keep_first=keep_first)
    _check_every_layer_after_overflow(model, store, keep_first, NOPE_LAYERS.get(CASES[case][0], ()))


@pytest.mark.parametrize("arch", _rotating_compat_archs())
def test_every_layers_keys_after_overflow_on_every_rotating_architecture(arch, make_store):
    """Each architecture docs/compat.md lists as working with re-rotated keys, in the compat
    checker's first tiny configuration (NoPE and sliding layers alternate where it has them)."""
    from cachedattn.hf import tiny

    model = tiny.tiny_model(arch, 0)
    store = make_store()
    cachedattn.patch(model, store, max_context=32)
    _check_every_layer_after_overflow(model, store, 0)
