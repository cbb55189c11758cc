"""The parts of a store that its loads, appends and remote sync share.

AttentionStore (store.py) is the public face; what happens inside goes
through these parts, each passed explicitly: the index (the state, and the
lock), the executor (plans carried out), the block pool, the tiers, the
counters. Loads (load.py), appends (append.py) and the remote sync
(remote_sync.py) take a Core, never the store. It holds the parts and runs
jobs on the store's threads; what changes state is the index's, what does
I/O is the executor's or a tier's.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from cachedattn.store.executor import Executor, mark_store_thread
from cachedattn.store.index import Index


class Core:
    def __init__(self, config, policy, stats, threads: ThreadPoolExecutor):
        self.config = config
        self.policy = policy
        self.stats = stats
        self.index = Index(policy, stats)
        self.executor = Executor(self.index, self.submit)
        self.threads = threads
        self.pending: set[Future] = set()
        # Bound to a model by AttentionStore.attach:
        self.spec = None
        self.geometry = None
        self.pool = None  # block_pool.BlockPool
        self.files = None  # chunk_files.ChunkFiles
        self.disk = None  # disk_tier.DiskTier
        self.remote = None  # remote_sync.RemoteSync

    # ---- the store's threads ------------------------------------------------------------

    def submit(self, fn, *args) -> Future:
        def job():
            mark_store_thread()
            return fn(*args)

        fut = self.threads.submit(job)
        with self.index.lock:
            self.pending.add(fut)
        fut.add_done_callback(self._untrack)
        return fut

    def _untrack(self, fut: Future) -> None:
        with self.index.lock:
            self.pending.discard(fut)
