"""The fake copy engine itself: deferred copies, epochs, tickets, the release
and slot-reuse rules. The wiring tests rely on every one of these."""

import pytest
import torch

from cachedattn import native
from cachedattn.testing.fake_engine import FakeCopyEngine
from cachedattn.transfer import checkpoints

# The engine's own semantics, with raw stream handles (the race detector's tests are test_race_detector.py).
pytestmark = pytest.mark.no_race_detector


def seg(src, dst):
    return (src.data_ptr(), dst.data_ptr(), src.numel() * src.element_size())


@pytest.fixture
def eng():
    e = FakeCopyEngine(0, 4)
    yield e
    e.close()


def test_copy_is_deferred_and_destination_undefined_until_waited(eng):
    src, dst = torch.arange(8, dtype=torch.float32), torch.zeros(8)
    eng.begin_epoch()
    eng.copy_batch("h2d", [seg(src, dst)], layer=0)
    assert torch.isnan(dst).all()  # a reader that skips the wait sees NaN, never the right values
    eng.stream_wait_layer("h2d", 0, 0)
    assert torch.equal(dst, src)


def test_waiting_one_layer_runs_only_what_precedes_its_event(eng):
    a, b = torch.ones(4), torch.full((4,), 2.0)
    da, db = torch.zeros(4), torch.zeros(4)
    eng.begin_epoch()
    eng.copy_batch("h2d", [seg(a, da)], layer=0)
    eng.copy_batch("h2d", [seg(b, db)], layer=1)
    eng.wait_layer("h2d", 0)
    assert torch.equal(da, a) and torch.isnan(db).all()
    eng.synchronize("h2d")
    assert torch.equal(db, b) and eng.pending() == 0


def test_a_layer_issued_in_two_batches_is_complete_only_after_the_second(eng):
    a, b, da, db = torch.ones(4), torch.full((4,), 3.0), torch.zeros(4), torch.zeros(4)
    eng.begin_epoch()
    eng.copy_batch("h2d", [seg(a, da)], layer=2)
    eng.copy_batch("h2d", [seg(b, db)], layer=2)  # e.g. the chunks read from disk, issued later
    eng.wait_layer("h2d", 2)
    assert torch.equal(da, a) and torch.equal(db, b)


def test_waiting_on_a_layer_of_an_earlier_epoch_raises(eng):
    src, dst = torch.ones(4), torch.zeros(4)
    eng.begin_epoch()
    eng.copy_batch("h2d", [seg(src, dst)], layer=1)
    eng.wait_layer("h2d", 1)
    e = eng.begin_epoch()
    with pytest.raises(RuntimeError, match=f"layer 1 of direction h2d was not issued in epoch {e}"):
        eng.stream_wait_layer("h2d", 1, 0)
    with pytest.raises(RuntimeError, match="not issued"):
        eng.layer_done("h2d", 1)
    with pytest.raises(RuntimeError, match="not issued"):
        eng.wait_layer("d2h", 1)


def test_layer_done_and_ticket_done_answer_false_first_then_perform(eng):
    src, dst = torch.ones(4), torch.zeros(4)
    eng.begin_epoch()
    eng.copy_batch("d2h", [seg(src, dst)], layer=3)
    t = eng.record("d2h")
    assert eng.layer_done("d2h", 3) is False and torch.isnan(dst).all()
    assert eng.layer_done("d2h", 3) is True and torch.equal(dst, src)
    assert eng.ticket_done(t) is False
    assert eng.ticket_done(t) is True
    with pytest.raises(ValueError, match="already released"):
        eng.wait_ticket(t)  # a ticket is released once seen done


def test_wait_ticket_covers_every_copy_issued_before_it(eng):
    srcs = [torch.full((4,), float(i)) for i in range(3)]
    dsts = [torch.zeros(4) for _ in range(3)]
    eng.copy_batch("d2h", [seg(srcs[0], dsts[0])])
    eng.copy_batch("d2h", [seg(srcs[1], dsts[1])])
    t = eng.record("d2h")
    eng.copy_batch("d2h", [seg(srcs[2], dsts[2])])
    eng.wait_ticket(t)
    assert torch.equal(dsts[1], srcs[1]) and torch.isnan(dsts[2]).all()


def test_releasing_memory_under_a_pending_copy_raises(eng):
    pool = native.HostPool(1 << 20, 1 << 16, hugepages="off", register_cuda=False)
    block = pool.alloc()
    dst = torch.zeros(16)
    eng.copy_batch("h2d", [(block.ptr, dst.data_ptr(), 64)])
    with pytest.raises(RuntimeError, match="released under a pending h2d copy"):
        checkpoints.host_release(block.ptr, block.nbytes)
    eng.synchronize("h2d")
    checkpoints.host_release(block.ptr, block.nbytes)
    pool.free(block)
    pool.close()


