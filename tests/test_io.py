import errno
import logging
import os

import numpy as np
import pytest

from cachedattn import native



def _uring_usable() -> bool:
    try:
        native.io_engine("io_uring")
        return True
    except OSError:
        return False


URING_OK = _uring_usable()


@pytest.fixture(params=["threads", "io_uring"])
def engine(request):
    if request.param == "io_uring" and not URING_OK:
        pytest.skip("io_uring not built or refused by this kernel")
    return native.io_engine(request.param, threads=2, queue_depth=16)


@pytest.fixture
def pool():
    p = native.HostPool(64 << 20, 1 << 20, hugepages="off")
    yield p
    p.close()


def _fill(block, rng) -> np.ndarray:
    arr = np.frombuffer(block, dtype=np.uint8)
    arr[:] = rng.integers(0, 256, arr.size, dtype=np.uint8)
    return arr


def test_aligned_round_trip_through_pool_blocks(engine, pool, tmp_path, rng):
    src = [pool.alloc() for _ in range(8)]
    dst = [pool.alloc() for _ in range(8)]
    want = [_fill(b, rng).copy() for b in src]
    with native.File(str(tmp_path / "kv.bin"), "w") as f:
        # Out-of-order offsets: each request lands where it says.
        order = [5, 0, 7, 2, 1, 6, 3, 4]
        batch = engine.write([(f, i * (1 << 20), src[i].ptr, 1 << 20) for i in order])
        assert batch.wait(timeout=30)
        assert batch.bytes == 8 << 20
        assert f.size() == 8 << 20
        engine.read([(f, i * (1 << 20), dst[i].ptr, 1 << 20) for i in range(8)]).wait()
    for w, b in zip(want, dst):
        assert np.array_equal(np.frombuffer(b, dtype=np.uint8), w)


@pytest.mark.parametrize("offset,length", [(0, 1), (777, 12345), (4095, 4097), (4096, 3 * 4096 + 1), (1 << 20, 99)])
def test_unaligned_sizes_offsets_and_buffers(engine, tmp_path, rng, offset, length):
    raw = rng.integers(0, 256, length + 3, dtype=np.uint8)
    src = raw[3:]  # deliberately misaligned buffer address
    out_raw = np.zeros(length + 5, dtype=np.uint8)
    out = out_raw[5:]
    path = str(tmp_path / "u.bin")
    with native.File(path, "w") as f:
        engine.write([(f, offset, src.ctypes.data, length)]).wait()
        engine.read([(f, offset, out.ctypes.data, length)]).wait()
    assert np.array_equal(out, src)
    with open(path, "rb") as fh:
        fh.seek(offset)
        assert fh.read() == src.tobytes()


def test_large_batch(engine, tmp_path, rng):
    n, size = 1024, 16 << 10
    data = rng.integers(0, 256, n * size, dtype=np.uint8)
    back = np.zeros_like(data)
    with native.File(str(tmp_path / "big.bin"), "w") as f:
        engine.write([(f, i * size, data.ctypes.data + i * size, size) for i in range(n)]).wait()
        # Reverse order and a different split: the engine must not care.
        half = size // 2
        reqs = [(f, i * half, back.ctypes.data + i * half, half) for i in reversed(range(2 * n))]
        engine.read(reqs).wait()
    assert np.array_equal(back, data)


