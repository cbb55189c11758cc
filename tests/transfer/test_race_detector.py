"""The stream-ordering race detector itself (cachedattn.testing.race): for each
hazard kind a deliberately broken snippet it must report, and the fixed
snippet it must accept. The snippets use the fake copy engine and torch ops on
simulated streams exactly as the GPU path does."""

import numpy as np
import pytest
import torch

from cachedattn.testing.happens_before import HappensBefore
from cachedattn.testing.race import Detector, RaceError, detect
from cachedattn.testing.fake_engine import FakeCopyEngine
from cachedattn.transfer import checkpoints, streams

pytestmark = pytest.mark.no_race_detector  # each test installs its own


def nbytes(t):
    return t.numel() * t.element_size()


def seg(src, dst):
    return (src.data_ptr(), dst.data_ptr(), nbytes(src))


@pytest.fixture
def det():
    with Detector() as d:
        yield d


@pytest.fixture
def eng():
    e = FakeCopyEngine(0, 4)
    yield e
    e.close()


def kinds(det):
    return sorted({r.kind for r in det.reports})


def host_src(n=16, value=1.0):
    return torch.from_numpy(np.full(n, value, np.float32))  # written by the host (numpy): no stream touched it


def compute():
    return streams.current(torch.device("cpu"))  # the handle production passes: the current simulated stream


# ---- compute reads a slot before the copy that fills it ----------------------------------------


def _fill_and_read(eng, wait: bool):
    slot = torch.empty(16)
    eng.wait_for_stream("h2d", compute())  # the slot's allocation precedes the copy
    eng.copy_batch("h2d", [seg(host_src(), slot)], layer=0)
    if wait:
        eng.stream_wait_layer("h2d", 0, compute())
    return slot * 2


def test_compute_reading_a_slot_before_its_copy_is_a_race(det, eng):
    _fill_and_read(eng, wait=False)
    assert kinds(det) == ["race"]
    assert "h2d copy destination" in det.reports[0].message and "compute stream 0" in det.reports[0].message


def test_compute_reading_a_slot_after_stream_wait_layer_is_ordered(det, eng):
    assert torch.equal(_fill_and_read(eng, wait=True), torch.full((16,), 2.0))
    det.check()


# ---- a refill before the last compute read ---------------------------------------------------------


def _refill(eng, fence: bool, read_after_refill: bool):
    slot = torch.empty(16)
    eng.wait_for_stream("h2d", compute())
    eng.copy_batch("h2d", [seg(host_src(value=1.0), slot)], layer=0)
    eng.stream_wait_layer("h2d", 0, compute())
    view = slot[:16]  # a view: nothing read yet (segments.place on a one-chunk plan, defect 1)
    out = None if read_after_refill else view * 1
    if fence:
        eng.wait_for_stream("h2d", compute())
    eng.copy_batch("h2d", [seg(host_src(value=2.0), slot)], layer=1)  # layer 1 into the same slot
    if read_after_refill:
        out = view * 1  # DynamicLayer's cat reads the view after the refill was issued
    eng.synchronize("h2d")  # before `slot` is freed: the allocator may hand its memory to the caller's next tensor
    return out


def test_a_refill_issued_before_the_last_read_of_the_slot_is_a_race(det, eng):
    _refill(eng, fence=True, read_after_refill=True)  # the chunk-aligned view race: fenced, but too early
    assert kinds(det) == ["race"]
    assert "read" in det.reports[0].message and "h2d copy destination" in det.reports[0].message


def test_a_refill_without_a_fence_is_a_race(det, eng):
    with pytest.raises(RuntimeError, match="slot reuse"):  # the fake engine sees this one too
        _refill(eng, fence=False, read_after_refill=False)
    assert kinds(det) == ["race"]


def test_a_refill_fenced_after_the_last_read_is_ordered(det, eng):
    assert torch.equal(_refill(eng, fence=True, read_after_refill=False), torch.ones(16))
    det.check()


# ---- a D2H copy before the compute that writes its source ------------------------------------------


def _save(eng, fence: bool):
    kv = torch.arange(16, dtype=torch.float32) * 3  # written by compute
    dst = host_src(value=0.0)
    if fence:
        eng.wait_for_stream("d2h", compute())
    eng.copy_batch("d2h", [seg(kv, dst)])
    eng.wait_ticket(eng.record("d2h"))
    return dst


def test_a_d2h_copy_not_fenced_after_the_compute_writing_its_source_is_a_race(det, eng):
    out = _save(eng, fence=False)
    assert torch.equal(out, torch.arange(16, dtype=torch.float32) * 3)  # the data came out right (luck)...
    assert kinds(det) == ["race"]  # ...and the missing edge is reported anyway
    assert "d2h copy source" in det.reports[0].message


def test_a_d2h_copy_fenced_after_the_compute_is_ordered(det, eng):
    _save(eng, fence=True)
    det.check()


# ---- two copies into one range ------------------------------------------------------------------------


