"""Reading: loads (per-layer, disk reads ahead of use) and prefetches.

A load is decided under the store lock in one step (which chunks, a lease on
the conversation, references to the host copies); memory for the disk-only
chunks is found and the files are opened without it; the load's end is
recorded under it again. See KVLoad for the per-layer pipeline.
"""

from __future__ import annotations

from concurrent.futures import Future

from cachedattn.store import keys
from cachedattn.store.chunk_file import ChunkCorruptError
from cachedattn.store.conversation import common_prefix
from cachedattn.store.load import KVLoad
from cachedattn.store.index import Plan


def done_future(value=None) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class Reader:
    def __init__(self, store):
        self.s = store

    def open(self, conv_id, *, n_tokens=None, token_ids=None, limit=None, readahead=None, prefetch=False):
        """A KVLoad of the first n_tokens (load), of the longest stored prefix of token_ids
        (load_prefix: None when nothing matches) or of all stored tokens (prefetch: None when
        nothing is stored or it is all in host memory).

        Never fails for want of host memory: a load whose disk chunks find no block (after
        HOST_WAIT_S at most) stops before the first of them (load_prefix/prefetch: None
        when that leaves nothing; load: a load of fewer tokens, see KVLoad.n_tokens)."""
        s = self.s
        ix = s._index
        toks = None if token_ids is None else keys.as_token_array(token_ids)
        s._resolve(conv_id)
        with ix.lock:
            s._check_ready()
            conv = ix.get(conv_id, required=False)
            if toks is not None:
                s._stats.add(lookups=1)
                if conv is None:
                    return None
                n = common_prefix(conv.tokens(), toks)
                n = n if limit is None else min(n, max(0, int(limit)))
                if n == 0:
                    return None
            elif prefetch:
                if conv is None or all(c.in_host for c in conv.chunks):
                    return None
                n = conv.ntokens
            else:
                if conv is None:
                    ix.get(conv_id)  # raises the right error
                if isinstance(n_tokens, bool) or not 0 <= n_tokens <= conv.ntokens:
                    raise ValueError(f"n_tokens={n_tokens}: conversation {conv_id!r} has {conv.ntokens} tokens stored")
                n = int(n_tokens)
            C = s._geometry.chunk_tokens
            chunks = conv.chunks[: -(-n // C)]
            held = {i: c.host.acquire() for i, c in enumerate(chunks) if c.in_host}
            from_disk = [i for i in range(len(chunks)) if i not in held]
            lease = ix.lease(conv, "prefetch" if prefetch else "load")
            s.policy.on_access(conv.id)
        try:
            fresh = s._exec.alloc(len(from_disk), foreground=not prefetch, partial=True) if from_disk else []
        except BaseException:
            for b in held.values():
                b.release()
            s._exec.release(lease)
            raise
        if len(fresh) < len(from_disk):  # host memory ran out: the load stops before the first chunk left out
            cut = from_disk[len(fresh)]
            for i in [i for i in held if i >= cut]:
                held.pop(i).release()
            chunks, from_disk, n = chunks[:cut], from_disk[: len(fresh)], min(n, cut * C)
            s._shortened(f"host memory is full (all {ix.host.capacity_blocks} chunk blocks are in use)")
            if cut == 0 and (toks is not None or prefetch):
                s._exec.release(lease)
                return None  # a miss
        fresh_iter = iter(fresh)
        blocks = [held[i] if i in held else next(fresh_iter) for i in range(len(chunks))]
        s._stats.add(host_hits=len(held), host_misses=len(from_disk))
        if not prefetch:
            s._stats.add(tokens_reused=n)
        return KVLoad(s, conv, lease, n, chunks, blocks, from_disk, readahead, prefetch)

    def prefetch(self, conv_id: str) -> Future:
        s = self.s
        keys.validate_conversation_id(conv_id)
        s._resolve(conv_id)
        with s._index.lock:
            s._check_ready()
            conv = s._index.convs.get(conv_id)
            if conv is None or all(c.in_host for c in conv.chunks):
                return done_future(0)  # gone meanwhile, or nothing to bring in

        def job() -> int:
            ld = self.open(conv_id, prefetch=True)
            if ld is None:
                return 0  # dropped, cut or brought in meanwhile
            with ld:
                try:
                    ld.read_all()
                except ChunkCorruptError:
                    return 0  # removed and logged already; a later load recomputes from the cut
                return ld.from_disk

        return s._submit(job)

    def finish(self, ld: KVLoad, whole: bool) -> None:
        """Chunks read whole from disk stay in host memory; every other reference is let go."""
        s = self.s
        adopted = 0
        disk_set = set(ld._disk_pos)
        plan = Plan()
        with s._index.lock:
            for pos, (c, b) in enumerate(zip(ld._chunks, ld._blocks)):
                if whole and pos in disk_set and s._index.adopt_read(ld._conv, c, b):
                    adopted += 1  # this load's reference became the chunk's own
                else:
                    b.release()
            s._index.release(ld._lease, plan)
        s._exec.run(plan)
        if whole:
            s._stats.add(disk_hits=len(ld._disk_pos))
        if ld._prefetch:
            s._stats.add(host_prefetches=adopted)
