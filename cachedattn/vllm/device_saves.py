"""The GPU plan of the connector's saves: the paged blocks of finished
requests copied D2H by the copy engine into the store's host blocks.

When. A request's blocks are saved once it finished (the scheduler side plans
it in request_finished, and vLLM keeps the blocks until the worker reports
the request in finished_sending), not layer by layer in save_kv_layer: the
blocks of a running request are still being written (its last block fills
token by token over many steps), and a finished request's blocks are
written by no one until we report them, so one pass per step over every
finished request's blocks copies each block exactly once, with one
``copy_batch`` for the step and one ticket.

Order (checked on the CPU by the fake engine and the race detector,
tests/transfer/test_ordering_mutants.py scenario "paged_saves"):

- ``start`` (the connector's start_load_kv) only takes the handle of the
  compute stream current on the worker's thread and hands the step's saves
  to one background thread: nothing on the forward's path waits;
- there, the D2H stream waits for that compute stream (``wait_for_stream``)
  before the copies: they read what the requests' forwards wrote. Taken
  later than start, the fence covers more compute, never less (the blocks
  saved are written by no one until reported);
- the background thread waits for the copies' ticket (``wait_ticket``), and
  only then seals and commits each chunk and reports the request sent: vLLM
  frees (and hands on) the blocks only after the copies read them, and no
  chunk is published before its bytes arrived;
- a store closing meanwhile aborts the appends: their host blocks go back to
  the pool only after the copies into them (``settle_with(_wait_copies)``).

A block the store already holds (a shared system prompt) is skipped. A save
the store refuses (host memory full, the store closed) stores nothing of the
request from that block on, is counted and logged once, and the request is
reported all the same: vLLM frees its blocks.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from cachedattn.transfer import streams
from cachedattn.vllm.device_loads import PagedDeviceKV
from cachedattn.vllm.transfers import blocks_held

log = logging.getLogger("cachedattn")


class DeviceSaves:
    def __init__(self, store, paged: PagedDeviceKV, engine, on_sent):
        """on_sent(req_id, blocks_saved, failed): called on the saving thread when a request's save is over."""
        self.store, self.paged, self.engine, self._on_sent = store, paged, engine, on_sent
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cachedattn-vllm-save")  # saves in step order
        self._lock = threading.Lock()
        self._warned = False

    def start(self, moves) -> None:
        """The step's saves (BlockMoves of finished requests); returns without waiting for anything."""
        if moves:
            self._pool.submit(self._save, list(moves), streams.current(self.paged.device))

    def _save(self, moves, compute: int) -> None:
        saved: dict[str, int] = {}  # req -> blocks stored
        refused: dict[str, BaseException] = {}  # req -> why its save stopped
        try:
            self._copy_and_commit(moves, compute, saved, refused)
        except Exception as e:  # noqa: BLE001 - whatever failed, vLLM gets every request back (its blocks freed)
            for move in moves:
                refused.setdefault(move.req_id, e)
        finally:
            for move in moves:
                why = refused.get(move.req_id)
                if why is not None:
                    self._warn(move.req_id, why)
                self._on_sent(move.req_id, saved.get(move.req_id, 0), why is not None)

    def _copy_and_commit(self, moves, compute: int, saved: dict, refused: dict) -> None:
        appends, segments = [], []  # [(req, txn)], the step's copies
        seen: set[str] = set()  # keys appended this step (two finished requests sharing a system prompt)
        try:
            for move in moves:
                try:  # blocks held here already (a system prompt another request stored) are skipped; Redis
                    # is not asked (its copy, if any, is the same bytes, and asking costs a round trip)
                    held = blocks_held(self.store, move, remote=False)
                except Exception:  # noqa: BLE001 - the appends below meet the same failure and say so
                    held = [False] * len(move.keys)
                for key, toks, block, there in zip(move.keys, move.tokens, move.block_ids, held):
                    try:
                        if key in seen or there:
                            continue
                        txn = self.store.begin_append(key, toks, start=0)
                    except Exception as e:  # noqa: BLE001 - a refused save stores nothing; vLLM frees the blocks
                        refused[move.req_id] = e
                        break
                    appends.append((move.req_id, txn))
                    seen.add(key)
                    txn.settle_with(self._wait_copies)  # an abort (store.close) frees its blocks after our copies
                    for layer in range(self.paged.num_layers):
                        segments += txn.copy_segments(layer, *self.paged.views(layer, block))
            if segments:
                self.engine.wait_for_stream("d2h", compute)  # the copies read what the forwards wrote
                self.engine.copy_batch("d2h", segments)
                self.engine.wait_ticket(self.engine.record("d2h"))  # before any commit or report
        except Exception as e:  # noqa: BLE001 - issuing failed: nothing of this step is stored
            for req, txn in appends:
                txn.abort()  # after the copies already issued (settle_with)
                refused.setdefault(req, e)
            appends = []
        for req, txn in appends:
            try:
                for layer in range(self.paged.num_layers):
                    txn.layer_copied(layer)
                txn.commit()  # published now; on disk later
                saved[req] = saved.get(req, 0) + 1
            except Exception as e:  # noqa: BLE001 - e.g. the store closed meanwhile
                txn.abort()
                refused.setdefault(req, e)

    def _wait_copies(self) -> None:
        """The host waits for every D2H copy issued so far (the stream runs them in issue order)."""
        self.engine.wait_ticket(self.engine.record("d2h"))

    def _warn(self, req_id: str, e: BaseException) -> None:
        with self._lock:
            first, self._warned = not self._warned, True
        (log.warning if first else log.debug)(
            "cachedattn: a block of request %s was not stored (%s: %s)", req_id, type(e).__name__, e
        )

    def wait_idle(self) -> None:
        """Returns once every save handed over so far is over (tests, shutdown)."""
        self._pool.submit(lambda: None).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