def test_two_copies_into_one_range_unordered_is_a_race(det):
    a, b = FakeCopyEngine(0, 2), FakeCopyEngine(1, 2)  # two devices' engines
    dst = host_src(value=0.0)
    a.copy_batch("d2h", [seg(host_src(value=1.0), dst)])
    b.copy_batch("d2h", [seg(host_src(value=2.0), dst)])
    a.synchronize("d2h"), b.synchronize("d2h")
    assert kinds(det) == ["race"]
    assert det.reports[0].message.count("d2h copy destination") == 2


def test_two_copies_into_one_range_with_a_host_wait_between_are_ordered(det):
    a, b = FakeCopyEngine(0, 2), FakeCopyEngine(1, 2)
    dst = host_src(value=0.0)
    a.copy_batch("d2h", [seg(host_src(value=1.0), dst)])
    a.wait_ticket(a.record("d2h"))
    b.copy_batch("d2h", [seg(host_src(value=2.0), dst)])
    b.synchronize("d2h")
    det.check()


# ---- a host block released while a copy using it is unordered with the release ---------------------


def _release(eng, host_wait: bool):
    block = host_src()
    slot = torch.empty(16)
    eng.wait_for_stream("h2d", compute())
    eng.copy_batch("h2d", [seg(block, slot)], layer=0)
    ticket = eng.record("h2d")
    eng.stream_wait_layer("h2d", 0, compute())  # the fake performs the copy here: the data is safe (luck)
    if host_wait:
        eng.wait_ticket(ticket)
    checkpoints.host_release(block.data_ptr(), nbytes(block))  # what HostBlock.release asks


def test_a_release_not_ordered_after_the_copy_reading_the_block_is_reported(det, eng):
    _release(eng, host_wait=False)  # the fake engine sees nothing pending: only the detector catches it
    assert kinds(det) == ["release"]
    assert "host block release" in det.reports[0].message and "h2d copy source" in det.reports[0].message


def test_a_release_after_the_ticket_wait_is_ordered(det, eng):
    _release(eng, host_wait=True)
    det.check()


# ---- device memory freed (a staging buffer back to the caching allocator) while a copy may use it -----------


def _free_staging(det, eng, host_wait: bool, record_reader: bool):
    """A staging slot allocated on stream 0, filled by the engine, read on stream 1, then freed on stream 0
    (what DeviceStaging._drop reports): what the free must come after."""
    alloc, reader = det.sim.stream(0, 0), det.sim.stream(0, 1)
    slot = torch.empty(16)
    eng.wait_for_stream("h2d", alloc.handle)
    eng.copy_batch("h2d", [seg(host_src(), slot)], layer=0)
    with det.sim.stream_ctx(reader):
        eng.stream_wait_layer("h2d", 0, reader.handle)  # the fake performs the copy here: nothing is pending
        slot * 2
    if host_wait:
        eng.wait_layer("h2d", 0)
    checkpoints.device_free(slot.data_ptr(), nbytes(slot), alloc.handle, [reader.handle] if record_reader else [])


def test_a_device_free_not_ordered_after_the_copy_into_the_buffer_is_reported(det, eng):
    _free_staging(det, eng, host_wait=False, record_reader=True)  # the fake engine sees nothing pending
    assert kinds(det) == ["free"]
    assert "h2d copy destination" in det.reports[0].message and "compute stream 0" in det.reports[0].message


def test_a_device_free_with_a_reader_stream_not_recorded_is_reported(det, eng):
    _free_staging(det, eng, host_wait=True, record_reader=False)
    assert kinds(det) == ["free"] and "compute stream 1" in det.reports[0].message


def test_a_device_free_after_the_host_waited_for_the_copy_with_its_readers_recorded_is_ordered(det, eng):
    _free_staging(det, eng, host_wait=True, record_reader=True)
    det.check()


def test_a_device_free_under_a_pending_copy_raises_in_the_fake_engine(det, eng):
    slot = torch.empty(16)
    eng.wait_for_stream("h2d", compute())
    eng.copy_batch("h2d", [seg(host_src(), slot)], layer=0)
    with pytest.raises(RuntimeError, match="released under a pending h2d copy"):
        checkpoints.device_free(slot.data_ptr(), nbytes(slot), compute())
    assert kinds(det) == ["free"]


# ---- a wait on an event of another epoch (another load) -------------------------------------------------


def test_a_wait_on_a_layer_of_an_earlier_epoch_is_reported(det, eng):
    slot = torch.empty(16)
    eng.wait_for_stream("h2d", compute())
    eng.begin_epoch()
    eng.copy_batch("h2d", [seg(host_src(), slot)], layer=0)
    eng.begin_epoch()  # another load began: layer 0's event is not this load's any more
    with pytest.raises(RuntimeError, match="not issued in epoch"):
        eng.stream_wait_layer("h2d", 0, compute())
    assert kinds(det) == ["stale-wait"]
    assert len(det.reports[0].stacks) == 2  # the wait and the begin_epoch that replaced the event


