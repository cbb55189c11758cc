"""The vLLM connector's core without vLLM: content keys, the scheduler-side
plan and the worker-side transfers against a real store and a paged KV
tensor in vLLM's CPU layout. (tests/vllm/test_vllm_engine.py runs a real
vLLM engine with the connector when the vLLM environment exists.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cachedattn
from cachedattn.store import KVSpec
from cachedattn.vllm.paged import PagedKV
from cachedattn.vllm.plan import PrefixPlanner
from cachedattn.vllm.prefix_keys import block_keys, namespace
from cachedattn.vllm.transfers import PagedTransfers

B, H, D, L, NB = 16, 2, 8, 3, 32


def _paged(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(NB, H, B, 2 * D, generator=g) for _ in range(L)]


@pytest.fixture
def rig(tmp_path):
    spec = KVSpec.uniform(L, H, D, torch.float32, model_digest="w1")
    store = cachedattn.AttentionStore(host_bytes=8 << 20, disk_dir=str(tmp_path / "kv"), chunk_tokens=B, hugepages="off", spec=spec)
    caches = _paged()
    paged = PagedKV(caches, B, H, D)
    ns = namespace("w1", "float32", "paged-test", B)
    planner, transfers = PrefixPlanner(ns, B), PagedTransfers(store, paged)
    yield store, caches, paged, planner, transfers
    transfers.close()
    store.close()


@pytest.fixture
def sync_rig(rig):
    """The rig's store and paged KV with "loads": "sync" (the connector's default on the CPU plan)."""
    store, caches, paged, _, _ = rig
    transfers = PagedTransfers(store, paged, sync_loads=True)
    yield store, caches, paged, PrefixPlanner(namespace("w1", "float32", "paged-test", B), B, sync_loads=True), transfers
    transfers.close()


def _on_disk_only(planner, transfers, store, toks, n):
    """Saves the first n blocks of toks, then leaves them on disk only; their keys."""
    planner.finished("saver", toks, n * B, list(range(n)))
    _step(planner, transfers)
    store.flush()
    keys = block_keys(planner.ns, toks, B, n)
    for k in keys:
        store.demote(k)
    assert all(store.residency(k)["host_bytes"] == 0 for k in keys)
    return keys


def _step(planner, transfers):
    """One vLLM step: the plan goes to the worker, its reports and lookup answers come back."""
    plan = planner.take_step()
    transfers.submit(plan)
    assert transfers.wait_idle(30)
    sent, received = transfers.finished()
    planner.reported(sent, received)
    planner.answered(transfers.answers())
    return plan, sent, received


def _matched(planner, transfers, req, toks, computed, salt=None):
    """vLLM asks; the first answer is "not yet" (a lookup goes to the worker), the next one counts."""
    assert planner.matched(req, toks, computed, salt=salt) is None
    _step(planner, transfers)
    return planner.matched(req, toks, computed, salt=salt)


def test_keys_name_the_whole_prefix_and_the_namespace():
    ns = namespace("w", "float32", "x", 4)
    a = block_keys(ns, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2 and a == block_keys(ns, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_keys(ns, [9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]  # block 2 has the same tokens but another prefix
    assert block_keys(namespace("w2", "float32", "x", 4), [1, 2, 3, 4], 4)[0] != a[0]  # other weights
    assert block_keys(namespace("w", "bfloat16", "x", 4), [1, 2, 3, 4], 4)[0] != a[0]
    with pytest.raises(ValueError, match="model digest"):
        namespace("", "float32", "x", 4)


def test_keys_are_identical_across_processes():
    import subprocess, sys

    code = "from cachedattn.vllm.prefix_keys import *; print(block_keys(namespace('w','f','l',2),[5,6,7,8],2))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert outs == {repr(block_keys(namespace("w", "f", "l", 2), [5, 6, 7, 8], 2)) + "\n"}


def test_the_namespace_names_the_settings_that_change_what_the_weights_compute(tmp_path):
    from types import SimpleNamespace as ModelConfig

    from cachedattn.vllm.identity import model_digest

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    base = dict(model=str(tmp_path), revision=None, dtype=torch.bfloat16, quantization=None, hf_overrides={})
    digest = model_digest(ModelConfig(**base))
    assert model_digest(ModelConfig(**base)) == digest
    for change in ({"dtype": torch.float16}, {"quantization": "fp8"}, {"hf_overrides": {"rope_theta": 1e6}}):
        assert model_digest(ModelConfig(**{**base, **change})) != digest, change
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert model_digest(ModelConfig(**base)) != digest
    with pytest.raises(ValueError, match="hf_overrides is a function"):
        model_digest(ModelConfig(**{**base, "hf_overrides": lambda config: config}))


def test_paged_layout_is_refused_by_shape():
    with pytest.raises(ValueError, match="not a layout the connector supports"):
        PagedKV([torch.zeros(4, H, B, D)], B, H, D)


def test_saved_blocks_load_back_into_other_paged_blocks(rig):
    store, caches, paged, planner, transfers = rig
    toks = np.arange(100, 100 + 3 * B + 5)
    first = [caches[l][[3, 4, 5]].clone() for l in range(L)]
    assert planner.finished("r1", toks, len(toks) - 1, [3, 4, 5, 6]) is True
    plan, sent, _ = _step(planner, transfers)
    assert sent == {"r1"} and len(plan.saves[0].keys) == 3
    n = _matched(planner, transfers, "r2", toks, 0)
    assert n == 3 * B
    planner.allocated("r2", [10, 11, 12, 13], n)
    _, _, received = _step(planner, transfers)
    assert received == {"r2"} and transfers.failed_blocks() == set()
    for l in range(L):
        assert torch.equal(caches[l][[10, 11, 12]], first[l])


def test_matched_leaves_the_last_token_and_skips_what_vllm_holds(rig):
    store, caches, paged, planner, transfers = rig
    toks = np.arange(7, 7 + 2 * B)
    planner.finished("r1", toks, 2 * B, [0, 1])
    _step(planner, transfers)
    assert _matched(planner, transfers, "a", toks, 0) == B  # 2B tokens: the last must be computed, so one block
    assert _matched(planner, transfers, "b", np.arange(7, 7 + 2 * B + 1), B) == B  # vLLM holds block 0 itself
    assert _matched(planner, transfers, "c", np.arange(8, 8 + 2 * B + 1), 0) == 0
    assert planner.matched("d", toks[:B], 0) == 0  # no whole block before the last token: nothing to ask


def test_keys_of_a_request_asked_again_are_those_of_its_tokens_now():
    """The planner reuses the keys it computed for a request's earlier asks: they must stay those of the
    request's tokens as they are now (grown by decoding, or changed: a preempted request asked again)."""
    planner = PrefixPlanner(namespace("w1", "float32", "paged-test", B), B)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 1000, 3 * B + 1)
    for step in range(6):
        assert planner.matched("r", toks, 0) is None
        assert planner.take_step().lookups[0].keys == block_keys(planner.ns, toks, B, (len(toks) - 1) // B)
        if step % 2:
            toks = toks.copy()
            toks[rng.integers(0, len(toks))] += 1  # a token changed (where earlier keys cover it, or not)
        toks = np.concatenate([toks, rng.integers(0, 1000, B)])  # and more of them
    planner.finished("r", toks, len(toks), list(range(len(toks) // B)))
    assert planner.take_step().saves[0].keys == block_keys(planner.ns, toks, B)


def test_a_cache_salt_keeps_requests_apart(rig):
    store, caches, paged, planner, transfers = rig
    toks = np.arange(70, 70 + 2 * B + 1)
    planner.finished("r1", toks, 2 * B, [0, 1], salt="tenant-a")
    _step(planner, transfers)
    assert planner.matched("r2", toks, 0, salt="tenant-b") is None
    assert planner.take_step().lookups[0].keys != block_keys(planner.ns, toks, B, 2)
    assert _matched(planner, transfers, "r3", toks, 0) == 0  # no salt
    assert _matched(planner, transfers, "r4", toks, 0, salt="tenant-b") == 0
    assert _matched(planner, transfers, "r5", toks, 0, salt="tenant-a") == 2 * B


def test_requests_whose_kv_their_tokens_do_not_name_bypass_the_store():
    from types import SimpleNamespace as Req

    from cachedattn.vllm.scope import request_scope

    plain = dict(lora_request=None, mm_features=[], prompt_embeds=None, cache_salt=None, skip_reading_prefix_cache=False)
    assert request_scope(Req(**plain)).bypass is None and request_scope(Req(**plain)).load
    for field, value in (("lora_request", object()), ("mm_features", [object()]), ("prompt_embeds", torch.zeros(3, 4))):
        assert request_scope(Req(**{**plain, field: value})).bypass, field
    assert request_scope(Req(**{**plain, "cache_salt": "t"})).salt == "t"
    logprobs = request_scope(Req(**{**plain, "skip_reading_prefix_cache": True}))
    assert not logprobs.load and logprobs.bypass is None  # computed whole, and saved


def test_a_sync_load_fills_the_blocks_in_the_step_that_schedules_it(sync_rig):
    """"loads": "sync" (the default): the scheduler side says load_async=False, and the worker copies before
    the step's forward returns from start_load_kv; nothing is reported received (vLLM expects nothing)."""
    store, caches, paged, planner, transfers = sync_rig
    toks = np.arange(800, 800 + 2 * B + 1)
    planner.finished("r1", toks, 2 * B, [0, 1])
    _step(planner, transfers)
    planner.allocated("r2", [9, 10], _matched(planner, transfers, "r2", toks, 0))
    transfers.submit(planner.take_step())  # start_load_kv, before the forward: no waiting for the pool
    for layer in range(L):
        assert torch.equal(caches[layer][[9, 10]], caches[layer][[0, 1]])
    assert transfers.wait_idle(30) and transfers.finished() == (set(), set())


def test_a_sync_lookup_brings_the_blocks_from_disk_into_host_memory_before_it_answers(sync_rig):
    store, caches, paged, planner, transfers = sync_rig
    toks = np.arange(850, 850 + 3 * B + 1)
    keys = _on_disk_only(planner, transfers, store, toks, 3)
    assert _matched(planner, transfers, "r2", toks, 0) == 3 * B
    assert all(store.residency(k)["disk_only_bytes"] == 0 for k in keys)  # the step's copy reads host memory


def test_a_shared_prefix_is_stored_once(rig):
    store, caches, paged, planner, transfers = rig
    system = np.arange(500, 500 + B)
    a = np.concatenate([system, np.arange(1, B + 1)])
    b = np.concatenate([system, np.arange(900, 900 + B)])
    planner.finished("a", a, len(a), [0, 1])
    _step(planner, transfers)
    planner.finished("b", b, len(b), [2, 3])
    _step(planner, transfers)
    assert transfers.stats["blocks_saved"] == 3  # the system prompt's block once, then a's and b's own
    assert len(store.conversations()) == 3


def test_a_damaged_block_is_reported_and_later_ones_too(rig, tmp_path):
    store, caches, paged, planner, transfers = rig
    toks = np.arange(40, 40 + 3 * B + 1)
    planner.finished("r1", toks, 3 * B, [0, 1, 2])
    _step(planner, transfers)
    store.flush()
    keys = block_keys(planner.ns, toks, B, 3)
    n = _matched(planner, transfers, "r2", toks, 0)
    planner.allocated("r2", [20, 21, 22], n)
    store.drop(keys[1])  # gone between the lookup and the load
    _step(planner, transfers)
    assert transfers.failed_blocks() == {21, 22}
    assert transfers.stats["load_failures"] == 1


def test_an_aborted_load_holds_no_save(rig):
    store, caches, paged, planner, transfers = rig
    toks = np.arange(3, 3 + 2 * B + 1)
    planner.finished("r1", toks, 2 * B, [0, 1])
    _step(planner, transfers)
    planner.allocated("r2", [5, 6], _matched(planner, transfers, "r2", toks, 0))
    assert planner.finished("r2", toks, B, [5, 6]) is False  # its blocks are being filled: vLLM waits for the load
    assert planner.matched("r3", toks[:B], 0) == 0
    planner.finished("r3", toks, B, [7])  # nothing to load or save
    _step(planner, transfers)
    # nothing is kept of finished requests, whichever way they ended (saved, aborted while loading, no blocks)
    assert not planner._keys and not planner._asked and not planner._matched and not planner._loaded


def test_a_turn_waits_for_the_save_of_its_previous_turn(rig):
    store, caches, paged, planner, transfers = rig
    toks = np.arange(60, 60 + 2 * B + 3)
    planner.finished("t1", toks, 2 * B, [0, 1])
    assert planner.matched("t2", toks, 0) is None  # its blocks are being saved: ask again later
    _step(planner, transfers)
    assert not planner.take_step().lookups  # no lookup was asked while the save ran
    assert _matched(planner, transfers, "t2", toks, 0) == 2 * B


def test_a_request_that_loaded_its_prefix_saves_only_what_follows(rig):
    store, caches, paged, planner, transfers = rig
    toks = np.arange(200, 200 + 3 * B + 1)
    planner.finished("r1", toks, 2 * B, [0, 1])
    _step(planner, transfers)
    planner.allocated("r2", [4, 5, 6], _matched(planner, transfers, "r2", toks, 0))
    _step(planner, transfers)
    assert planner.finished("r2", toks, 3 * B, [4, 5, 6]) is True
    assert len(planner.take_step().saves[0].keys) == 1


def test_a_failing_lookup_is_a_shorter_match(rig):
    store, caches, paged, planner, transfers = rig
    toks = np.arange(300, 300 + 2 * B + 1)
    planner.finished("r1", toks, 2 * B, [0, 1])
    _step(planner, transfers)
    real = store.lookup_many
    store.lookup_many = lambda items, remote=True: (_ for _ in ()).throw(OSError(5, "EIO"))
    try:
        assert _matched(planner, transfers, "r2", toks, 0) == 0
    finally:
        store.lookup_many = real


def test_a_transfer_that_ends_after_a_report_is_reported_next_time(rig):
    """vLLM asks for finished transfers every step, also while one still runs."""
    store, caches, paged, planner, transfers = rig
    toks = np.arange(80, 80 + 2 * B + 1)
    planner.finished("s1", toks, 2 * B, [0, 1])
    gate = __import__("threading").Event()
    real = transfers._save
    transfers._save = lambda move: (gate.wait(10), real(move))
    transfers.submit(planner.take_step())
    assert transfers.finished() == (set(), set())  # still running
    gate.set()
    assert transfers.wait_idle(30)
    assert transfers.finished() == ({"s1"}, set())


def test_vllms_queue_reaches_the_eviction_policy_and_prefetches_from_disk(tmp_path):
    spec = KVSpec.uniform(L, H, D, torch.float32, model_digest="w1")
    store = cachedattn.AttentionStore(host_bytes=8 << 20, disk_dir=str(tmp_path / "kv"), chunk_tokens=B, hugepages="off",
                                      spec=spec, eviction="queue")
    planner, transfers = PrefixPlanner(namespace("w1", "float32", "t", B), B), PagedTransfers(store, PagedKV(_paged(), B, H, D))
    try:
        toks = np.arange(1, 1 + 2 * B + 1)
        keys = _on_disk_only(planner, transfers, store, toks, 2)
        assert planner.matched("r2", toks, 0) is None  # asks: r2 now waits in vLLM's queue
        plan = planner.take_step()
        assert plan.queued == tuple(keys)
        transfers.submit(plan)
        assert transfers.wait_idle(30)
        assert store.policy._view.queued == tuple(keys)
        deadline = __import__("time").monotonic() + 10
        while any(store.residency(k)["host_bytes"] == 0 for k in keys) and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.05)
        assert all(store.residency(k)["host_bytes"] > 0 for k in keys)  # brought in ahead of the load
        calls = []
        real = store.prefetch
        store.prefetch = lambda key: (calls.append(key), real(key))[1]
        assert planner.matched("r3", np.arange(900, 900 + 2 * B + 1), 0) is None  # the queue changes: r2 stays
        transfers.submit(planner.take_step())
        assert transfers.wait_idle(30)
        assert not set(calls) & set(keys)  # r2's blocks were prefetched once, not at every step they stay queued
        store.prefetch = real
        planner.answered(transfers.answers())
        planner.allocated("r2", [3, 4], planner.matched("r2", toks, 0))
        assert set(planner.take_step().queued) & set(keys) == set()  # r2 left the queue
    finally:
        transfers.close()
        store.close()
