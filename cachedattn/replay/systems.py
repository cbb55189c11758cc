"""The systems a replay compares, and how one of them serves the whole trace.

Every system is the same Engine on the same model and trace; they differ in
the store behind it and the engine's options. The systems run side by side,
turn by turn (run_systems), each with its own copy of the model, store,
engine and virtual clock, so that a busy machine slows them alike; and
nothing waits for a system's background I/O between its jobs (disk writes,
prefetches and the read buffer overlap the next job, as in a server).
"""

from __future__ import annotations

import copy
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


class _Replay:
    """One system serving the trace, one job per step(): its own model copy, store, engine and virtual clock."""

    def __init__(self, system: System, trace: Trace, model, vocab: int, caps: Capacities, service: ServiceModel,
                 max_context: int, workdir: str, max_batch: int = 1):
        self.system, self.model = system, model
        if system.unlimited:
            # The whole working set, plus room for the copy-on-write of partial chunks and the running job.
            host = caps.working_set_bytes + caps.working_set_bytes // 8 + (64 << 20)
            self.store = AttentionStore(host_bytes=host, chunk_tokens=caps.chunk_tokens, eviction=system.eviction)
        elif not system.save:
            # RE stores nothing; the store only has to attach.
            self.store = AttentionStore(host_bytes=2 * caps.block_bytes, chunk_tokens=caps.chunk_tokens)
        else:
            disk = tempfile.mkdtemp(prefix=f"{system.name}-", dir=workdir)
            self.store = AttentionStore(host_bytes=caps.host_bytes, disk_dir=disk, disk_bytes=caps.disk_bytes,
                                        chunk_tokens=caps.chunk_tokens, eviction=system.eviction)
        self._patched = False
        try:
            cachedattn.patch(model, self.store, max_context=max_context)
            self._patched = True
            self.clock = VirtualClock(service, self.store.spec.kv_bytes_per_token(), system.layerwise)
            self.engine = Engine(model, self.store, prefetch=system.prefetch, read_buffer=system.read_buffer,
                                 layerwise=system.layerwise, save=system.save, clock=self.clock, background=False,
                                 max_batch=max_batch)
        except BaseException:
            self.close()
            raise
        self.vocab = vocab
        self.convs = {c.id: c for c in trace.conversations}
        self.tokens = {c.id: conversation_tokens(c, vocab) for c in trace.conversations}
        self.history = {c.id: torch.zeros(1, 0, dtype=torch.long) for c in trace.conversations}
        self.arrivals = [(c.start, i, c.id, 0) for i, c in enumerate(trace.conversations)]
        heapq.heapify(self.arrivals)
        self.seq = len(self.arrivals)
        self.pending = {}  # job -> (conversation, round)
        self.records: list[dict] = []
        self.queue_lengths: list[int] = []
        self.start = min(c.start for c in trace.conversations)

    @property
    def done(self) -> bool:
        return not self.arrivals and not self.engine.queued_conversations()

    def step(self) -> list[dict]:
        """Admits what has arrived by the virtual clock, runs the next job (or batch), returns their records."""
        engine, clock = self.engine, self.clock
        if not engine.queued_conversations():
            clock.advance_to(self.arrivals[0][0])
        while self.arrivals and self.arrivals[0][0] <= clock.now:
            t, _, cid, k = heapq.heappop(self.arrivals)
            user, answer = self.tokens[cid][k]
            job = engine.submit(cid, torch.cat([self.history[cid], user], 1), answer=answer, submitted=t)
            self.pending[job] = (cid, k)
        self.queue_lengths.append(len(engine.queued_conversations()))
        # No wait for background I/O here: this job's disk writes and the prefetches it started
        # run on, concurrently with the next job, as in a server.
        records = []
        for job in engine.step_batch():
            cid, k = self.pending.pop(job)
            self.history[cid] = job.result()
            rnd = self.convs[cid].rounds[k]
            reusable = 0 if k == 0 else min(job.prompt_tokens - rnd.user_tokens, job.prompt_tokens - 1)
            record = dict(
                conversation=cid, round=k, arrival=job.submitted, start=job.started, finish=job.finished,
                wait=job.started - job.submitted, ttft=job.ttft, modelled_prefill=job.modelled_prefill,
                service=job.service_time, prompt_tokens=job.prompt_tokens, user_tokens=rnd.user_tokens,
                answer_tokens=job.answer_tokens, reused=job.reused_tokens, computed=job.computed_tokens,
                dropped=job.dropped_tokens, host_tokens=job.tier_tokens["host"], disk_tokens=job.tier_tokens["disk"],
                reusable=max(0, reusable), batch=job.batch_id, batch_size=job.batch_size, run_seconds=job.run_seconds,
            )
            records.append(record)
            if k + 1 < len(self.convs[cid].rounds):
                self.seq += 1
                heapq.heappush(self.arrivals, (job.finished + self.convs[cid].rounds[k + 1].think, self.seq, cid, k + 1))
        self.records.extend(records)
        return records

    def result(self) -> RunResult:
        self.store.flush()  # the last writes, so that the byte counts are complete
        stats = self.store.stats()
        if self.system.unlimited and stats["host"]["evictions"]:
            raise RuntimeError("the ideal system evicted KV: its host memory was sized too small")
        return RunResult(self.system, self.records, stats, self.clock.busy, self.clock.now - self.start,
                         self.queue_lengths)

    def close(self) -> None:
        if self._patched:
            cachedattn.unpatch(self.model)
            self._patched = False
        self.store.close()


def run_systems(systems: list[System], trace: Trace, model, vocab: int, caps: Capacities, service: ServiceModel,
                max_context: int, workdir: str, on_job=None, max_batch: int = 1) -> list[RunResult]:
    """Serves the trace on every system, interleaved turn by turn: job t runs on each system before
    job t+1 runs on any, the order within a turn rotating, so that whatever else loads the machine
    meanwhile falls on every system alike. Each system gets its own copy of `model` (the first uses it
    as it is). ``on_job(system_name, turn)`` is called after each job. ``max_batch``: every system's
    engine runs up to that many queued jobs as one batch (static batching; a step is then a batch)."""
    if len({s.name for s in systems}) != len(systems):
        raise ValueError(f"systems must be distinct, got {[s.name for s in systems]}")
    # Copied before any is patched: a copy of a patched model would carry the first system's store.
    models = [model] + [copy.deepcopy(model) for _ in systems[1:]]
    replays: list[_Replay] = []
    try:
        for system, m in zip(systems, models):
            replays.append(_Replay(system, trace, m, vocab, caps, service, max_context, workdir, max_batch))
        turn = 0
        while not all(r.done for r in replays):
            k = turn % len(replays)
            for r in replays[k:] + replays[:k]:
                if not r.done:
                    for _ in r.step():
                        if on_job is not None:
                            on_job(r.system.name, turn)
            turn += 1
        return [r.result() for r in replays]
    finally:
        for r in replays:
            r.close()


def run_system(system: System, trace: Trace, model, vocab: int, caps: Capacities, service: ServiceModel,
               max_context: int, workdir: str, on_job=None, max_batch: int = 1) -> RunResult:
    """One system alone (run_systems with one)."""
    return run_systems([system], trace, model, vocab, caps, service, max_context, workdir, on_job, max_batch)[0]
