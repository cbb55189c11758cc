"""Counters of a store, per tier. Definitions (all counted in chunks unless
named bytes or tokens):

- host.hits / host.misses: chunks a load found / did not find in host memory.
- disk.hits / disk.misses: chunks a load read from disk / needed from disk but
  could not use (damaged or unreadable).
- bytes_read / bytes_written: KV bytes copied out of / into host blocks, and
  bytes read from / written to chunk files.
- evictions: chunks demoted out of host memory / chunk files removed for space.
- prefetches: chunks brought from disk into host memory ahead of use.
- tokens_stored: tokens appended; tokens_reused: tokens served by loads.
- remote.*: the shared Redis tier (cachedattn.store.remote_tier): hits (chunks
  adopted from it), misses (missing or damaged there), bytes read/written,
  requests and their summed latency_s, errors (failed requests), corrupt
  (damaged values removed), skipped_writes (not written: backing off or too
  many bytes in flight). All zero without a remote tier.
- recovered_turns: turns redone because a chunk failed while it was loading.
- skipped_saves: turns whose KV was not stored (e.g. host memory full at save).
- shortened_loads: loads cut short (or turned into misses) because a resource ran
  out: host blocks all in use, no file descriptor left.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, fields

from cachedattn.store import lock_order


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    prefetches: int = 0


@dataclass
class RemoteTierStats(TierStats):
    requests: int = 0
    latency_s: float = 0.0
    errors: int = 0
    corrupt: int = 0
    skipped_writes: int = 0


@dataclass
class StoreStats:
    host: TierStats = field(default_factory=TierStats)
    disk: TierStats = field(default_factory=TierStats)
    remote: RemoteTierStats = field(default_factory=RemoteTierStats)
    lookups: int = 0
    tokens_stored: int = 0
    tokens_reused: int = 0
    corrupt_chunks: int = 0
    write_errors: int = 0
    recovered_turns: int = 0
    skipped_saves: int = 0
    shortened_loads: int = 0
    _lock: threading.Lock = field(
        default_factory=lambda: lock_order.ordered(threading.Lock(), lock_order.STATS, "stats"),
        repr=False,
        compare=False,
    )

    def add(self, **deltas: int) -> None:
        """add(host_hits=2, disk_bytes_read=4096, lookups=1, ...)"""
        with self._lock:
            for name, d in deltas.items():
                tier, _, counter = name.partition("_")
                if tier in ("host", "disk", "remote") and counter:
                    obj = getattr(self, tier)
                    setattr(obj, counter, getattr(obj, counter) + d)
                else:
                    setattr(self, name, getattr(self, name) + d)

    def snapshot(self) -> dict:
        with self._lock:
            d = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
            d["host"], d["disk"], d["remote"] = asdict(self.host), asdict(self.disk), asdict(self.remote)
        r = d["remote"]
        r["mean_latency_ms"] = 1e3 * r["latency_s"] / r["requests"] if r["requests"] else None
        chunks = d["host"]["hits"] + d["host"]["misses"]
        d["host_hit_rate"] = d["host"]["hits"] / chunks if chunks else None
        served = d["host"]["hits"] + d["disk"]["hits"]
        d["hit_rate"] = served / chunks if chunks else None
        return d
