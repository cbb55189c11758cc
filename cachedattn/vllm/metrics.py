"""What the connector did, through vLLM's own channels: per-step stats
from the worker (`KVConnectorStats`), summed by vLLM, logged in its
periodic "KV Transfer metrics" line and exported as Prometheus counters on
vLLM's /metrics:

- ``cachedattn:chunk_hits_total{tier=host|disk|remote}``: stored blocks found, by the tier they came from;
- ``cachedattn:blocks_loaded_total``, ``cachedattn:blocks_saved_total``, ``cachedattn:lookups_total``;
- ``cachedattn:load_failures_total`` (blocks vLLM recomputed), ``cachedattn:save_failures_total``.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from prometheus_client import Counter

TIERS = ("host", "disk", "remote")
COUNTS = ("lookups", "blocks_loaded", "blocks_saved", "load_failures", "save_failures")
KEYS = COUNTS + tuple(f"{t}_hits" for t in TIERS)


class CachedAttnStats(KVConnectorStats):
    """Counts since the last report; summed across steps (and workers) by `aggregate`."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: self.data.get(k, 0) for k in KEYS}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class CachedAttnPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames: list[str], per_engine_labelvalues: dict[int, list]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter = metric_types[Counter]
        self.hits = counter(name="cachedattn:chunk_hits", documentation="Stored blocks found, by tier",
                            labelnames=[*labelnames, "tier"])
        self.counts = {
            k: counter(name=f"cachedattn:{k}", documentation=f"cachedattn connector: {k.replace('_', ' ')}",
                       labelnames=labelnames)
            for k in COUNTS
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for t in TIERS:
            n = transfer_stats_data.get(f"{t}_hits", 0)
            if n:
                self.hits.labels(*labels, t).inc(n)
        for k, c in self.counts.items():
            n = transfer_stats_data.get(k, 0)
            if n:
                c.labels(*labels).inc(n)


def delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: now.get(k, 0) - before.get(k, 0) for k in KEYS if now.get(k, 0) != before.get(k, 0)}


def counts(transfers, store) -> dict[str, int]:
    """The worker's running totals, in KEYS' names."""
    s = store.stats()
    out = {k: transfers.stats.get(k, 0) for k in COUNTS}
    out.update({f"{t}_hits": s[t]["hits"] for t in TIERS})
    return out
