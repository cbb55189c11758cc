"""Prometheus metrics (prometheus_client, in its own registry): requests,
tokens, time to first token, reused/computed tokens, and, read from the store
at each scrape, per-tier hits and bytes and what each tier holds."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("cachedattn")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class StoreCollector:
    """The store's counters and occupancy, as of the scrape."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        try:
            st = self.store.stats()
        except Exception as e:  # a closed store during shutdown: scrape the rest
            log.debug("cachedattn: no store stats for /metrics: %s", e)
            return
        tiers = ("host", "disk")
        for name, key, doc in (("hits", "hits", "chunks a load found in the tier"),
                               ("misses", "misses", "chunks a load needed from the tier and could not use"),
                               ("read_bytes", "bytes_read", "KV bytes read from the tier"),
                               ("written_bytes", "bytes_written", "KV bytes written into the tier"),
                               ("evictions", "evictions", "chunks evicted from the tier"),
                               ("prefetches", "prefetches", "chunks brought into host memory ahead of use")):
            fam = CounterMetricFamily(f"cachedattn_store_{name}", doc, labels=["tier"])
            for t in tiers:
                fam.add_metric([t], st[t].get(key, 0))
            yield fam
        for name, key, doc in (("used_bytes", "used_bytes", "bytes the tier holds now"),
                               ("capacity_bytes", "capacity_bytes", "the tier's capacity")):
            fam = GaugeMetricFamily(f"cachedattn_store_{name}", doc, labels=["tier"])
            for t in tiers:
                if key in st[t]:
                    fam.add_metric([t], st[t][key])
            yield fam
        yield GaugeMetricFamily("cachedattn_store_conversations", "conversations stored", value=st["conversations"])
        for key, doc in (("tokens_stored", "tokens appended to the store"),
                         ("tokens_reused", "tokens served by loads from the store"),
                         ("corrupt_chunks", "damaged chunks found (recomputed)"),
                         ("write_errors", "chunk writes that failed")):
            yield CounterMetricFamily(f"cachedattn_store_{key}", doc, value=st[key])


class Metrics:
    def __init__(self, store):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cachedattn_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("cachedattn_prompt_tokens", "prompt tokens of finished turns", registry=r)
        self.generation_tokens = Counter("cachedattn_generation_tokens", "tokens generated", registry=r)
        self.reused_tokens = Counter("cachedattn_reused_tokens", "prompt tokens whose KV came from the store",
                                     registry=r)
        self.computed_tokens = Counter("cachedattn_computed_tokens", "prompt tokens computed", registry=r)
        self.tier_tokens = Counter("cachedattn_reused_tokens_by_tier", "reused tokens per tier they came from",
                                   ["tier"], registry=r)
        self.ttft = Histogram("cachedattn_time_to_first_token_seconds", "time to first token in the engine "
                              "(from the start of the turn, loading included)", buckets=TTFT_BUCKETS, registry=r)
        self.queue_wait = Histogram("cachedattn_queue_seconds", "time a turn waited in the engine's queue",
                                    buckets=TTFT_BUCKETS, registry=r)
        self.in_flight = Gauge("cachedattn_requests_in_flight", "turns queued or running in the engine", registry=r)
        self.batch_size = Histogram("cachedattn_batch_size", "rows of the engine batch each turn ran in "
                                    "(1: alone; see --max-batch)", buckets=BATCH_BUCKETS, registry=r)
        self.cancelled = Counter("cachedattn_cancelled", "turns stopped because the client went away", registry=r)
        r.register(StoreCollector(store))

    def observe_job(self, job) -> None:
        """A finished engine job (called on the engine's thread; the client may be gone)."""
        if job.future.exception() is not None:
            return
        self.prompt_tokens.inc(job.prompt_tokens)
        self.generation_tokens.inc(job.answer_tokens)
        self.reused_tokens.inc(job.reused_tokens)
        self.computed_tokens.inc(job.computed_tokens)
        for tier, n in job.tier_tokens.items():
            self.tier_tokens.labels(tier).inc(n)
        self.batch_size.observe(job.batch_size)
        if job.ttft is not None:
            self.ttft.observe(job.ttft)
        if job.started is not None and job.submitted is not None:
            self.queue_wait.observe(max(0.0, job.started - job.submitted))

    def render(self) -> bytes:
        return generate_latest(self.registry)
