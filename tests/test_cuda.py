"""The CUDA copy engine, against the CPU references. Skipped without a GPU."""

import numpy as np
import pytest
import torch

from cachedattn import kernels, native

pytestmark = pytest.mark.cuda

BLOCK = 1 << 20


@pytest.fixture(scope="module")
def pool():
    p = native.HostPool(64 * BLOCK, BLOCK, hugepages="auto")
    assert p.cuda_registered
    yield p
    p.close()


@pytest.fixture
def engine():
    return native.CopyEngine(0, 8)


def _block_tensor(block, dtype=torch.uint8):
    return torch.frombuffer(block, dtype=dtype)


def test_copy_batch_round_trip_and_layer_events(pool, engine):
    blocks = [pool.alloc() for _ in range(4)]
    try:
        src = [_block_tensor(b) for b in blocks]
        for t in src:
            t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8))
        dev = torch.full((4, BLOCK), 7, dtype=torch.uint8, device="cuda")
        engine.copy_batch("h2d", [(b.ptr, dev[i].data_ptr(), BLOCK) for i, b in enumerate(blocks)], layer=3)
        compute = torch.cuda.current_stream()
        engine.stream_wait_layer("h2d", 3, compute.cuda_stream)  # no host sync
        doubled = dev.to(torch.int32) * 2  # runs on the compute stream after the copy
        assert torch.equal(doubled.cpu(), torch.stack(src).to(torch.int32) * 2)
        back = torch.zeros(4, BLOCK, dtype=torch.uint8).pin_memory()
        engine.wait_for_stream("d2h", compute.cuda_stream)
        engine.copy_batch("d2h", [(dev[i].data_ptr(), back[i].data_ptr(), BLOCK) for i in range(4)], layer=3)
        engine.synchronize("d2h")
        assert engine.layer_done("d2h", 3)
        assert torch.equal(back, torch.stack(src))
    finally:
        for b in blocks:
            pool.free(b)


