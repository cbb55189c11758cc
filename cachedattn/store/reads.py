"""Reading: loads (per-layer, disk reads ahead of use) and prefetches.

Mixed into AttentionStore; see KVLoad for the per-layer pipeline.
"""

from __future__ import annotations

from concurrent.futures import Future

from cachedattn.store.load import KVLoad
from cachedattn.store.writes import done_future


class ReadMixin:
    def load(self, conv_id: str, n_tokens: int, readahead: int | None = None, _prefetch: bool = False) -> KVLoad:
        """Starts loading the KV of the first n_tokens; read it per layer from the returned KVLoad."""
        with self._lock:
            self._check_ready()
            conv = self._get(conv_id)
            if not 0 <= n_tokens <= conv.ntokens:
                raise ValueError(f"n_tokens={n_tokens}: conversation {conv_id!r} has {conv.ntokens} tokens stored")
            C = self._geometry.chunk_tokens
            chunks = conv.chunks[: -(-n_tokens // C)]
            from_disk = [i for i, c in enumerate(chunks) if c.host is None]
            conv.pins += 1
            # Host copies are held before allocating: allocation may wait, releasing the lock.
            held = {i: c.host.acquire() for i, c in enumerate(chunks) if c.host is not None}
            try:
                fresh = self._alloc_blocks(len(from_disk), exclude=conv)
            except BaseException:
                for b in held.values():
                    b.release()
                conv.pins -= 1
                raise
            fresh_iter = iter(fresh)
            blocks = [held[i] if i in held else next(fresh_iter) for i in range(len(chunks))]
            self.policy.on_access(conv_id)
            self._stats.add(host_hits=len(chunks) - len(from_disk), host_misses=len(from_disk))
            if not _prefetch:
                self._stats.add(tokens_reused=n_tokens)
        try:
            return KVLoad(self, conv, n_tokens, chunks, blocks, from_disk, readahead, _prefetch)
        except BaseException:
            self._finish_blocks(conv, chunks, blocks, from_disk, adopt=False)
            raise

    def prefetch(self, conv_id: str) -> Future:
        """Brings a conversation from disk into host memory in the background; the future gives the chunks read."""
        with self._lock:
            self._check_ready()
            conv = self._get(conv_id)
            if all(c.host is not None for c in conv.chunks):
                return done_future(0)
            n = conv.ntokens

        def job() -> int:
            with self.load(conv_id, n, _prefetch=True) as ld:
                ld.read_all()
                return ld.from_disk

        return self._track(self._executor.submit(job))

    def _finish_load(self, ld: KVLoad, whole: bool) -> None:
        adopted = self._finish_blocks(ld._conv, ld._chunks, ld._blocks, ld._disk_pos, adopt=whole)
        if whole:
            self._stats.add(disk_hits=len(ld._disk_pos))
        if ld._prefetch:
            self._stats.add(host_prefetches=adopted)

    def _finish_blocks(self, conv, chunks, blocks, from_disk, adopt: bool) -> int:
        """Chunks read whole from disk stay in host memory; every other reference is let go."""
        adopted = 0
        disk_set = set(from_disk)
        with self._lock:
            for pos, (c, b) in enumerate(zip(chunks, blocks)):
                if adopt and pos in disk_set and c.live and c.host is None:
                    c.host = b  # this load's reference becomes the chunk's own
                    adopted += 1
                else:
                    b.release()
            conv.pins -= 1
            self._forget_if_empty(conv)
        return adopted
