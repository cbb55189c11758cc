"""The stream-ordering race detector: CUDA's ordering rules checked on the CPU.

Threads (see :mod:`cachedattn.testing.happens_before`): every simulated compute
stream (:mod:`cachedattn.testing.sim_devices`), each fake copy engine's H2D and
D2H streams, each host thread. Edges:

- a launch: work issued from a host thread (an aten op on a compute stream, a
  copy on an engine stream) happens after what that host thread did before;
- an engine layer event (recorded by each copy issued for a layer) or ticket
  (``record``), then ``stream_wait_layer`` (a compute stream waits),
  ``wait_layer`` / ``layer_done`` answering True / ``wait_ticket`` /
  ``ticket_done`` answering True (the host waits);
- ``synchronize(direction)``: the host waits for the engine stream;
- ``wait_for_stream(direction, s)``: the engine stream waits for compute stream s;
- an op returning a Python scalar (``.item()``, ``torch.equal``): the host waits
  for the op's stream, as the copy to the host does on a GPU;
- ``sim.wait_stream(a, b)``: ``a.wait_stream(b)``;
- ``streams.synchronize(device)``: the host waits for that device's current stream.

Accesses: every aten op (a TorchDispatchMode) reads the byte ranges of its tensor
inputs and writes its outputs and mutated arguments, on the current stream of
its inputs' simulated device; a new output storage is an allocation (earlier
compute accesses to that memory are dropped: the caching allocator orders reuse
on a stream; an engine copy still unordered with it is reported); the host reads
what ``checkpoints.host_reads`` names (the logits whose time is a turn's TTFT);
every fake engine copy reads and writes its byte ranges on its engine stream when issued;
every host block release (checkpoints.host_release) is a host write, after which
the block's history is dropped (the pool's lock orders its next owner); every
device free (checkpoints.device_free: a staging buffer back to the caching
allocator) is an event of the stream that allocated it, which every access of
another stream not recorded for it must happen before.

Reports (``Detector.reports``), each with the stacks of both sides:
``race`` (two conflicting accesses, no happens-before), ``release`` (a host
block released while a copy using it is unordered with the release),
``free`` (device memory freed while another stream's access, neither recorded
nor ordered before the free, may still touch it),
``reuse`` (an allocation over memory a copy may still use), ``stale-wait``
(a wait on a layer event another epoch replaced), ``stream`` (an engine told
to wait for a stream handle that is no simulated stream).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from cachedattn import native
from cachedattn.testing import checkpoint_watch
from cachedattn.testing.happens_before import HappensBefore, capture_stack
from cachedattn.testing.sim_devices import SimStream, SimulatedDevices, storage_of, storage_range
from cachedattn.transfer import streams


@dataclass(frozen=True)
class HostThread:
    compute = False

    def __str__(self) -> str:
        return "the host"


# One clock for every host thread: Python's own synchronization between them (locks, futures, the
# allocator's lock) is not modelled, so it is assumed; streams are what this detector is about.
HOST = HostThread()


@dataclass(frozen=True)
class EngineStream:
    engine: int  # the detector's number for the engine
    direction: str
    compute = False

    def __str__(self) -> str:
        return f"copy engine #{self.engine} {self.direction} stream"


# Ops that touch no data (metadata, aliasing, allocation bookkeeping).
_NO_ACCESS = {
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.lift_fresh.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.set_.source_Storage_storage_offset,
    torch.ops.aten.resize_.default,
}
# Ops that allocate without writing: the new memory is the stream's (see HappensBefore.access(fresh=)).
_ALLOCATE = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.new_empty_strided.default,
}


class RaceError(AssertionError):
    """The detector's reports, raised by Detector.check (an AssertionError, so pytest shows it as a failure)."""