@pytest.mark.skipif(not URING_OK, reason="io_uring not built or refused by this kernel")
@pytest.mark.parametrize("writer,reader", [("io_uring", "threads"), ("threads", "io_uring")])
def test_backends_agree_byte_for_byte(writer, reader, tmp_path, rng, pool):
    blocks = [pool.alloc() for _ in range(4)]
    want = [_fill(b, rng).copy() for b in blocks]
    w = native.io_engine(writer, pool=pool)
    r = native.io_engine(reader, pool=pool)
    with native.File(str(tmp_path / "x.bin"), "w") as f:
        w.write([(f, i * (1 << 20), b.ptr, 1 << 20) for i, b in enumerate(blocks)]).wait()
        for b in blocks:
            np.frombuffer(b, dtype=np.uint8)[:] = 0
        r.read([(f, i * (1 << 20), b.ptr, 1 << 20) for i, b in enumerate(blocks)]).wait()
        # Also unaligned pieces straddling block boundaries.
        odd = np.zeros(3000, dtype=np.uint8)
        r.read([(f, (1 << 20) - 1500, odd.ctypes.data, 3000)]).wait()
    for w_, b in zip(want, blocks):
        assert np.array_equal(np.frombuffer(b, dtype=np.uint8), w_)
    assert np.array_equal(odd, np.concatenate([want[0][-1500:], want[1][:1500]]))


def test_fixed_buffers_round_trip(pool, tmp_path, rng):
    if not URING_OK:
        pytest.skip("io_uring not built or refused by this kernel")
    eng = native.io_engine("io_uring", pool=pool)
    a, b = pool.alloc(), pool.alloc()
    want = _fill(a, rng).copy()
    with native.File(str(tmp_path / "f.bin"), "w") as f:
        eng.write([(f, 0, a.ptr, 1 << 20)]).wait()
        eng.read([(f, 0, b.ptr, 1 << 20)]).wait()
    assert np.array_equal(np.frombuffer(b, dtype=np.uint8), want)


