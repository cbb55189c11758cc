"""Moving chunks between a store and its remote tier.

Up: every chunk a turn commits is written through to Redis by one background
thread, never on the turn's path; at most `inflight_bytes` wait, and a chunk
that finds no room is skipped (with the rest of its turn: a chain with a hole
is no use to anyone) and counted.

Down: before a lookup or load of a conversation, the chunks Redis holds beyond
what the store has locally are found from the tokens (remote_tier.find_chain),
read whole with pipelined GETs, checked, and adopted as host chunks (written
through to disk like any new chunk). A server that never saw the conversation
finds its history this way; a damaged or missing remote chunk ends the chain
there, and what follows is recomputed.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import numpy as np

from cachedattn.store import keys, lock_order
from cachedattn.store.conversation import Chunk, common_prefix
from cachedattn.store.block_pool import HostMemoryFull
from cachedattn.store.remote_tier import RemoteUnavailable
from cachedattn.store.conversation import ChunkState, ConvState
from cachedattn.store.executor import on_store_thread
from cachedattn.store.index import Plan

log = logging.getLogger("cachedattn")


class RemoteSync:
    def __init__(self, core, tier, inflight_bytes: int):
        self._core = core
        self.tier = tier
        self.limit = inflight_bytes
        self._cv = threading.Condition(lock_order.ordered(threading.RLock(), lock_order.REMOTE_QUEUE, "remote queue"))
        self._queue: deque = deque()
        self._inflight = 0
        self._busy = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="cachedattn-remote", daemon=True)
        self._thread.start()

    # ---- up: write-behind ----------------------------------------------------------

    def write_behind(self, chunks: list[Chunk]) -> None:
        """Queues new host chunks for Redis (store lock held: only references are taken)."""
        nbytes = self._core.geometry.block_bytes
        with self._cv:
            for i, c in enumerate(chunks):
                if self._stop or not c.in_host:
                    break
                if self._inflight + nbytes > self.limit or not self.tier.usable():
                    self._core.stats.add(remote_skipped_writes=len(chunks) - i)
                    break
                self._inflight += nbytes
                self._queue.append((c, c.host.acquire(), nbytes))  # a chunk's fields never change
            self._cv.notify_all()  # also after a skip: what was queued before it must go

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
                chunk, ref, nbytes = self._queue.popleft()
                self._busy = True
            try:
                if self.tier.usable():
                    self.tier.write_chunk(None, chunk, ref)
                else:
                    self._core.stats.add(remote_skipped_writes=1)
            except RemoteUnavailable:
                self._core.stats.add(remote_skipped_writes=1)
            except Exception as e:  # never let the writer thread die: the store goes on without this chunk remotely
                log.warning("cachedattn: writing a chunk to the remote tier failed unexpectedly (%s)", e)
            finally:
                ref.release()
                with self._cv:
                    self._inflight -= nbytes
                    self._busy = False
                    self._cv.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every queued chunk was written (or given up); False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        self.flush(timeout=30.0)
        with self._cv:
            self._stop = True
            while self._queue:  # left after a timeout: let go of their blocks
                self._queue.popleft()[1].release()
            self._cv.notify_all()
        self._thread.join(timeout=5.0)
        self.tier.close()

    # ---- down: adopting what Redis holds ---------------------------------------------

    def fill(self, conv_id: str, toks: np.ndarray) -> int:
        """Adopts the remote chunks that extend the local prefix of toks; chunks adopted."""
        return self.fill_many([(conv_id, toks)])[0]

    def fill_many(self, items: list[tuple[str, np.ndarray]]) -> list[int]:
        """fill() of several conversations with one pipelined probe and one pipelined read for all of
        them: a request's whole chain of content-keyed blocks costs two round trips, not two a block.
        A conversation whose local prefix already covers its tokens costs none."""
        core, C = self._core, self._core.geometry.chunk_tokens
        out = [0] * len(items)
        if not self.tier.usable():
            return out
        wanted = []  # (position in items, conv_id, toks, whole local chunks kept, parent, local tokens)
        with core.index.lock:
            core.index.check_ready()
            for i, (conv_id, toks) in enumerate(items):
                conv = core.index.convs.get(conv_id)
                if conv is not None and (conv.state is not ConvState.READY or conv.writer is not None):
                    continue
                chunks = list(conv.chunks) if conv is not None else []
                local = common_prefix(conv.tokens(), toks) if conv is not None else 0
                if local >= len(toks):
                    continue  # nothing Redis could add: no round trip
                k = min(local // C, len(chunks))  # whole local chunks kept: the remote chain continues the last
                root = (conv.root if conv is not None else None) or keys.root_key(core.spec.fingerprint, conv_id)
                wanted.append((i, conv_id, toks, k, chunks[k - 1].key if k else root, local))
        if not wanted:
            return out
        try:
            chains = self.tier.find_chains([(parent, toks[k * C :]) for _, _, toks, k, parent, _ in wanted])
            chains = [ch if k * C + sum(len(t) for _, _, t in ch) > local else [] for ch, (_, _, _, k, _, local) in zip(chains, wanted)]
            links = [link for ch in chains for link in ch]
            records = self.tier.fetch(links) if links else []
        except RemoteUnavailable:
            return out
        at = 0
        for (i, conv_id, _, k, parent, local), chain in zip(wanted, chains):
            reader = self.tier.open_read(None, chain, records[at : at + len(chain)])
            at += len(chain)
            try:
                got = [h for h, _ in reader.records]  # up to the first missing or damaged chunk
                if not got or k * C + sum(len(g.tokens) for g in got) <= local:
                    continue
                try:  # on the store's own threads (a prefetch) only what is free at once: they never wait for memory
                    blocks = core.executor.alloc(len(got), foreground=not on_store_thread())
                except HostMemoryFull:
                    break  # the later ones would not fit either
                for layer in range(core.geometry.spec.num_layers):
                    reader.read_layer(layer, blocks).wait()
            finally:
                reader.close()
            out[i] = self._adopt(conv_id, k, parent, got, blocks)
        return out

    def _adopt(self, conv_id: str, k: int, parent: bytes, got, blocks) -> int:
        core, ix, plan = self._core, self._core.index, Plan()
        with ix.lock:
            conv = ix.convs.get(conv_id)
            usable = not ix.closing
            if conv is None and usable and k == 0:
                conv = ix.new_conversation(conv_id, keys.root_key(core.spec.fingerprint, conv_id))
            if conv is not None and usable:
                last = conv.chunks[k - 1].key if k else conv.root
                usable = conv.state is ConvState.READY and conv.writer is None and len(conv.chunks) >= k and last == parent
                usable = usable and sum(c.ntokens for c in conv.chunks) < k * core.geometry.chunk_tokens + sum(
                    len(g.tokens) for g in got
                )
            if conv is None or not usable:
                for b in blocks:
                    b.release()
                return 0
            gen, last = ix.next_gen(), len(got) - 1
            new = [
                Chunk(k + i, g.tokens, g.key, g.parent, g.checksums, ChunkState.HOST, host=b, gen=gen, tail=i == last)
                for i, (g, b) in enumerate(zip(got, blocks))
            ]
            ix.replace_tail(conv, k, new, plan)
            core.stats.add(remote_hits=len(new))
            if core.config.write_through:
                for c in new:
                    ix.write_through(conv, c, plan)
        core.executor.run(plan)
        return len(new)
