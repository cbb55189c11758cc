import gc
import threading

import numpy as np
import pytest
import torch

from cachedattn import native

BLOCK = 64 << 10


@pytest.fixture
def pool():
    p = native.HostPool(16 * BLOCK, BLOCK, hugepages="off")
    yield p
    p.close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_blocks_are_distinct_aligned_and_bounded(pool):
    blocks = [pool.alloc() for _ in range(pool.num_blocks)]
    assert all(b is not None for b in blocks)
    ptrs = sorted(b.ptr for b in blocks)
    assert len(set(ptrs)) == 16
    assert all(p % 4096 == 0 for p in ptrs)
    assert all(b - a >= BLOCK for a, b in zip(ptrs, ptrs[1:]))
    assert ptrs[0] >= pool.base_ptr and ptrs[-1] + BLOCK <= pool.base_ptr + pool.capacity_bytes
    assert pool.num_free == 0
    assert pool.alloc() is None  # exhaustion is None by contract, not an error
    pool.free(blocks[3])
    assert pool.num_free == 1
    again = pool.alloc()
    assert again.ptr == blocks[3].ptr


def test_zero_copy_views(pool):
    b = pool.alloc()
    t = torch.frombuffer(b, dtype=torch.uint8)
    assert t.data_ptr() == b.ptr and t.numel() == BLOCK == len(b)
    data = torch.randint(0, 256, (BLOCK,), dtype=torch.uint8)
    t.copy_(data)
    other = np.frombuffer(pool.block_at(b.ptr), dtype=np.uint8)
    assert np.array_equal(other, data.numpy())
    assert memoryview(b).nbytes == BLOCK and not memoryview(b).readonly


def test_double_free_and_foreign_pointers_are_rejected(pool):
    b = pool.alloc()
    pool.free(b)
    with pytest.raises(ValueError, match="double free"):
        pool.free(b)
    with pytest.raises(ValueError, match="double free"):
        pool.free(b.ptr)
    c = pool.alloc()
    with pytest.raises(ValueError, match="not the start of a block"):
        pool.free(c.ptr + 8)
    with pytest.raises(ValueError, match="not the start of a block"):
        pool.free(pool.base_ptr + pool.capacity_bytes)
    with pytest.raises(ValueError, match="not the start of a block"):
        pool.free(12345)
    other = native.HostPool(2 * BLOCK, BLOCK, hugepages="off")
    with pytest.raises(ValueError, match="does not belong"):
        pool.free(other.alloc())
    with pytest.raises(TypeError):
        pool.free("block")
    pool.free(c.ptr)  # the right address frees
    assert pool.num_free == pool.num_blocks


@pytest.mark.parametrize(
    "cap,block,match",
    [(1 << 20, 1000, "multiple of 4096"), (1 << 20, 0, "multiple of 4096"), (4096, 8192, "smaller than one block")],
)
def test_bad_geometry(cap, block, match):
    with pytest.raises(ValueError, match=match):
        native.HostPool(cap, block)


def test_bad_hugepage_mode():
    with pytest.raises(ValueError, match="hugepages"):
        native.HostPool(1 << 20, 4096, hugepages="maybe")


def test_hugepages_on_without_reserved_pages_is_a_clear_error():
    with open("/proc/sys/vm/nr_hugepages") as f:
        if int(f.read()) > 0:
            pytest.skip("huge pages are reserved on this machine")
    with pytest.raises(OSError, match="huge pages"):
        native.HostPool(4 << 20, 1 << 20, hugepages="on")
    assert native.HostPool(4 << 20, 1 << 20, hugepages="auto").page_kind in {"thp", "4k"}


def test_closed_pool_refuses_work_and_views_outlive_it():
    gc.collect()  # regions of earlier tests' objects still awaiting collection
    base = native.live_regions()
    p = native.HostPool(4 * BLOCK, BLOCK, hugepages="off")
    b = p.alloc()
    t = torch.frombuffer(b, dtype=torch.float32)
    t.fill_(3.5)
    del b
    p.close()
    p.close()  # idempotent
    assert p.closed
    with pytest.raises(ValueError, match="closed"):
        p.alloc()
    # The view keeps the region mapped; releasing it unmaps exactly once.
    assert native.live_regions() == base + 1
    assert float(t.sum()) == 3.5 * t.numel()
    del t
    gc.collect()
    assert native.live_regions() == base


def test_no_leak_across_create_destroy_cycles():
    gc.collect()
    base_regions = native.live_regions()

    def cycle():
        p = native.HostPool(32 << 20, 1 << 20, hugepages="auto")
        blocks = [p.alloc() for _ in range(p.num_blocks)]
        for b in blocks:
            torch.frombuffer(b, dtype=torch.uint8).fill_(1)  # fault every page in
        p.close()

    cycle()
    gc.collect()
    before = _rss_bytes()
    for _ in range(60):
        cycle()
    gc.collect()
    grown = _rss_bytes() - before
    assert native.live_regions() == base_regions
    assert grown < 16 << 20, f"RSS grew by {grown >> 20} MiB over 60 cycles of 32 MiB pools"


def test_concurrent_alloc_free_never_hands_out_a_block_twice():
    p = native.HostPool(8 * 4096, 4096, hugepages="off")
    owners = {}
    lock = threading.Lock()
    errors = []

    def worker(tid):
        for _ in range(3000):
            b = p.alloc()
            if b is None:
                continue
            with lock:
                if b.index in owners:
                    errors.append(f"block {b.index} owned twice")
                owners[b.index] = tid
            with lock:
                del owners[b.index]
            p.free(b)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert p.num_free == p.num_blocks