def test_raw_file_descriptors(engine, tmp_path, rng):
    data = rng.integers(0, 256, 10000, dtype=np.uint8)
    back = np.zeros_like(data)
    fd = os.open(tmp_path / "fd.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        engine.write([(fd, 0, data.ctypes.data, 5000), (fd, 5000, data.ctypes.data + 5000, 5000)]).wait()
        engine.read([(fd, 0, back.ctypes.data, 10000)]).wait()
    finally:
        os.close(fd)
    assert np.array_equal(back, data)


def test_tmpfs_works_with_or_without_direct_io(engine, rng):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = f"/dev/shm/cachedattn-test-{os.getpid()}"
    pool = native.HostPool(2 << 20, 1 << 20, hugepages="off")
    a, b = pool.alloc(), pool.alloc()
    want = _fill(a, rng).copy()
    try:
        with native.File(path, "w") as f:
            engine.write([(f, 0, a.ptr, 1 << 20)]).wait()
            engine.read([(f, 0, b.ptr, 1 << 20)]).wait()
    finally:
        os.unlink(path)
    assert np.array_equal(np.frombuffer(b, dtype=np.uint8), want)


def test_direct_io_on_a_regular_filesystem(tmp_path):
    # Either the filesystem takes O_DIRECT, or 'on' says clearly that it does not.
    try:
        f = native.File(str(tmp_path / "d.bin"), "w", direct="on")
    except OSError as e:
        assert e.errno == errno.EINVAL and e.filename == str(tmp_path / "d.bin")
    else:
        assert f.direct
        f.close()
    assert not native.File(str(tmp_path / "e.bin"), "w", direct="off").direct


# ---- errors ------------------------------------------------------------------


def test_missing_directory_names_the_path(tmp_path):
    path = str(tmp_path / "no" / "such" / "dir" / "f.bin")
    with pytest.raises(FileNotFoundError) as ei:
        native.File(path, "w")
    assert ei.value.errno == errno.ENOENT and ei.value.filename == path


def test_read_past_end_is_an_error(engine, tmp_path):
    path = str(tmp_path / "short.bin")
    with open(path, "wb") as fh:
        fh.write(b"x" * 5000)
    buf = np.zeros(8192, dtype=np.uint8)
    with native.File(path, "r") as f:
        with pytest.raises(OSError) as ei:
            engine.read([(f, 0, buf.ctypes.data, 8192)]).wait()
    assert ei.value.errno == errno.ENODATA and ei.value.filename == path
    assert "end of file" in str(ei.value)
    assert bytes(buf[:5000]) == b"x" * 5000  # what existed was still read


def test_write_to_read_only_file(engine, tmp_path):
    path = str(tmp_path / "ro.bin")
    open(path, "wb").close()
    buf = np.ones(4096, dtype=np.uint8)
    with native.File(path, "r") as f:
        with pytest.raises(OSError) as ei:
            engine.write([(f, 0, buf.ctypes.data, 4096)]).wait()
    assert ei.value.errno == errno.EBADF and ei.value.filename == path


def test_several_failures_are_counted(engine, tmp_path):
    path = str(tmp_path / "empty.bin")
    open(path, "wb").close()
    buf = np.zeros(100, dtype=np.uint8)
    with native.File(path, "r") as f:
        with pytest.raises(OSError, match="and 2 more failed"):
            engine.read([(f, i * 10, buf.ctypes.data, 10) for i in range(3)]).wait()


def test_closed_file_is_refused(engine, tmp_path):
    f = native.File(str(tmp_path / "c.bin"), "w")
    f.close()
    buf = np.zeros(16, dtype=np.uint8)
    with pytest.raises(OSError) as ei:
        engine.write([(f, 0, buf.ctypes.data, 16)])
    assert ei.value.errno == errno.EBADF


def test_close_while_in_flight_is_safe(engine, tmp_path, rng):
    data = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
    f = native.File(str(tmp_path / "inflight.bin"), "w")
    batch = engine.write([(f, i << 20, data.ctypes.data + (i << 20), 1 << 20) for i in range(8)])
    f.close()  # descriptors stay open until the batch is done
    batch.wait()
    with open(tmp_path / "inflight.bin", "rb") as fh:
        assert fh.read() == data.tobytes()


@pytest.mark.parametrize(
    "req,exc",
    [
        (lambda f, p: (f, -1, p, 10), ValueError),
        (lambda f, p: (f, 0, p, -5), ValueError),
        (lambda f, p: (f, 0, 0, 10), ValueError),
        (lambda f, p: (f, 0, p), ValueError),
    ],
)
def test_malformed_requests(engine, tmp_path, req, exc):
    buf = np.zeros(16, dtype=np.uint8)
    with native.File(str(tmp_path / "m.bin"), "w") as f:
        with pytest.raises(exc):
            engine.write([req(f, buf.ctypes.data)])


def test_bad_options():
    with pytest.raises(ValueError, match="backend"):
        native.io_engine("spdk")
    with pytest.raises(ValueError, match="threads"):
        native.io_engine("threads", threads=0)
    with pytest.raises(ValueError, match="mode"):
        native.File("/tmp/x", "rw")


def test_empty_and_zero_length_batches(engine, tmp_path):
    assert engine.read([]).wait()
    with native.File(str(tmp_path / "z.bin"), "w") as f:
        assert engine.write([(f, 0, 0, 0)]).wait()


# ---- backend choice ------------------------------------------------------------


def test_forced_fallback_when_kernel_forbids_io_uring(tmp_path, caplog):
    fake = tmp_path / "io_uring_disabled"
    fake.write_text("2\n")
    with caplog.at_level(logging.WARNING, logger="cachedattn"):
        eng = native.io_engine("auto", uring_sysctl=str(fake))
    assert eng.name == "threads"
    if native.HAS_URING:
        assert any("io_uring_disabled" in r.getMessage() and "= 2" in r.getMessage() for r in caplog.records)
        with pytest.raises(OSError) as ei:
            native.io_engine("io_uring", uring_sysctl=str(fake))
        assert ei.value.errno == errno.EPERM
    else:
        assert any("without liburing" in r.getMessage() for r in caplog.records)


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("CACHEDATTN_IO_BACKEND", "threads")
    assert native.io_engine().name == "threads"


def test_auto_prefers_io_uring_when_allowed(tmp_path):
    allowed = tmp_path / "io_uring_disabled"
    allowed.write_text("0\n")
    eng = native.io_engine("auto", uring_sysctl=str(allowed))
    assert eng.name == ("io_uring" if URING_OK else "threads")


# ---- files opened relative to a directory descriptor -------------------------------


@pytest.fixture
def dir_fd(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_openat_round_trip_with_direct_io_where_a_path_gets_it(engine, pool, tmp_path, dir_fd, rng):
    block = pool.alloc()
    want = _fill(block, rng).copy()
    with native.File.openat(dir_fd, "a.bin", "x") as f:
        assert f.direct == native.File(str(tmp_path / "probe.bin"), "w").direct
        engine.write([(f, 0, block.ptr, 1 << 20)]).wait()
    np.frombuffer(block, dtype=np.uint8)[:] = 0
    with native.File.openat(dir_fd, "a.bin", "r", label="shown/a.bin") as f:
        assert f.path == "shown/a.bin" and f.size() == 1 << 20
        engine.read([(f, 0, block.ptr, 1 << 20)]).wait()
    assert np.array_equal(np.frombuffer(block, dtype=np.uint8), want)


def test_exclusive_mode_refuses_an_existing_file(tmp_path, dir_fd):
    (tmp_path / "b.bin").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        native.File.openat(dir_fd, "b.bin", "x")
    with pytest.raises(FileExistsError):
        native.File(str(tmp_path / "b.bin"), "x")
    with native.File(str(tmp_path / "c.bin"), "x") as f:  # both descriptors open on a file just made
        assert f.size() == 0
    assert (tmp_path / "b.bin").read_bytes() == b"keep"


@pytest.mark.parametrize("mode", ["r", "r+", "a", "w", "x"])
@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling link"])
def test_openat_never_follows_a_symbolic_link(tmp_path, dir_fd, mode, dangling):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "target.bin"
    if not dangling:
        target.write_bytes(b"outside")
    (tmp_path / "link.bin").symlink_to(target)
    with pytest.raises(OSError) as ei:
        native.File.openat(dir_fd, "link.bin", mode, label="kv/link.bin")
    assert ei.value.errno == errno.ELOOP and ei.value.filename == "kv/link.bin"
    assert sorted(os.listdir(outside)) == ([] if dangling else ["target.bin"])
    if not dangling:
        assert target.read_bytes() == b"outside"


def _no_hang(fn, unblock):
    """Runs fn in a thread; if it blocks, unblock() frees it and the test fails."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # reported below
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():
        unblock()
        t.join(30)
        pytest.fail("opening blocked")
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.parametrize("mode", ["r", "r+", "a", "w"])
def test_openat_refuses_a_fifo_without_blocking(tmp_path, dir_fd, mode):
    fifo = tmp_path / "fifo.kv"
    os.mkfifo(fifo)

    def unblock():
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))

    with pytest.raises(OSError) as ei:
        _no_hang(lambda: native.File.openat(dir_fd, "fifo.kv", mode), unblock)
    assert ei.value.errno == errno.EINVAL and "regular" in str(ei.value)


def test_openat_never_opens_a_device_or_directory(tmp_path, dir_fd):
    try:
        os.mknod(tmp_path / "null.kv", 0o666 | 0o020000, os.makedev(1, 3))  # like /dev/null
    except PermissionError:
        pytest.skip("creating a device node needs root")
    with pytest.raises(OSError) as ei:
        native.File.openat(dir_fd, "null.kv", "w")
    assert ei.value.errno == errno.EINVAL
    (tmp_path / "d.kv").mkdir()
    with pytest.raises(IsADirectoryError):
        native.File.openat(dir_fd, "d.kv", "r")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\0b"])
def test_openat_takes_one_name_not_a_path(dir_fd, name):
    with pytest.raises(ValueError):
        native.File.openat(dir_fd, name, "w")