def test_a_wait_in_the_epoch_that_issued_the_layer_is_accepted(det, eng):
    slot = torch.empty(16)
    eng.wait_for_stream("h2d", compute())
    eng.begin_epoch()
    eng.copy_batch("h2d", [seg(host_src(), slot)], layer=0)
    eng.stream_wait_layer("h2d", 0, compute())
    slot.sum()
    det.check()


# ---- streams and devices ----------------------------------------------------------------------------------


def test_a_fence_on_a_stream_the_provider_never_gave_is_reported(det, eng):
    eng.wait_for_stream("h2d", 0)  # what the real provider answers on the CPU: captured outside the simulation
    assert kinds(det) == ["stream"]


def test_a_fence_on_the_default_stream_does_not_order_work_of_another_stream(det, eng):
    side = det.sim.stream(0, 1)
    with det.sim.stream_ctx(side):
        kv = torch.arange(16, dtype=torch.float32) * 3  # written on stream 1
    eng.wait_for_stream("d2h", compute())  # fences stream 0 only
    eng.copy_batch("d2h", [seg(kv, host_src(value=0.0))])
    eng.synchronize("d2h")
    assert kinds(det) == ["race"] and "compute stream 1 of device 0" in det.reports[0].message
    det.hb.reports.clear()
    with det.sim.stream_ctx(side):
        eng.wait_for_stream("d2h", compute())  # the stream the work ran on
    eng.copy_batch("d2h", [seg(kv, host_src(value=0.0))])
    eng.synchronize("d2h")
    det.check()


def test_two_compute_streams_need_an_edge(det):
    x = torch.ones(8) + 1
    side = det.sim.stream(0, 1)
    with det.sim.stream_ctx(side):
        x * 2
    assert kinds(det) == ["race"]
    det.hb.reports.clear()
    y = torch.ones(8) + 1
    det.wait_stream(side, det.sim.current_stream())  # side.wait_stream(current)
    with det.sim.stream_ctx(side):
        y * 2
    det.check()


def test_a_host_sync_orders_later_launches():
    with detect() as det:
        x = torch.ones(8) + 1
        assert x.sum().item() == 16.0  # the host waited for stream 0
        with det.sim.stream_ctx(det.sim.stream(0, 1)):
            x * 2  # launched after: ordered


def test_ops_mixing_two_simulated_devices_raise(det):
    a = torch.ones(4)
    with det.sim.device(1):
        b = torch.ones(4)  # made on device 1's stream
    det.sim.place(a, 0), det.sim.place(b, 1)
    with pytest.raises(RuntimeError, match="same device"):
        a + b
    with det.sim.device(1):
        c = b * 2  # runs on device 1's current stream; its output is on device 1
    assert det.sim.device_of(c) == torch.device("cpu", 1) and streams.device_of(c) == torch.device("cpu", 1)
    assert streams.current(torch.device("cpu", 1)) == det.sim.stream(1, 0).handle
    det.check()


def test_token_ids_carry_no_simulated_device(det):
    """Integer tensors are host bookkeeping: one at an address a device-1 tensor had (a placement left
    behind) mixes with device 0's floats, as position ids do in a rotary embedding (it raised mid-generate
    in a batch over split layers), and a tensor made from Python data takes no placement from its address."""
    x = torch.ones(4)
    det.sim.place(x, 0)
    ids = torch.arange(4)
    det.sim.place(ids, 1)
    assert torch.equal(x * ids.float(), torch.arange(4.0))
    made = torch.ones(2)
    det.sim.place(made, 1)  # as if a freed device-1 tensor had had this address
    torch.ops.aten.lift_fresh.default(made)  # what torch.tensor(data) dispatches for its new tensor
    assert det.sim.placed(made) is None
    det.check()


def test_check_raises_with_both_stacks(det, eng):
    _fill_and_read(eng, wait=False)
    with pytest.raises(RaceError) as e:
        det.check()
    text = str(e.value)
    assert "this access" in text and "the earlier access" in text and "_fill_and_read" in text


def test_memory_reused_by_an_allocation_while_a_copy_may_use_it_is_reported():
    hb = HappensBefore()
    engine, stream = "h2d", type("S", (), {"compute": True})()
    hb.access(engine, 0x1000, 0x2000, True, "copy", ())
    hb.access(stream, 0x1000, 0x1800, True, "allocation", (), fresh=True)
    assert [r.kind for r in hb.reports] == ["reuse"]
    hb.reports.clear()
    hb.edge(engine, stream)
    hb.access(stream, 0x1000, 0x1800, True, "allocation", (), fresh=True)
    assert hb.reports == []


def test_a_read_on_the_writing_stream_does_not_hide_the_write_from_other_streams():
    hb = HappensBefore()
    stream, engine = "compute", "d2h"
    hb.access(stream, 0x1000, 0x1400, True, "write", ())
    hb.access(stream, 0x1000, 0x1400, False, "attention reads it", ())  # must not replace the write
    hb.access(engine, 0x1000, 0x1400, False, "a D2H copy not fenced after it", ())
    assert [r.kind for r in hb.reports] == ["race"] and "write" in hb.reports[0].message
