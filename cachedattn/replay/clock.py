"""The replay's virtual clock: time advances by a model of each job's service
time, so hundreds of turns (and the minutes of think time between them) replay
in minutes, and the queueing does not depend on how fast this machine is.
The cache decisions, and through the modelled load time the schedule, are
not fully deterministic: background I/O (disk writes, prefetches, the read
buffer) overlaps the next job as in a server, so whether a chunk is read
from host memory or disk, or may be demoted yet, can follow its timing.
Without a disk tier (RE, ideal) the replay is the same for a seed on any
machine.

    prefill = c0 + c1 * computed + c2 * computed * context / 1000     (context = prompt tokens)
            + load stall: all of it when loading before computing, else what
              exceeds the compute (layer-wise pre-loading)
    load    = host bytes / host_bw + disk bytes / disk_bw
    decode  = answer tokens * (d0 + d1 * context / 1000)

A batch (Engine(max_batch > 1)) is charged as one run that ends for all its
jobs at once (static batching):

    prefill = c0 + sum over rows of (c1 * computed + c2 * computed * context / 1000)
            + all the rows' loads (a batch reads its history before computing)
    decode  = max answer * (d0 + d1 * rows * padded context / 1000)

one fixed cost per forward and per decode step for the whole batch (the
weights are read once), and every row attending over the padded width (the
longest prompt plus the longest answer). This is a model of batched decoding,
not a measurement; the replay reports measured throughput next to it.

The coefficients are measured (`calibrate`, `python -m cachedattn replay
--calibrate`); the defaults were measured for the default model on the
development VM (2 vCPU AMD EPYC) and are kept fixed so the default replay is
deterministic. TTFT and prefill throughput in the report are measured, not
taken from this model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ServiceModel:
    c0: float = 3.0e-3
    c1: float = 1.0e-4
    c2: float = 2.0e-5
    d0: float = 4.5e-3
    d1: float = 5.0e-4
    host_bw: float = 10e9
    disk_bw: float = 2.5e9
    source: str = "defaults (development VM, default model)"

    def compute(self, computed: int, context: int) -> float:
        return self.c0 + self.c1 * computed + self.c2 * computed * context / 1000

    def prefill(self, job, bytes_per_token: int, layerwise: bool) -> float:
        compute = self.compute(job.computed_tokens, job.prompt_tokens)
        load = (job.tier_tokens["host"] / self.host_bw + job.tier_tokens["disk"] / self.disk_bw) * bytes_per_token
        return compute + (max(0.0, load - compute) if layerwise else load)

    def decode(self, answer_tokens: int, context: int) -> float:
        return answer_tokens * (self.d0 + self.d1 * context / 1000)

    def as_dict(self) -> dict:
        return asdict(self)


class VirtualClock:
    """A clock the engine charges after each job (Engine(clock=VirtualClock(...)))."""

    def __init__(self, model: ServiceModel, bytes_per_token: int, layerwise: bool = True):
        self.model, self.bytes_per_token, self.layerwise = model, bytes_per_token, layerwise
        self.now = 0.0
        self.busy = 0.0  # modelled time spent serving jobs

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)

    def charge(self, job) -> None:
        prefill = self.model.prefill(job, self.bytes_per_token, self.layerwise)
        job.modelled_prefill = prefill
        job.service_time = prefill + self.model.decode(job.answer_tokens, job.prompt_tokens + job.answer_tokens)
        self.now += job.service_time
        self.busy += job.service_time


    def charge_batch(self, jobs) -> None:
        """A batch's modelled time (see the module docstring): every job's service time is the
        whole batch's; its modelled_prefill is its share, so that summing over jobs counts the
        batch's prefill once."""
        m = self.model
        compute = m.c0 + sum(m.compute(j.computed_tokens, j.prompt_tokens) - m.c0 for j in jobs)
        load = sum(j.tier_tokens["host"] / m.host_bw + j.tier_tokens["disk"] / m.disk_bw for j in jobs)
        prefill = compute + load * self.bytes_per_token
        steps = max(j.answer_tokens for j in jobs)
        width = max(j.prompt_tokens for j in jobs) + steps
        total = prefill + steps * (m.d0 + m.d1 * len(jobs) * width / 1000)
        for j in jobs:
            j.modelled_prefill = prefill / len(jobs)
            j.service_time = total
        self.now += total
        self.busy += total


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def calibrate(model, vocab: int, device, lengths=(64, 256, 512, 1024, 2048), host_bw=None, disk_bw=None) -> ServiceModel:
    """Fits the compute and decode coefficients from timed forwards of `model`."""
    from cachedattn.hf.probe import cache_kwarg

    kwarg = cache_kwarg(model)
    g = torch.Generator().manual_seed(0)
    rows, ts = [], []
    with torch.no_grad():
        for L in lengths:
            ids = torch.randint(1, vocab, (1, L), generator=g).to(device)
            ts.append(_timed(lambda: model(ids)))
            rows.append([1.0, L, L * L / 1000])
        c0, c1, c2 = np.linalg.lstsq(np.array(rows), np.array(ts), rcond=None)[0]
        dec = []
        for ctx in (lengths[0], lengths[-1]):
            ids = torch.randint(1, vocab, (1, ctx), generator=g).to(device)
            out = model(ids, use_cache=True)
            past = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            step = torch.randint(1, vocab, (1, 1), generator=g).to(device)
            kw = {kwarg: past}

            def one():
                model(step, **kw)
                for layer in past.layers:  # keep the context fixed
                    layer.keys, layer.values = layer.keys[:, :, :ctx], layer.values[:, :, :ctx]

            dec.append(_timed(one, 5))
        d1 = max(0.0, (dec[1] - dec[0]) / ((lengths[-1] - lengths[0]) / 1000))
        d0 = max(1e-6, dec[0] - d1 * lengths[0] / 1000)
    base = ServiceModel()
    return ServiceModel(
        max(0.0, float(c0)), max(1e-9, float(c1)), max(0.0, float(c2)), float(d0), float(d1),
        host_bw or base.host_bw, disk_bw or base.disk_bw, source="calibrated on this machine",
    )
