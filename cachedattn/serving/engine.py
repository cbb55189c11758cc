"""Engine: a FCFS job queue and one worker running turns through a patched model.

submit() returns at once; the worker runs jobs in arrival order, one at a time
(batch size 1 per job). Before each job it prefetches, from disk into host
memory, the conversations of the next jobs in the queue, as many as the host
tier can hold at the mean size of a conversation's KV (the paper's look-ahead
window C_mem / S_kv), so their loads find them in memory.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future

import torch

import cachedattn
from cachedattn.serving.policies import QueueAwarePolicy


class Job:
    def __init__(self, conv_id: str, input_ids: torch.Tensor, max_new_tokens: int, gen_kwargs: dict):
        self.conv_id = conv_id
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.gen_kwargs = gen_kwargs
        self.future: Future = Future()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.ttft: float | None = None  # from start of the turn to its first token
        self.queue_wait: float | None = None
        self.reused_tokens = self.computed_tokens = self.dropped_tokens = 0
        self.tier_hits: dict[str, int] = {}

    def result(self, timeout: float | None = None) -> torch.Tensor:
        """The generated sequence (the kept window plus the answer), as [1, tokens]."""
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()


class Engine:
    def __init__(self, model, store, prefetch: bool = True, **patch_options):
        if getattr(model, "_cachedattn", None) is None:
            cachedattn.patch(model, store, **patch_options)
        elif model._cachedattn.store is not store:
            raise ValueError("the model is patched with another store")
        self.model, self.store, self.prefetch = model, store, prefetch
        if isinstance(store.policy, QueueAwarePolicy):
            store.policy.bind(self.queued_conversations, self.disk_window)
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._worker = threading.Thread(target=self._run, name="cachedattn-engine", daemon=True)
        self._worker.start()

    # ---- the queue --------------------------------------------------------------

    def submit(self, conv_id: str, input_ids, max_new_tokens: int = 128, **gen_kwargs) -> Job:
        """Queues one turn (full history + new message); returns its Job at once."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        job = Job(conv_id, ids, int(max_new_tokens), gen_kwargs)
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine is closed")
            self._queue.append(job)
            self._cv.notify()
        return job

    def queued_conversations(self) -> list[str]:
        with self._cv:
            return [j.conv_id for j in self._queue]

    def _mean_kv_bytes(self) -> float:
        convs = self.store.conversations()
        if not convs:
            return 0.0
        per_token = self.store.spec.kv_bytes_per_token() if self.store.spec else 0
        st = self.store.stats()
        return max(1.0, st["tokens_stored"] / max(1, len(convs))) * per_token

    def prefetch_window(self) -> int:
        """C_mem / S_kv: how many queued jobs' conversations host memory can hold."""
        s_kv = self._mean_kv_bytes()
        cap = self.store.stats()["host"].get("capacity_bytes", 0)
        return int(cap // s_kv) if s_kv else 0

    def disk_window(self) -> int:
        """(C_mem + C_disk) / S_kv: queued jobs whose KV is never dropped from disk."""
        s_kv = self._mean_kv_bytes()
        st = self.store.stats()
        cap = st["host"].get("capacity_bytes", 0) + st["disk"].get("capacity_bytes", 0)
        return int(cap // s_kv) if s_kv else 0

    # ---- the worker -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                ahead = [j.conv_id for j in list(self._queue)[: self.prefetch_window()]] if self.prefetch else []
            for conv in dict.fromkeys(ahead):
                if conv in self.store and conv != job.conv_id:
                    self.store.prefetch(conv)  # background: overlaps with this job
            self._execute(job)

    def _execute(self, job: Job) -> None:
        job.started = time.perf_counter()
        job.queue_wait = job.started - job.submitted
        before = self.store.stats()
        try:
            with torch.no_grad(), cachedattn.session(self.model, job.conv_id) as s:
                out = self.model.generate(job.input_ids, max_new_tokens=job.max_new_tokens, **job.gen_kwargs)
        except BaseException as e:
            job.future.set_exception(e)
            return
        after = self.store.stats()
        job.ttft, job.reused_tokens, job.computed_tokens = s.ttft, s.reused_tokens, s.computed_tokens
        job.dropped_tokens = s.dropped_tokens
        job.tier_hits = {
            "host": after["host"]["hits"] - before["host"]["hits"],
            "disk": after["disk"]["hits"] - before["disk"]["hits"],
        }
        job.future.set_result(getattr(out, "sequences", out))

    def close(self) -> None:
        """Finishes the queued jobs, then stops the worker."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._worker.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
