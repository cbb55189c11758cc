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


def test_rope_in_place_on_device(engine):
    x = torch.randn(4, 16, 64, device="cuda")
    inv = torch.rand(32)
    ref = kernels.rope_rotate(x.cpu(), 7, inv)
    kernels.rope_rotate(x, 7, inv, out=x, engine=engine)
    engine.synchronize("h2d")
    torch.testing.assert_close(x.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_pageable_memory_is_refused(engine):
    host = torch.zeros(1024, dtype=torch.uint8)  # not pinned
    dev = torch.zeros(1024, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="pageable"):
        engine.segment_copy("h2d", [(host.data_ptr(), dev.data_ptr(), 1024)])


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
