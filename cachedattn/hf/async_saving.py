"""Saving a turn through the copy engine (a model on a GPU, or the CPU fake in CI).

The turn's thread only issues: the engine's D2H stream waits for the compute
stream (the copies read what compute wrote), then every layer's new K and V are
copied straight into the append's pinned host blocks, and a ticket marks them.
A background worker waits for the ticket, then checksums, writes and commits.
The GPU tensors the copies read stay referenced until the ticket is done (the
caching allocator does not know the engine's stream); the host blocks are freed
(abort) only after the copies that use them are done. The next turn of the same
conversation waits for its append before it looks the conversation up.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from cachedattn.transfer import streams
from cachedattn.transfer.strided import fold

log = logging.getLogger("cachedattn")


class AsyncSaver:
    """One patched model's background saves: one worker, so saves complete in issue order."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cachedattn-save")
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()

    def submit(self, conv_id: str, fn) -> Future:
        fut = self._pool.submit(fn)
        with self._lock:
            self._pending[conv_id] = fut
        fut.add_done_callback(lambda f: self._forget(conv_id, f))
        return fut

    def _forget(self, conv_id: str, fut: Future) -> None:
        with self._lock:
            if self._pending.get(conv_id) is fut:
                del self._pending[conv_id]

    def wait(self, conv_id: str) -> None:
        """Returns once the conversation's append in flight (if any) is committed or given up."""
        with self._lock:
            fut = self._pending.get(conv_id)
        if fut is not None:
            fut.exception()  # failures are counted and logged by the save itself

    def drain(self) -> None:
        with self._lock:
            futs = list(self._pending.values())
        for f in futs:
            f.exception()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Each head's rows contiguous (a cache row's slice is; a strided side buffer may not be)."""
    t = t.detach()
    if t.stride(-1) == 1 and (t.shape[-2] <= 1 or t.stride(-2) == t.shape[-1]):
        return t
    return t.contiguous()


def save_async(turn, row: int, start: int, m: int, store, loader, saver: AsyncSaver, on_fail) -> Future:
    """Issues the D2H copies of tokens [start, m) of `row` of the turn's cache and returns the
    future of its commit (done when the KV is on disk); the rest runs on `saver`.

    `loader` (transfer.gpu_load.GpuLoader) gives each layer's device and that device's copy engine. Raises (with nothing
    left behind: blocks freed after their copies) when issuing fails; a failure in the
    background calls on_fail(exception)."""
    num_layers = len(loader.layer_devices)
    n = turn.reused
    txn = store.begin_append(turn.conv_id, turn.ids[:m], start=start)
    engines: dict = {}  # logical device -> its engine (a model split over devices saves on each)
    # Before abort frees the blocks: every copy issued on every engine is done.
    txn.settle_with(lambda: [e.wait_ticket(e.record("d2h")) for e in list(engines.values())])
    sources = []
    try:
        for layer in range(num_layers):
            k, v = turn.cache.row_new_kv(layer, row, start - n, m - n)
            sources.append((_dense(k), _dense(v)))
        for layer, (k, v) in enumerate(sources):
            device = streams.device_of(k)
            engine = engines.get(device)
            if engine is None:
                engine = engines[device] = loader.engine_of(device)
                if engine is None:
                    raise RuntimeError(f"no copy engine for {device} (layer {layer})")
                _fence_compute(engine, device)
            # One strided copy per chunk and K/V (every head's rows), not one per head.
            for src, sp, dst, dp, width, height in fold(txn.copy_segments(layer, k, v)):
                engine.copy_2d("d2h", src, sp, dst, dp, width, height)
        tickets = [(e, e.record("d2h")) for e in engines.values()]
    except BaseException:
        txn.abort()  # after the copies already issued (settle_with)
        raise
    done: Future = Future()

    def finish():
        try:
            try:
                for engine, ticket in tickets:
                    engine.wait_ticket(ticket)
            finally:
                sources.clear()  # the copies have read them (or the engine failed: nothing else will)
            for layer in range(num_layers):
                txn.layer_copied(layer)
            on_disk = txn.commit()
        except Exception as e:
            txn.abort()
            done.set_result(None)
            on_fail(e)
            return
        on_disk.add_done_callback(lambda f: _chain(f, done))

    saver.submit(turn.conv_id, finish)
    return done


def _fence_compute(engine, device) -> None:
    """The D2H stream waits for the compute that wrote the sources: the stream current now on their device."""
    engine.wait_for_stream("d2h", streams.current(device))


def _chain(src: Future, dst: Future) -> None:
    e = src.exception()
    if e is not None:
        dst.set_exception(e)
    else:
        dst.set_result(src.result())