class Detector:
    """Install with ``with Detector() as det:`` (or ``detect()``); read ``det.reports`` or call ``det.check()``."""

    def __init__(self, sim: SimulatedDevices | None = None):
        self.sim = sim if sim is not None else SimulatedDevices()
        self.hb = HappensBefore()
        self._engines: dict[int, int] = {}  # id(engine) -> number
        self._numbers = itertools.count(1)
        self._events: dict[tuple, dict] = {}  # (engine, epoch, direction, layer) -> snapshot
        self._epoch: dict[tuple, tuple] = {}  # (engine, epoch) -> ("open" / "ended", stack of that call)
        self._tickets: dict[tuple, dict] = {}  # (engine, ticket) -> snapshot
        self._lock = threading.RLock()
        self._stack = contextlib.ExitStack()
        self._pools: list = []  # (HostPool, lo, hi) created under the detector
        self.ops = 0

    @property
    def reports(self):
        return self.hb.reports

    def check(self) -> None:
        """Raises RaceError listing every report."""
        if self.reports:
            raise RaceError(f"{len(self.reports)} ordering problem(s):\n\n" + "\n\n".join(map(str, self.reports)))

    def __enter__(self) -> Detector:
        self._stack.enter_context(streams.use(self.sim))
        self._stack.enter_context(_patched(native, "HostPool", self._pool(native.HostPool)))
        self._stack.enter_context(checkpoint_watch.observing(self))
        self._stack.enter_context(_Recorder(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    # ---- threads ---------------------------------------------------------------------

    @staticmethod
    def host() -> HostThread:
        return HOST

    def on_host(self, lo: int, hi: int) -> bool:
        """True for memory of a live host pool (pinned blocks): torch ops on it run on the host, as on a GPU box."""
        return any(a <= lo and hi <= b and not pool.closed for pool, a, b in self._pools)

    def _pool(self, real):
        def make(*args, **kwargs):
            pool = real(*args, **kwargs)
            self._pools.append((pool, pool.base_ptr, pool.base_ptr + pool.capacity_bytes))
            return pool

        return make

    def _engine(self, engine, direction: str) -> EngineStream:
        n = self._engines.get(id(engine))
        if n is None:
            n = self._engines[id(engine)] = next(self._numbers)
        return EngineStream(n, direction)

    def _compute(self, handle: int, what: str):
        s = self.sim.stream_of(handle)
        if s is None:
            self.hb.report("stream", f"{what} names stream handle {handle}, which is no simulated compute stream "
                           "(asked of another provider, or captured before streams.use)", ("here", capture_stack()))
        return s

    def wait_stream(self, waiter: SimStream, waited: SimStream) -> None:
        """``waiter.wait_stream(waited)``."""
        self.hb.edge(waited, waiter)

    def synchronize(self) -> None:
        """``torch.cuda.synchronize()`` of every simulated device (engine streams not included, as on a GPU)."""
        for s in self.sim._streams.values():
            self.hb.edge(s, self.host())

    def to(self, obj, device: int):
        """Every tensor in `obj` (nested tuples, lists, dicts) not on simulated `device` copied there, as
        ``t.to(device)`` between two GPUs: read on the source's current stream, which the destination's waits for."""
        def move(t):
            if not isinstance(t, torch.Tensor):
                return t
            src = self.sim.placed(t)
            if src is None or src == device:
                return t
            with self.sim.device(src):
                c = t.clone()
            self.sim.assign(c, device)
            self.hb.edge(self.sim.current_stream(src), self.sim.current_stream(device))
            return c

        return tree_map(move, obj)

    def split_layers(self, model, layer_devices) -> list:
        """Puts decoder layer i of `model` on simulated device ``layer_devices[i]`` (the rest on device 0), as
        ``device_map`` does: each layer's inputs are moved to its device and it runs with that device current.
        Returns the hook handles."""
        layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == len(layer_devices))
        self.sim.place(model, 0)
        handles = []
        for layer, d in zip(layers, layer_devices):
            self.sim.place(layer, d)
            handles += self._run_on(layer, d)
        for name in ("norm", "final_layernorm", "ln_f"):
            for m in model.modules():
                if m is not model and hasattr(m, name) and isinstance(getattr(m, name), torch.nn.Module):
                    handles += self._run_on(getattr(m, name), 0)
        return handles

    def _run_on(self, module, d: int) -> list:
        ctx = []

        def pre(mod, args, kwargs):
            c = self.sim.device(d)
            c.__enter__()
            ctx.append(c)
            return self.to(args, d), self.to(kwargs, d)

        def post(mod, args, out):
            ctx.pop().__exit__(None, None, None)
            return out

        return [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]

    # ---- the fake copy engine's hooks (cachedattn.testing.fake_engine) ---------------------------

    def on_epoch(self, engine, epoch: int) -> None:
        with self._lock:
            e = self._engine(engine, "h2d").engine
            self._epoch[(e, epoch)] = ("open", capture_stack())

    def on_end_epoch(self, engine, epoch: int) -> None:
        with self._lock:
            e = self._engine(engine, "h2d").engine
            self._epoch[(e, epoch)] = ("ended", capture_stack())
            for key in [k for k in self._events if k[0] == e and k[1] == epoch]:
                del self._events[key]

    def on_copy(self, engine, direction: str, reads, writes, layer: int, epoch: int = -1) -> None:
        s, stack = self._engine(engine, direction), capture_stack()
        self.hb.edge(self.host(), s)
        for ptr, n in reads:
            self.hb.access(s, ptr, ptr + n, False, f"{direction} copy source", stack)
        for ptr, n in writes:
            self.hb.access(s, ptr, ptr + n, True, f"{direction} copy destination", stack)
        if layer >= 0:
            with self._lock:
                self._events[(s.engine, epoch, direction, layer)] = self.hb.snapshot(s)

    def _event(self, engine, direction: str, layer: int, epoch: int) -> dict:
        s = self._engine(engine, direction)
        with self._lock:
            ev = self._events.get((s.engine, epoch, direction, layer))
        if ev is None:
            self.on_stale_wait(engine, direction, layer, epoch)
            return {}
        return ev

    def on_stale_wait(self, engine, direction: str, layer: int, epoch: int) -> None:
        e = self._engine(engine, direction).engine
        state, stack = self._epoch.get((e, epoch), ("never begun", ()))
        self.hb.report("stale-wait", f"wait on layer {layer} ({direction}) of copy engine #{e} in epoch {epoch} "
                       f"({state}), where that layer was not issued: the event belongs to another load",
                       ("the wait", capture_stack()), (f"where epoch {epoch} was {state}", stack))

    def on_stream_wait_layer(self, engine, direction: str, layer: int, stream: int, epoch: int) -> None:
        s = self._compute(stream, "stream_wait_layer")
        if s is not None:
            self.hb.join(s, self._event(engine, direction, layer, epoch))

    def on_host_wait_layer(self, engine, direction: str, layer: int, epoch: int) -> None:
        self.hb.join(self.host(), self._event(engine, direction, layer, epoch))

    def on_record(self, engine, direction: str, ticket: int) -> None:
        s = self._engine(engine, direction)
        self.hb.edge(self.host(), s)  # the record is enqueued after what the host issued before
        with self._lock:
            self._tickets[(s.engine, ticket)] = self.hb.snapshot(s)

    def on_host_wait_ticket(self, engine, ticket: int) -> None:
        e = self._engine(engine, "h2d").engine
        with self._lock:
            snap = self._tickets.pop((e, ticket), {})
        self.hb.join(self.host(), snap)

    def on_synchronize(self, engine, direction: str) -> None:
        self.hb.edge(self._engine(engine, direction), self.host())

    def on_wait_for_stream(self, engine, direction: str, stream: int) -> None:
        s = self._compute(stream, f"wait_for_stream({direction!r})")
        if s is not None:
            self.hb.edge(s, self._engine(engine, direction))

    # ---- the host waiting for, or reading what, compute made (streams.synchronize, checkpoints.host_reads) ----------

    def on_stream_synchronize(self, stream: int) -> None:
        s = self._compute(stream, "streams.synchronize")
        if s is not None:
            self.hb.edge(s, self.host())

    def on_host_read(self, tensors, what: str) -> None:
        stack = capture_stack()
        for t in tensors:
            self.hb.access(self.host(), *storage_range(t), False, what, stack)

    # ---- device memory back to the caching allocator (cachedattn.transfer.checkpoints.device_free) ------------

    def on_device_free(self, ptr: int, nbytes: int, stream: int, recorded) -> None:
        s = self._compute(stream, "a device free")
        if s is None:
            self.hb.forget(ptr, ptr + nbytes)
            return
        rec = {r for r in (self.sim.stream_of(h) for h in recorded) if r is not None}
        self.hb.free(s, self.host(), ptr, ptr + nbytes, rec, "a staging buffer", capture_stack())

    # ---- host releases (cachedattn.transfer.checkpoints.host_release) ---------------------------------

    def on_release(self, ptr: int, nbytes: int) -> None:
        self.hb.access(self.host(), ptr, ptr + nbytes, True, "host block release", capture_stack(), kind="release")
        self.hb.forget(ptr, ptr + nbytes)


class _Recorder(TorchDispatchMode):
    """Every aten op of the installing thread: its accesses on the current simulated stream."""

    def __init__(self, det: Detector):
        super().__init__()
        self.det, self.sim, self.hb = det, det.sim, det.hb

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.is_view or func in _NO_ACCESS:
            out = func(*args, **kwargs)
            if func is torch.ops.aten.lift_fresh.default:  # a tensor made from Python data, on no device yet:
                self.sim.assign(out, None)  # its address may be a freed one's, whose placement must not stay
            return out
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        dev = self.sim.op_device(ins)
        mutated = _mutated(func, args, kwargs)
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if func not in _ALLOCATE and all(not t.is_floating_point() for t in ins + outs):
            # Token ids, positions, indices, flags: host-side bookkeeping in the GPU path (CPU tensors there),
            # which a CPU box cannot tell from device tensors. Neither recorded nor an edge (their .item() is no
            # device sync): KV, hidden states and logits are floating point and are checked exactly.
            self._assign_fresh(ins, outs, dev)
            return out
        if any(self.det.on_host(*storage_range(t)) for t in ins + outs):
            # Pinned host memory: the CPU path (the store's host reads and writes), a synchronous op on the host.
            # Its other tensors are host tensors there too, which a CPU box cannot tell from device ones: only
            # the pinned ranges are recorded (against engine copies and releases), and no stream edge is made.
            self._host_op(func, ins, outs, mutated)
            self._assign_fresh(ins, outs, dev)
            return out
        stream = self.sim.current_stream(dev)
        self.hb.edge(self.det.host(), stream)  # launched from the host
        self.det.ops += 1
        stack = capture_stack()
        name = func.__name__
        in_bases = {storage_of(t)[0] for t in ins}
        for t in ins:
            if not any(t is m for m in mutated):
                self.hb.access(stream, *storage_range(t), False, f"{name} input", stack)
        for t in mutated:
            self.hb.access(stream, *storage_range(t), True, f"{name} output", stack)
        for t in outs:
            if any(t is m for m in mutated):
                continue
            lo, hi = storage_of(t)
            if lo in in_bases:
                continue  # aliases an input
            self.sim.assign(t, dev)
            self.hb.access(stream, lo, hi, True, f"{name} allocation", stack, fresh=True)
            if func not in _ALLOCATE:
                self.hb.access(stream, *storage_range(t), True, f"{name} output", stack)
        if isinstance(out, (bool, int, float)) and ins:  # the value reached the host: it waited for the stream
            self.hb.edge(stream, self.det.host())
        return out

    def _assign_fresh(self, ins, outs, dev) -> None:
        """New output storages take the op's device (an address freed and reused must not keep an old one)."""
        in_bases = {storage_of(t)[0] for t in ins}
        for t in outs:
            if storage_of(t)[0] not in in_bases:
                self.sim.assign(t, dev)

    def _host_op(self, func, ins, outs, mutated) -> None:
        stack, host = capture_stack(1), self.det.host()
        for t in ins + outs:
            lo, hi = storage_range(t)
            if self.det.on_host(lo, hi):
                write = any(t is m for m in mutated) or any(t is o for o in outs)
                self.hb.access(host, lo, hi, write, f"{func.__name__} on pinned host memory", stack)


def _mutated(func, args, kwargs) -> list[torch.Tensor]:
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        v = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
        out.extend(t for t in tree_leaves(v) if isinstance(t, torch.Tensor))
    return out


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def detect(devices: int = 2, streams: int = 2, check: bool = True):
    """Runs the block under a fresh detector; raises RaceError at the end if it reported anything (``check``)."""
    with Detector(SimulatedDevices(devices, streams)) as det:
        yield det
    if check:
        det.check()
