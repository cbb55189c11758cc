"""The remote tier: chunks in a Redis (one server, Sentinel, or a Cluster) shared
by every server of a deployment, below host memory and disk.

Keys live under a namespace of the model fingerprint:
    cachedattn:<fp>:c:<chunk key>   a chunk (record.py: header + payload, one value)
    cachedattn:<fp>:t:<parent key>  the token counts of partial chunks under a parent
Full chunks are found from the tokens alone (their key is computable); a
conversation's partial last chunk is found through its parent's set. The set
entry is written only after the chunk, so an entry without its chunk means the
chunk was evicted: a miss, and the entry is removed.

Capacity and eviction are Redis's (maxmemory and its policy; optional TTL).
Every failure (down, a shard down, timeouts, OOM) is one warning, then the tier
sits out a backoff period (0.5 s doubling to 30 s) before it is tried again;
the store serves from its local tiers or recomputes meanwhile.
"""

from __future__ import annotations

import errno
import logging
import threading
import time

import numpy as np

from cachedattn.store import keys, lock_order
from cachedattn.store.record import ChunkHeader, bad_layer, decode_value, encode_value
from cachedattn.store.remote_url import make_client, parse_remote_url
from cachedattn.store.tier import ChunkReader, Tier

log = logging.getLogger("cachedattn")
BACKOFF_S = (0.5, 30.0)


class RemoteUnavailable(OSError):
    """The remote tier cannot be used right now (down, or backing off after a failure)."""


