"""`cachedattn replay --servers N [--remote URL]`: several servers behind a load
balancer that sends each turn to a server drawn at random.

Each server is a model copy with its own store (host memory and disk sized as
in the single-server replay). Without a remote tier a turn that lands on a
server which did not serve the conversation's previous turn recomputes its
history; with one (a Redis shared by all servers) it finds the history there.
Both set-ups serve the same turns, in the same order, on the same servers,
interleaved turn by turn so that a busy machine slows them alike. Turns run
in arrival order (start plus think times; no queueing), and TTFT is the
measured wall time of each turn's prefill, remote reads included.
"""

from __future__ import annotations

import copy
import tempfile
import time
import uuid

import numpy as np
import torch

import cachedattn
from cachedattn import AttentionStore
from cachedattn.replay.systems import Capacities, conversation_tokens
from cachedattn.replay.trace import Trace


class _Farm:
    """N servers sharing (or not) one remote tier."""

    def __init__(self, name, model, n, caps: Capacities, max_context, workdir, remote):
        self.name, self.remote = name, remote
        self.tag = uuid.uuid4().hex[:8]  # this run's conversations: nothing left in Redis by an earlier run is reused
        self.models, self.stores = [], []
        try:
            for i in range(n):
                m = copy.deepcopy(model)
                disk = tempfile.mkdtemp(prefix=f"{name}-{i}-", dir=workdir)
                st = AttentionStore(host_bytes=caps.host_bytes, disk_dir=disk, disk_bytes=caps.disk_bytes,
                                    chunk_tokens=caps.chunk_tokens, remote=remote)
                self.stores.append(st)
                cachedattn.patch(m, st, max_context=max_context)
                self.models.append(m)
        except BaseException:
            self.close()
            raise

    def turn(self, server: int, cid: str, ids: torch.Tensor, answer: torch.Tensor) -> dict:
        m = self.models[server]
        with torch.no_grad(), cachedattn.session(m, f"{self.tag}-{cid}", reserve=answer.shape[1]) as s:
            t0 = time.perf_counter()
            m(ids)
            ttft = time.perf_counter() - t0
            s.continue_turn(answer)
        return dict(ttft=ttft, reused=s.reused_tokens, computed=s.computed_tokens, dropped=s.dropped_tokens)

    def stats(self) -> dict:
        out = {"remote_hits": 0, "remote_bytes_read": 0, "remote_errors": 0}
        for st in self.stores:
            st.flush()
            r = st.stats()["remote"]
            out["remote_hits"] += r["hits"]
            out["remote_bytes_read"] += r["bytes_read"]
            out["remote_errors"] += r["errors"]
        return out

    def close(self) -> None:
        for m in self.models:
            cachedattn.unpatch(m)
        for st in self.stores:
            st.close()


def turn_order(trace: Trace) -> list[tuple[float, str, int]]:
    """(arrival, conversation, round) in arrival order, answers taking no time."""
    events = []
    for c in trace.conversations:
        t = c.start
        for k, r in enumerate(c.rounds):
            t += r.think
            events.append((t, c.id, k))
    return sorted(events)


def run_servers(trace: Trace, model, vocab: int, caps: Capacities, max_context: int, workdir: str, servers: int,
                remote: str | None, seed: int = 0, on_job=None) -> tuple[list[dict], list[dict]]:
    """Rows (one per set-up: without and, given `remote`, with the remote tier) and per-turn records."""
    setups = [("local only", None)] + ([("remote tier", remote)] if remote else [])
    farms = []
    try:
        for name, url in setups:
            farms.append(_Farm(name, model, servers, caps, max_context, workdir, url))
        tokens = {c.id: conversation_tokens(c, vocab) for c in trace.conversations}
        history = {c.id: torch.zeros(1, 0, dtype=torch.long) for c in trace.conversations}
        rng = np.random.default_rng(seed)
        records = []
        for j, (_, cid, k) in enumerate(turn_order(trace)):
            server = int(rng.integers(servers))
            user, answer = tokens[cid][k]
            ids = torch.cat([history[cid], user], 1)
            for farm in farms[j % len(farms):] + farms[: j % len(farms)]:
                rec = farm.turn(server, cid, ids, answer)
                rec.update(setup=farm.name, conversation=cid, round=k, server=server,
                           reusable=min(history[cid].shape[1], max_context))
                records.append(rec)
            history[cid] = torch.cat([ids, answer], 1)
            if on_job is not None:
                on_job()
        rows = []
        for farm in farms:
            recs = [r for r in records if r["setup"] == farm.name]
            later = [r for r in recs if r["round"] > 0]
            ttft = np.array([r["ttft"] for r in later]) if later else np.zeros(1)
            reusable = sum(r["reusable"] for r in later)
            rows.append(dict(
                setup=farm.name, servers=servers, turns=len(recs),
                hit_rate=sum(r["reused"] for r in later) / reusable if reusable else None,
                ttft_mean_ms=1e3 * float(ttft.mean()), ttft_p50_ms=1e3 * float(np.median(ttft)),
                ttft_p90_ms=1e3 * float(np.percentile(ttft, 90)), **farm.stats(),
            ))
        return rows, records
    finally:
        for farm in farms:
            farm.close()