@pytest.mark.parametrize("nseg", [1, 37, 1500])
def test_segment_copy_gathers_and_scatters(pool, engine, nseg):
    rng = np.random.default_rng(nseg)
    blocks = [pool.alloc() for _ in range(8)]
    try:
        for b in blocks:
            _block_tensor(b).copy_(torch.randint(0, 256, (BLOCK,), dtype=torch.uint8))
        sizes = rng.integers(1, 4000, nseg)
        total = int(sizes.sum())
        dev = torch.zeros(total, dtype=torch.uint8, device="cuda")
        segs, want, off = [], [], 0
        for s in sizes:
            b = blocks[rng.integers(0, 8)]
            start = int(rng.integers(0, BLOCK - s))
            segs.append((b.ptr + start, dev.data_ptr() + off, int(s)))
            want.append(_block_tensor(b)[start : start + s].clone())
            off += int(s)
        engine.segment_copy("h2d", segs, layer=0)
        engine.synchronize("h2d")
        assert torch.equal(dev.cpu(), torch.cat(want))
        # Scatter back into other host blocks.
        out = [pool.alloc() for _ in range(2)]
        try:
            _block_tensor(out[0]).zero_()
            half = min(total, BLOCK)
            engine.segment_copy("d2h", [(dev.data_ptr(), out[0].ptr, half)], layer=1)
            engine.synchronize("d2h")
            assert torch.equal(_block_tensor(out[0])[:half], torch.cat(want)[:half])
        finally:
            for b in out:
                pool.free(b)
    finally:
        for b in blocks:
            pool.free(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim,interleaved", [(128, 128, False), (80, 32, False), (64, 64, True)])
def test_rope_copy_matches_cpu_reference(pool, engine, dtype, head_dim, rotary_dim, interleaved):
    torch.manual_seed(0)
    b = pool.alloc()
    try:
        n = BLOCK // (head_dim * torch.tensor([], dtype=dtype).element_size())
        host = _block_tensor(b, dtype)[: n * head_dim].view(n, head_dim)
        host.copy_(torch.randn(n, head_dim).to(dtype))
        inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        dev = torch.empty(n, head_dim, dtype=dtype, device="cuda")
        kernels.rope_rotate(host, -1234, inv, rotary_dim, interleaved, out=dev, engine=engine, layer=2)
        engine.stream_wait_layer("h2d", 2, torch.cuda.current_stream().cuda_stream)
        ref = kernels.rope_rotate(host, -1234, inv, rotary_dim, interleaved)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(dev.cpu().float(), ref.float(), atol=tol * 4, rtol=tol)
    finally:
        pool.free(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_in_place_on_device(engine, dtype, interleaved):
    # The wiring's use: copy to the GPU, then rotate in place (src == dst, no __restrict__).
    x = torch.randn(4, 16, 64, device="cuda").to(dtype)
    inv = torch.rand(32)
    ref = kernels.rope_rotate(x.cpu(), 7, inv, interleaved=interleaved)
    kernels.rope_rotate(x, 7, inv, interleaved=interleaved, out=x, engine=engine)
    engine.synchronize("h2d")
    # Same float math and one rounding per element as the CPU reference: at most an ulp apart (FMA).
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(x.cpu().float(), ref.float(), atol=tol, rtol=tol)


def test_pageable_memory_is_refused(engine):
    host = torch.zeros(1024, dtype=torch.uint8)  # not pinned
    dev = torch.zeros(1024, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="pageable"):
        engine.segment_copy("h2d", [(host.data_ptr(), dev.data_ptr(), 1024)])


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_copy_batch_refuses_pageable_host_memory(engine, direction):
    # A pageable cudaMemcpyAsync is silently synchronous (and staged): refused, naming the pointer.
    host = torch.zeros(4096, dtype=torch.uint8)
    pinned = torch.zeros(4096, dtype=torch.uint8).pin_memory()
    dev = torch.zeros(4096, dtype=torch.uint8, device="cuda")
    ok = (pinned.data_ptr(), dev.data_ptr(), 4096) if direction == "h2d" else (dev.data_ptr(), pinned.data_ptr(), 4096)
    bad = (host.data_ptr(), dev.data_ptr(), 4096) if direction == "h2d" else (dev.data_ptr(), host.data_ptr(), 4096)
    engine.begin_epoch()
    with pytest.raises(ValueError, match="pageable") as info:
        engine.copy_batch(direction, [ok, bad], layer=1)
    assert f"{host.data_ptr():#x}" in str(info.value)
    # Refused before anything was queued: layer 1 was not issued.
    with pytest.raises(RuntimeError, match="not issued"):
        engine.wait_layer(direction, 1)


def test_bad_layer_and_direction(engine):
    with pytest.raises(ValueError, match="layer"):
        engine.copy_batch("h2d", [], layer=8)
    with pytest.raises(ValueError, match="direction"):
        engine.copy_batch("sideways", [])


def test_many_back_to_back_layer_copies_stay_ordered(pool, engine):
    # The classic bug: compute reads a layer before its copy landed. Reuse the
    # same device buffers turn after turn with different data each time.
    layers = 8
    blocks = [pool.alloc() for _ in range(layers)]
    try:
        dev = torch.empty(layers, BLOCK // 4, device="cuda")
        compute = torch.cuda.current_stream()
        for turn in range(50):
            for i, b in enumerate(blocks):
                _block_tensor(b, torch.float32).fill_(turn * 100 + i)
            sums = []
            for i, b in enumerate(blocks):
                engine.copy_batch("h2d", [(b.ptr, dev[i].data_ptr(), BLOCK)], layer=i)
            for i in range(layers):
                engine.stream_wait_layer("h2d", i, compute.cuda_stream)
                sums.append(dev[i].mean())
            got = torch.stack(sums).cpu()
            # The host rewrites blocks next turn: wait for this turn's copies first.
            engine.synchronize("h2d")
            assert torch.equal(got, torch.tensor([turn * 100.0 + i for i in range(layers)])), turn
    finally:
        for b in blocks:
            pool.free(b)


def test_stale_layer_events_are_refused_after_a_new_epoch(pool, engine):
    # Regression: events were reused across turns, so waiting for layer i before
    # this turn's copy of it was issued bound to last turn's copy.
    b = pool.alloc()
    try:
        dev = torch.zeros(BLOCK, dtype=torch.uint8, device="cuda")
        _block_tensor(b).fill_(1)
        e0 = engine.begin_epoch()
        engine.copy_batch("h2d", [(b.ptr, dev.data_ptr(), BLOCK)], layer=3)
        engine.wait_layer("h2d", 3)
        assert engine.layer_done("h2d", 3)
        e1 = engine.begin_epoch()
        assert e1 == e0 + 1
        stream = torch.cuda.current_stream().cuda_stream
        for call in (
            lambda: engine.wait_layer("h2d", 3),
            lambda: engine.stream_wait_layer("h2d", 3, stream),
            lambda: engine.layer_done("h2d", 3),
        ):
            with pytest.raises(RuntimeError, match=f"layer 3 of direction h2d was not issued in epoch {e1}"):
                call()
        _block_tensor(b).fill_(2)
        engine.copy_batch("h2d", [(b.ptr, dev.data_ptr(), BLOCK)], layer=3)
        engine.stream_wait_layer("h2d", 3, stream)
        assert int(dev.min()) == 2 and int(dev.max()) == 2
        engine.synchronize("h2d")
    finally:
        pool.free(b)


def _delay(ms: float = 200.0) -> None:
    """Queues at least ~ms of GPU work on the current stream (torch's spin kernel).

    Counted in cycles at 2 GHz, above the boost clock of the cards we run on.
    """
    torch.cuda._sleep(int(ms * 2e6))


def test_wait_layer_blocks_until_the_layers_copy_landed(pool, engine):
    b = pool.alloc()
    try:
        _block_tensor(b).fill_(5)
        dev = torch.zeros(BLOCK, dtype=torch.uint8, device="cuda")
        engine.begin_epoch()
        _delay()
        engine.wait_for_stream("h2d", torch.cuda.current_stream().cuda_stream)
        engine.copy_batch("h2d", [(b.ptr, dev.data_ptr(), BLOCK)], layer=0)
        assert not engine.layer_done("h2d", 0)  # still behind the delay
        engine.wait_layer("h2d", 0)
        assert engine.layer_done("h2d", 0)
    finally:
        pool.free(b)
    assert int(dev.min()) == 5


def test_tickets_mark_copies_issued_so_far_and_are_released_once_done(pool, engine):
    b = pool.alloc()
    try:
        dev = torch.full((BLOCK,), 9, dtype=torch.uint8, device="cuda")
        _delay()
        engine.wait_for_stream("d2h", torch.cuda.current_stream().cuda_stream)
        engine.copy_batch("d2h", [(dev.data_ptr(), b.ptr, BLOCK)])
        t = engine.record("d2h")
        assert t > 0  # 0 is never a ticket (the fake engine agrees)
        assert not engine.ticket_done(t)
        engine.wait_ticket(t)
        assert int(_block_tensor(b).min()) == 9
        with pytest.raises(ValueError, match="unknown or already released"):
            engine.ticket_done(t)
        t2 = engine.record("d2h")
        while not engine.ticket_done(t2):
            pass
        with pytest.raises(ValueError, match="already released"):
            engine.wait_ticket(t2)
        # Many tickets: events come back to the pool instead of piling up.
        for _ in range(2000):
            engine.wait_ticket(engine.record("h2d"))
    finally:
        pool.free(b)


def test_host_waits_release_the_gil(pool, engine):
    import threading
    import time

    b = pool.alloc()
    try:
        dev = torch.zeros(BLOCK, dtype=torch.uint8, device="cuda")
        _delay(300)
        engine.wait_for_stream("h2d", torch.cuda.current_stream().cuda_stream)
        engine.copy_batch("h2d", [(b.ptr, dev.data_ptr(), BLOCK)], layer=0)
        t = engine.record("h2d")
        waiter = threading.Thread(target=engine.wait_ticket, args=(t,))
        start = last = time.perf_counter()
        longest_stall = 0.0
        waiter.start()
        while waiter.is_alive():  # this thread runs only while the waiter does not hold the GIL
            now = time.perf_counter()
            longest_stall, last = max(longest_stall, now - last), now
        waiter.join()
        assert last - start > 0.2  # the wait really lasted
        assert longest_stall < 0.1, f"Python stalled {longest_stall:.3f} s during a host wait"
    finally:
        pool.free(b)


def test_rope_on_gpu_keys_waits_for_the_compute_that_wrote_them(engine):
    # Regression: rope_copy launched on the engine's stream without waiting for
    # torch's current stream, rotating keys before compute had written them.
    src = torch.randn(64, 8, 128)
    inv = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))
    ref = kernels.rope_rotate(src, 11, inv)
    x = torch.zeros(64, 8, 128, device="cuda")
    src_dev = src.cuda()
    torch.cuda.synchronize()
    _delay()
    x.copy_(src_dev)  # compute writes the keys, late
    kernels.rope_rotate(x, 11, inv, out=x, engine=engine)
    engine.synchronize("h2d")
    torch.testing.assert_close(x.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_d2h_segment_copy_waits_for_the_compute_that_wrote_the_source(pool, engine):
    b = pool.alloc()
    try:
        host = _block_tensor(b)
        host.zero_()
        want = torch.randint(0, 256, (BLOCK,), dtype=torch.uint8)
        want_dev = want.cuda()
        dev = torch.zeros(BLOCK, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        _delay()
        dev.copy_(want_dev)  # compute writes the source, late
        kernels.segment_copy([(dev, host)], engine=engine, direction="d2h")
        engine.synchronize("d2h")
        assert torch.equal(host, want)
    finally:
        pool.free(b)


def test_closing_a_pool_waits_for_copies_still_reading_it(engine):
    # Regression: Region::~Region unregistered (and unmapped) host memory while
    # a queued H2D copy still read it.
    p = native.HostPool(8 * BLOCK, BLOCK, hugepages="off")
    blocks = [p.alloc() for _ in range(8)]
    want = torch.randint(0, 256, (8, BLOCK), dtype=torch.uint8)
    for i, blk in enumerate(blocks):
        _block_tensor(blk).copy_(want[i])
    dev = torch.zeros(8, BLOCK, dtype=torch.uint8, device="cuda")
    before = native.live_regions()
    _delay(300)
    engine.wait_for_stream("h2d", torch.cuda.current_stream().cuda_stream)
    engine.copy_batch("h2d", [(blk.ptr, dev[i].data_ptr(), BLOCK) for i, blk in enumerate(blocks)])
    for blk in blocks:
        p.free(blk)
    del blocks, blk
    p.close()
    assert native.live_regions() == before - 1  # the region is gone: teardown waited for the copy
    engine.synchronize("h2d")
    assert torch.equal(dev.cpu(), want)


def test_concurrent_wait_for_stream_keeps_every_dependency(engine):
    # Two threads fencing the same direction on different streams: each wait must
    # bind to its own stream's record, never to the other thread's.
    import threading

    streams = [torch.cuda.Stream() for _ in range(2)]
    bufs = [torch.zeros(1 << 20, device="cuda") for _ in range(2)]
    pinned = [torch.zeros(1 << 20).pin_memory() for _ in range(2)]

    def worker(i):
        with torch.cuda.stream(streams[i]):
            for turn in range(20):
                _delay(5)
                bufs[i].fill_(turn * 10 + i)
                engine.wait_for_stream("d2h", streams[i].cuda_stream)
                engine.copy_batch("d2h", [(bufs[i].data_ptr(), pinned[i].data_ptr(), 4 << 20)])
                engine.synchronize("d2h")
                assert float(pinned[i].min()) == float(pinned[i].max()) == turn * 10 + i, (i, turn)

    errors = []

    def run(i):
        try:
            worker(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_open_epochs_keep_their_layer_events_until_ended(pool, engine):
    """One epoch per load: the read buffer's new epoch leaves the running load's events usable."""
    b = pool.alloc()
    try:
        _block_tensor(b).fill_(3)
        dev = torch.zeros(2, BLOCK, dtype=torch.uint8, device="cuda")
        e1 = engine.begin_epoch()
        engine.copy_batch("h2d", [(b.ptr, dev[0].data_ptr(), BLOCK)], layer=2, epoch=e1)
        e2 = engine.begin_epoch()
        engine.copy_batch("h2d", [(b.ptr, dev[1].data_ptr(), BLOCK)], layer=2, epoch=e2)
        stream = torch.cuda.current_stream().cuda_stream
        engine.stream_wait_layer("h2d", 2, stream, e1)
        assert int(dev[0].min()) == 3
        engine.wait_layer("h2d", 2, e2)
        assert engine.layer_done("h2d", 2, e1) and engine.layer_done("h2d", 2, e2)
        engine.end_epoch(e1)
        with pytest.raises(RuntimeError, match=f"layer 2 of direction h2d was not issued in epoch {e1}"):
            engine.wait_layer("h2d", 2, e1)
        with pytest.raises(RuntimeError, match=f"epoch {e1} is not open"):
            engine.copy_batch("h2d", [(b.ptr, dev[0].data_ptr(), BLOCK)], layer=2, epoch=e1)
        engine.end_epoch(e2)
    finally:
        pool.free(b)


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
def test_copy_2d_moves_strided_rows_in_one_call(pool, engine, direction):
    """One cudaMemcpy2DAsync per layer, chunk and K/V: every head's tokens of a chunk (rows of
    `width` bytes at the source's head stride, into the block's head stride)."""
    b = pool.alloc()
    try:
        host = _block_tensor(b, torch.float32)[: 8 * 64].view(8, 64)  # 8 heads x 64 floats
        dev = torch.arange(8 * 100, dtype=torch.float32, device="cuda").view(8, 100)
        engine.begin_epoch()
        if direction == "d2h":
            host.zero_()
            engine.copy_2d("d2h", dev.data_ptr() + 4 * 10, 400, host.data_ptr() + 4 * 5, 256, 4 * 20, 8, layer=1)
            engine.wait_layer("d2h", 1)
            assert torch.equal(host[:, 5:25], dev[:, 10:30].cpu())
            assert not host[:, :5].any() and not host[:, 25:].any()
        else:
            host.copy_(torch.arange(8 * 64, dtype=torch.float32).view(8, 64))
            engine.copy_2d("h2d", host.data_ptr() + 4 * 5, 256, dev.data_ptr() + 4 * 10, 400, 4 * 20, 8, layer=1)
            engine.stream_wait_layer("h2d", 1, torch.cuda.current_stream().cuda_stream)
            assert torch.equal(dev[:, 10:30].cpu(), host[:, 5:25])
        with pytest.raises(ValueError, match="exceeds a pitch"):
            engine.copy_2d(direction, host.data_ptr(), 16, dev.data_ptr(), 16, 32, 2)
    finally:
        pool.free(b)


def test_copy_2d_refuses_pageable_host_memory(engine):
    host = torch.zeros(4096, dtype=torch.uint8)
    dev = torch.zeros(4096, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="pageable"):
        engine.copy_2d("h2d", host.data_ptr(), 64, dev.data_ptr(), 64, 64, 8)
