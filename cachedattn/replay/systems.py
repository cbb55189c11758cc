"""The systems a replay compares, and how one of them serves the whole trace.

Every system is the same Engine on the same model and trace; they differ in
the store behind it and the engine's options.
"""

from __future__ import annotations

import heapq
import math
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

import cachedattn
from cachedattn import AttentionStore
from cachedattn.replay.clock import ServiceModel, VirtualClock
from cachedattn.replay.trace import Trace
from cachedattn.serving import Engine


@dataclass(frozen=True)
class System:
    name: str
    description: str
    eviction: str = "queue"
    save: bool = True
    prefetch: bool = True
    read_buffer: bool = True
    layerwise: bool = True
    unlimited: bool = False  # every conversation's KV kept in host memory


SYSTEMS = {
    s.name: s
    for s in [
        System("RE", "recompute the whole history every turn", save=False, prefetch=False, read_buffer=False),
        System("CA", "cachedattn: queue-aware fetching and eviction (the paper's), layer-wise pre-loading"),
        System("CA-pred", "CA with the predictive eviction policy (queue + each conversation's rhythm)", "predictive"),
        System("CA-LRU", "CA with LRU eviction", "lru"),
        System("CA-FIFO", "CA with FIFO eviction", "fifo"),
        System("CA-noPL", "CA without pre-loading: load all history, then compute", read_buffer=False, layerwise=False),
        System("ideal", "every conversation's KV kept in host memory, no limit", "lru", prefetch=False, unlimited=True),
    ]
}


@dataclass
class Capacities:
    host_bytes: int
    disk_bytes: int
    chunk_tokens: int
    working_set_bytes: int
    block_bytes: int  # one chunk of this model


@dataclass
class RunResult:
    system: System
    records: list[dict]
    stats: dict
    busy: float  # modelled seconds serving jobs
    makespan: float  # modelled seconds from the first arrival to the last answer
    queue_lengths: list[int] = field(default_factory=list)


def working_set(trace: Trace, max_context: int, chunk_tokens: int, block_bytes: int) -> int:
    """Bytes (whole chunks) of every conversation's KV at its end, capped at the context window."""
    return sum(math.ceil(min(trace.total_tokens(c), max_context) / chunk_tokens) * block_bytes for c in trace.conversations)


def conversation_tokens(conv, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(conv.seed)
    return [
        (torch.from_numpy(rng.integers(1, vocab, (1, r.user_tokens))), torch.from_numpy(rng.integers(1, vocab, (1, r.answer_tokens))))
        for r in conv.rounds
    ]


def run_system(system: System, trace: Trace, model, vocab: int, caps: Capacities, service: ServiceModel,
               max_context: int, workdir: str, on_job=None) -> RunResult:
    if system.unlimited:
        # The whole working set, plus room for the copy-on-write of partial chunks and the running job.
        host = caps.working_set_bytes + caps.working_set_bytes // 8 + (64 << 20)
        store = AttentionStore(host_bytes=host, chunk_tokens=caps.chunk_tokens, eviction=system.eviction)
    elif not system.save:
        # RE stores nothing; the store only has to attach.
        store = AttentionStore(host_bytes=2 * caps.block_bytes, chunk_tokens=caps.chunk_tokens)
    else:
        disk = tempfile.mkdtemp(prefix=f"{system.name}-", dir=workdir)
        store = AttentionStore(host_bytes=caps.host_bytes, disk_dir=disk, disk_bytes=caps.disk_bytes,
                               chunk_tokens=caps.chunk_tokens, eviction=system.eviction)
    try:
        cachedattn.patch(model, store, max_context=max_context)
        clock = VirtualClock(service, store.spec.kv_bytes_per_token(), system.layerwise)
        engine = Engine(model, store, prefetch=system.prefetch, read_buffer=system.read_buffer,
                        layerwise=system.layerwise, save=system.save, clock=clock, background=False)
        result = _serve(engine, clock, trace, vocab, system, on_job)
        store.flush()
        result.stats = store.stats()
        if system.unlimited and result.stats["host"]["evictions"]:
            raise RuntimeError("the ideal system evicted KV: its host memory was sized too small")
        return result
    finally:
        cachedattn.unpatch(model)
        store.close()


def _serve(engine: Engine, clock: VirtualClock, trace: Trace, vocab: int, system: System, on_job) -> RunResult:
    convs = {c.id: c for c in trace.conversations}
    tokens = {c.id: conversation_tokens(c, vocab) for c in trace.conversations}
    history = {c.id: torch.zeros(1, 0, dtype=torch.long) for c in trace.conversations}
    arrivals = [(c.start, i, c.id, 0) for i, c in enumerate(trace.conversations)]
    heapq.heapify(arrivals)
    seq = len(arrivals)
    pending = {}  # job -> (conversation, round)
    records, queue_lengths = [], []
    while arrivals or engine.queued_conversations():
        if not engine.queued_conversations():
            clock.advance_to(arrivals[0][0])
        while arrivals and arrivals[0][0] <= clock.now:
            t, _, cid, k = heapq.heappop(arrivals)
            user, answer = tokens[cid][k]
            job = engine.submit(cid, torch.cat([history[cid], user], 1), answer=answer, submitted=t)
            pending[job] = (cid, k)
        queue_lengths.append(len(engine.queued_conversations()))
        job = engine.step()
        engine.wait_background_io()  # the modelled decode time dwarfs these: they are done by the next job
        cid, k = pending.pop(job)
        history[cid] = job.result()
        rnd = convs[cid].rounds[k]
        reusable = 0 if k == 0 else min(job.prompt_tokens - rnd.user_tokens, job.prompt_tokens - 1)
        records.append(dict(
            conversation=cid, round=k, arrival=job.submitted, start=job.started, finish=job.finished,
            wait=job.started - job.submitted, ttft=job.ttft, modelled_prefill=job.modelled_prefill,
            service=job.service_time, prompt_tokens=job.prompt_tokens, user_tokens=rnd.user_tokens,
            answer_tokens=job.answer_tokens, reused=job.reused_tokens, computed=job.computed_tokens,
            dropped=job.dropped_tokens, host_tokens=job.tier_tokens["host"], disk_tokens=job.tier_tokens["disk"],
            reusable=max(0, reusable),
        ))
        if k + 1 < len(convs[cid].rounds):
            seq += 1
            heapq.heappush(arrivals, (job.finished + convs[cid].rounds[k + 1].think, seq, cid, k + 1))
        if on_job is not None:
            on_job()
    start = min(c.start for c in trace.conversations)
    return RunResult(system, records, {}, clock.busy, clock.now - start, queue_lengths)
