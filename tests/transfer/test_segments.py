"""Per-layer segment plans from the chunk layout, checked against KVLoad's own copy-out."""

import pytest
import torch

from cachedattn.store.spec import ChunkGeometry, KVSpec
from cachedattn.transfer.segments import place, plan_layer

C = 16


@pytest.fixture
def geo():
    return ChunkGeometry(KVSpec(((2, 8), (3, 4), (1, 8)), torch.float32), C)


def _blocks(geo, n_chunks):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 255, (geo.block_bytes,), dtype=torch.uint8, generator=g) for _ in range(n_chunks)]


def _expected(geo, blocks, layer, start, end):
    ks, vs = zip(*(geo.kv_views(b, layer) for b in blocks))
    return torch.cat(ks, 1)[:, start:end], torch.cat(vs, 1)[:, start:end]


def _same(a, b):  # random bytes hold NaNs: compare bits
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _run(geo, blocks, plan):
    slot = torch.zeros(plan.nbytes + 64, dtype=torch.uint8)
    import ctypes

    for src, dst, n in plan.segments([b.data_ptr() for b in blocks], slot.data_ptr()):
        ctypes.memmove(dst, src, n)
    return place(plan, slot, geo)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40, 48])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_full_layer_history_not_a_multiple_of_the_chunk(geo, n, layer):
    blocks = _blocks(geo, (n + C - 1) // C)
    plan = plan_layer(geo, layer, n)
    assert plan.chunks == len(blocks) and (plan.start, plan.end) == (0, n)
    assert plan.range_bytes == 2 * geo.k_bytes[layer]  # one copy per chunk: K and V together
    k, v = _run(geo, blocks, plan)
    ek, ev = _expected(geo, blocks, layer, 0, n)
    assert _same(k, ek) and _same(v, ev)


@pytest.mark.parametrize("n,window", [(40, 8), (40, 17), (40, 41), (40, 100), (33, 2), (32, 17), (5, 4)])
def test_sliding_window_copies_only_the_chunks_of_the_last_window(geo, n, window):
    blocks = _blocks(geo, (n + C - 1) // C)
    plan = plan_layer(geo, 1, n, window)
    start = max(0, n - (window - 1))
    assert (plan.start, plan.end) == (start, n)
    assert plan.first_chunk == start // C and plan.chunks == (n - 1) // C - start // C + 1
    k, v = _run(geo, blocks, plan)
    ek, ev = _expected(geo, blocks, 1, start, n)
    assert _same(k, ek) and _same(v, ev)


def test_window_of_one_needs_nothing(geo):
    plan = plan_layer(geo, 0, 40, 1)
    assert plan.chunks == 0 and plan.nbytes == 0 and plan.segments([], 0) == []


def test_segments_for_a_subset_of_chunks_land_in_their_place(geo):
    plan = plan_layer(geo, 2, 40)
    segs = plan.segments({0: 1000, 1: 5000, 2: 9000}, 0, positions=[2])
    assert segs == [(9000 + geo.layer_offset[2], 2 * plan.range_bytes, plan.range_bytes)]
    with pytest.raises(ValueError, match="not part"):
        plan.segments({3: 0}, 0, positions=[3])


def test_bad_inputs(geo):
    with pytest.raises(ValueError, match="out of range"):
        plan_layer(geo, 3, 10)
    with pytest.raises(ValueError, match="n_tokens"):
        plan_layer(geo, 0, -1)


@pytest.mark.parametrize("n,window", [(16, None), (10, None), (32, None), (40, 8), (16, 17), (53, 20)])
def test_placed_history_never_shares_the_staging_slot(geo, n, window):
    """The slot is refilled for a later layer once the compute stream passed place(): K/V that
    are views of it (a one-chunk plan stays contiguous) would then be read after the refill."""
    blocks = _blocks(geo, (n + C - 1) // C)
    plan = plan_layer(geo, 0, n, window)
    k, v = _run(geo, blocks, plan)
    ek, ev = _expected(geo, blocks, 0, plan.start, n)
    import ctypes

    ptrs = [k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()]
    slot = torch.zeros(plan.nbytes + 64, dtype=torch.uint8)
    for src, dst, nb in plan.segments([b.data_ptr() for b in blocks], slot.data_ptr()):
        ctypes.memmove(dst, src, nb)
    k2, v2 = place(plan, slot, geo)
    slot.fill_(0xFF)  # the refill
    assert _same(k2, ek) and _same(v2, ev) and _same(k, ek) and len(set(ptrs)) == 2


@pytest.mark.parametrize("n,window", [(40, None), (40, 17), (16, None), (33, 2)])
def test_place_writes_into_the_callers_tensors(geo, n, window):
    blocks = _blocks(geo, (n + C - 1) // C)
    plan = plan_layer(geo, 1, n, window)
    slot = torch.zeros(plan.nbytes, dtype=torch.uint8)
    import ctypes

    for src, dst, nb in plan.segments([b.data_ptr() for b in blocks], slot.data_ptr()):
        ctypes.memmove(dst, src, nb)
    m = n - plan.start
    big_k, big_v = torch.zeros(2, 3, m + 7, 4), torch.zeros(2, 3, m + 7, 4)  # [rows, h, tokens + new, d]
    k, v = place(plan, slot, geo, big_k[1, :, :m], big_v[1, :, :m])
    ek, ev = _expected(geo, blocks, 1, plan.start, n)
    assert _same(big_k[1, :, :m], ek) and _same(big_v[1, :, :m], ev)
    assert k.data_ptr() == big_k[1].data_ptr() and not big_k[0].any() and not big_k[1, :, m:].any()
    with pytest.raises(ValueError, match="needs"):
        place(plan, slot, geo, big_k[1], big_v[1])