def test_host_block_release_asks_the_engines(eng, tmp_path):
    from cachedattn.store.block_pool import BlockPool

    tier = BlockPool(1 << 20, 1 << 16, "off")
    blk = tier.try_alloc()
    dst = torch.zeros(16)
    t0 = eng.record("h2d")
    eng.copy_batch("h2d", [(blk.ptr, dst.data_ptr(), 64)])
    t = eng.record("h2d")
    with pytest.raises(RuntimeError, match="released under a pending"):
        blk.release()
    eng.wait_ticket(t0)  # a ticket recorded before the copy does not cover it
    with pytest.raises(RuntimeError, match="released under a pending"):
        checkpoints.host_release(blk.ptr, 64)
    eng.wait_ticket(t)
    blk.release()
    tier.close()


def test_refilling_a_buffer_its_reader_was_not_fenced_from_raises(eng):
    src, buf = torch.ones(8), torch.zeros(8)
    eng.begin_epoch()
    eng.copy_batch("h2d", [seg(src, buf)], layer=0)
    eng.stream_wait_layer("h2d", 0, 7)  # compute stream 7 reads buf
    with pytest.raises(RuntimeError, match="slot reuse.*stream 7"):
        eng.copy_batch("h2d", [seg(src[:4], buf[4:])], layer=1)
    eng.wait_for_stream("h2d", 7)
    eng.copy_batch("h2d", [seg(src[:4], buf[4:])], layer=1)  # fenced: allowed


def test_a_host_wait_is_not_a_fence_for_compute_readers(eng):
    src, buf = torch.ones(8), torch.zeros(8)
    eng.begin_epoch()
    eng.copy_batch("h2d", [seg(src, buf)], layer=0)
    eng.stream_wait_layer("h2d", 0, 0)
    eng.synchronize("h2d")
    with pytest.raises(RuntimeError, match="slot reuse"):
        eng.copy_batch("h2d", [seg(src, buf)], layer=0)


def test_rope_copy_in_place_matches_the_cpu_reference(eng):
    from cachedattn.kernels import rope_rotate

    keys = torch.randn(3, 5, 8)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    want = rope_rotate(keys.clone(), 7, inv)
    got = keys.clone()
    eng.begin_epoch()
    eng.rope_copy(got.data_ptr(), got.data_ptr(), 15, 8, 8, False, 0, 7.0, inv.tolist(), 2)
    assert torch.isnan(got).all()
    eng.wait_layer("h2d", 2)
    torch.testing.assert_close(got, want)


def test_bad_arguments_are_refused(eng):
    with pytest.raises(ValueError, match="direction"):
        eng.copy_batch("x", [])
    with pytest.raises(ValueError, match="out of range"):
        eng.copy_batch("h2d", [], layer=4)
    with pytest.raises(ValueError, match="unknown"):
        eng.wait_ticket(12345)
    assert eng.stream("h2d") != eng.stream("d2h") and eng.num_layers == 4 and eng.device == 0


def test_epochs_are_per_load_a_new_one_keeps_the_open_ones(eng):
    """Defect 4: a second load (the read buffer) opening its epoch left the running load's
    layer events unusable. Open epochs each keep their events until end_epoch."""
    a, b, da, db = torch.ones(4), torch.full((4,), 2.0), torch.zeros(4), torch.zeros(4)
    e1 = eng.begin_epoch()
    eng.copy_batch("h2d", [seg(a, da)], layer=0, epoch=e1)
    e2 = eng.begin_epoch()
    eng.copy_batch("h2d", [seg(b, db)], layer=0, epoch=e2)
    eng.stream_wait_layer("h2d", 0, 0, e1)  # still valid, and only its own copy is waited for
    assert torch.equal(da, a) and torch.isnan(db).all()
    eng.wait_layer("h2d", 0, e2)
    assert torch.equal(db, b)
    eng.end_epoch(e1)
    with pytest.raises(RuntimeError, match=f"layer 0 of direction h2d was not issued in epoch {e1}"):
        eng.wait_layer("h2d", 0, e1)
    with pytest.raises(RuntimeError, match=f"epoch {e1} is not open"):
        eng.copy_batch("h2d", [seg(a, da)], layer=1, epoch=e1)
    eng.end_epoch(e2)


def test_copy_2d_copies_rows_between_pitches_and_is_deferred(eng):
    src = torch.arange(5 * 8, dtype=torch.float32).view(5, 8)  # 5 rows of 8, copy 3 columns of each
    dst = torch.zeros(5, 6)
    eng.begin_epoch()
    eng.copy_2d("d2h", src.data_ptr() + 4, 8 * 4, dst.data_ptr() + 8, 6 * 4, 3 * 4, 5, layer=1)
    assert torch.isnan(dst[:, 2:5]).all() and not dst[:, :2].any() and not dst[:, 5:].any()
    eng.wait_layer("d2h", 1)
    assert torch.equal(dst[:, 2:5], src[:, 1:4]) and not dst[:, :2].any() and not dst[:, 5:].any()
    assert eng.stats["copies"] == 1
    with pytest.raises(ValueError, match="exceeds a pitch"):
        eng.copy_2d("d2h", src.data_ptr(), 8, dst.data_ptr(), 8, 12, 1)