class RemoteTier(Tier):
    name = "remote"

    def __init__(self, url: str, fingerprint: str, geometry, stats, timeout_s: float = 1.0, ttl_s: int | None = None):
        self.url = parse_remote_url(url)
        try:
            import redis  # noqa: F401
        except ImportError as e:
            raise RemoteUnavailable(f"the remote tier needs the `redis` package (pip install 'redis[hiredis]'): {e}") from e
        self.geometry = geometry
        self.stats = stats
        self.ttl_s = ttl_s
        self.prefix = f"cachedattn:{fingerprint[:32]}:"
        self.timeout_s = timeout_s
        self.client = None  # made at first use: a cluster client connects when made
        self._lock = lock_order.ordered(threading.Lock(), lock_order.REMOTE_CLIENT, "remote client")
        self._retry_at = 0.0
        self._delay = BACKOFF_S[0]
        self._down: str | None = None

    # ---- health -----------------------------------------------------------------

    def usable(self) -> bool:
        with self._lock:
            return time.monotonic() >= self._retry_at

    def _call(self, what: str, fn):
        """Runs fn() against Redis, timing it; any Redis failure becomes RemoteUnavailable."""
        import redis

        if not self.usable():
            raise RemoteUnavailable(f"remote tier backing off after: {self._down}")
        t0 = time.perf_counter()
        try:
            if self.client is None:
                self.client = make_client(self.url, self.timeout_s)
            out = fn()
        except (redis.RedisError, OSError) as e:
            self._failed(what, e)
            raise RemoteUnavailable(f"remote tier {what}: {e}") from e
        self.stats.add(remote_requests=1, remote_latency_s=time.perf_counter() - t0)
        with self._lock:
            if self._down is not None:
                log.warning("cachedattn: the remote tier %s is back", self.url.url)
            self._down, self._delay = None, BACKOFF_S[0]
        return out

    def _failed(self, what: str, e: Exception) -> None:
        self.stats.add(remote_errors=1)
        with self._lock:
            first = self._down is None
            self._down = f"{type(e).__name__}: {e}"
            self._retry_at = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, BACKOFF_S[1])
        if first:  # one warning per outage
            log.warning(
                "cachedattn: the remote tier %s failed while %s (%s: %s); continuing with the local tiers, "
                "retrying with backoff",
                self.url.url,
                what,
                type(e).__name__,
                e,
            )

    # ---- names ------------------------------------------------------------------

    def chunk_name(self, key: bytes) -> str:
        return f"{self.prefix}c:{key.hex()}"

    def tail_name(self, parent: bytes) -> str:
        return f"{self.prefix}t:{parent.hex()}"

    # ---- reads --------------------------------------------------------------------

    def find_chain(self, parent: bytes, tokens: np.ndarray) -> list[tuple[bytes, bytes, np.ndarray]]:
        """The remote chunks continuing `parent` with a prefix of `tokens`: [(key, parent, tokens)],
        possibly empty (find_chains of one)."""
        return self.find_chains([(parent, tokens)])[0]

    def find_chains(self, starts: list[tuple[bytes, np.ndarray]]) -> list[list[tuple[bytes, bytes, np.ndarray]]]:
        """For each (parent, tokens), the remote chunks continuing it, all probed in one pipelined round
        trip: the whole chunks' keys are computed from the tokens and checked (EXISTS), and each whole
        chunk's parent is asked for the token counts of partial chunks under it (SMEMBERS)."""
        C = self.geometry.chunk_tokens
        walks = []  # per start: its whole chunks [(key, parent, tokens)] and their parents
        for parent, tokens in starts:
            full, p = [], parent
            for j in range(len(tokens) // C):
                t = tokens[j * C : (j + 1) * C]
                k = keys.chunk_key(p, t)
                full.append((k, p, t))
                p = k
            walks.append((full, [parent] + [k for k, _, _ in full]))

        def probe():
            pipe = self.client.pipeline(transaction=False)
            for full, parents in walks:
                for k, _, _ in full:
                    pipe.exists(self.chunk_name(k))
                for q in parents:
                    pipe.smembers(self.tail_name(q))
            return pipe.execute()

        out = self._call("looking up", probe) if walks else []
        chains, at = [], 0
        for (full, parents), (_, tokens) in zip(walks, starts):
            there, tails = out[at : at + len(full)], out[at + len(full) : at + len(full) + len(parents)]
            at += len(full) + len(parents)
            m = 0
            while m < len(full) and there[m]:
                m += 1
            chain = full[:m]
            rest = tokens[m * C :]
            lengths = sorted((int(x) for x in tails[m] if int(x) <= len(rest) and 0 < int(x) < C), reverse=True)
            if lengths:
                p = parents[m]
                t = rest[: lengths[0]]
                chain.append((keys.chunk_key(p, t), p, t))
            chains.append(chain)
        return chains

    def open_read(self, conv, chain, records=None) -> RemoteReader:
        """A reader of a chain (from find_chain): its values are read in one pipelined round
        trip (or were, by fetch: `records`) and checked; `opened` counts the leading chunks that
        are there and sound."""
        return RemoteReader(self, chain, records)

    def fetch(self, chain) -> list[tuple[ChunkHeader, memoryview] | None]:
        """The records of a chain (pipelined GETs); None where missing or damaged (which are removed)."""
        names = [self.chunk_name(k) for k, _, _ in chain]

        def get():
            pipe = self.client.pipeline(transaction=False)
            for n in names:
                pipe.get(n)
            return pipe.execute()

        values = self._call("reading", get)
        geo, out = self.geometry, []
        for (k, p, t), v, name in zip(chain, values, names):
            if v is None:
                self.stats.add(remote_misses=1)
                if len(t) < geo.chunk_tokens:  # its tail entry outlived it: clean up
                    self._forget(lambda: self.client.srem(self.tail_name(p), len(t)))
                out.append(None)
                continue
            try:
                h, payload = decode_value(v, k, geo)
                if h.parent != p or not np.array_equal(h.tokens, t):
                    raise ValueError("chunk of other tokens")
                layer = bad_layer(geo, np.frombuffer(payload, dtype=np.uint8), h.checksums)
                if layer is not None:
                    raise ValueError(f"layer {layer} checksum mismatch")
            except ValueError as e:
                log.warning("cachedattn: remote chunk %s is bad (%s); removed, it will be recomputed", name, e)
                self.stats.add(remote_misses=1, remote_corrupt=1)
                self._forget(lambda: self.client.delete(name))
                out.append(None)
                continue
            self.stats.add(remote_bytes_read=len(v))
            out.append((h, payload))
        return out

    def _forget(self, fn) -> None:
        try:
            self._call("cleaning up", fn)
        except RemoteUnavailable:
            pass  # the next reader removes it

    # ---- writes -------------------------------------------------------------------

    def write_chunk(self, conv, chunk, block) -> str:
        """One SET of the chunk's record (header and payload), then its tail entry if partial."""
        h = ChunkHeader(chunk.index, chunk.key, chunk.parent, chunk.tokens, chunk.checksums, self.geometry.chunk_tokens)
        value = encode_value(h, block.view().numpy())
        name = self.chunk_name(chunk.key)
        self._call("writing", lambda: self.client.set(name, value, ex=self.ttl_s))
        if chunk.ntokens < self.geometry.chunk_tokens:  # after the chunk: an entry never precedes its chunk

            def add_tail():
                pipe = self.client.pipeline(transaction=False)
                pipe.sadd(self.tail_name(chunk.parent), chunk.ntokens)
                if self.ttl_s:
                    pipe.expire(self.tail_name(chunk.parent), self.ttl_s)
                return pipe.execute()

            self._call("writing", add_tail)
        self.stats.add(remote_bytes_written=len(value))
        return name

    def close(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
        except Exception:
            pass  # closing a client whose server is gone: nothing left to release


class _Done:
    """A read that completed when it was issued (the values are in memory already)."""

    def wait(self) -> None:
        pass

    def done(self) -> bool:
        return True


class RemoteReader(ChunkReader):
    def __init__(self, tier: RemoteTier, chain, records=None):
        self._tier, self._chain = tier, chain
        if records is None:
            records = tier.fetch(chain) if chain else []
        self.opened = next((i for i, r in enumerate(records) if r is None), len(records))
        self.records = records[: self.opened]  # (header, payload) of each chunk opened
        self.open_error = None if self.opened == len(chain) else OSError(errno.ENOENT, "remote chunk missing or bad")

    def read_layer(self, layer: int, blocks: list) -> _Done:
        o, n = self._tier.geometry.layer_range(layer)
        for (_, payload), b in zip(self.records, blocks):
            b.view().numpy()[o : o + n] = np.frombuffer(payload, dtype=np.uint8, count=n, offset=o)
        return _Done()

    def position(self, err: OSError) -> int | None:
        return None

    def path(self, i: int) -> str:
        return self._tier.chunk_name(self._chain[i][0])

    def close(self) -> None:
        self.records = []
