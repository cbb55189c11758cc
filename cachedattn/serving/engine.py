"""Engine: a FCFS job queue and a worker running turns through a patched model.

submit() returns at once; jobs run in arrival order, one at a time (batch
size 1 per job). Around each job the engine drives the store from the queue:

    step():
        job = next in the queue
        prefetch the look-ahead window's disk-resident KV      (fetching.py)
        run the job: prefill (layer-wise loading), then the answer;
            while it decodes, pre-load the next job's KV         (read buffer)
        keep `reserve` of host memory free for the next job     (policy order)

A background worker calls step() as jobs come (background=True), or the
caller does (background=False: replays driving a virtual clock).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque

import torch

import cachedattn
from cachedattn.serving import fetching
from cachedattn.serving.job import Job
from cachedattn.serving.policies import QueueAwarePolicy

log = logging.getLogger("cachedattn")


class Engine:
    """Options: ``prefetch`` (scheduler-aware fetching), ``read_buffer`` (pre-load
    the next job while this one decodes), ``layerwise`` (False: load all history,
    then compute), ``save`` (False: store nothing, i.e. recompute every turn),
    ``reserve`` (fraction of host memory kept free after each job), ``clock``
    (a callable; one with a ``charge(job)`` method is a virtual clock, advanced
    by it after each job), ``background`` (run a worker thread)."""

    def __init__(
        self,
        model,
        store,
        prefetch: bool = True,
        read_buffer: bool = True,
        layerwise: bool = True,
        save: bool = True,
        reserve: float = 0.1,
        clock=time.monotonic,
        background: bool = True,
        **patch_options,
    ):
        if not 0 <= reserve < 1:
            raise ValueError(f"reserve must be a fraction of host memory in [0, 1), got {reserve!r}")
        if getattr(model, "_cachedattn", None) is None:
            cachedattn.patch(model, store, **patch_options)
        elif model._cachedattn.store is not store:
            raise ValueError("the model is patched with another store")
        self.model, self.store, self.clock = model, store, clock
        self.prefetch, self.read_buffer, self.layerwise, self.save = prefetch, read_buffer, layerwise, save
        self.reserve = reserve
        self._bytes_per_token = store.spec.kv_bytes_per_token()
        # Fixed once the store is attached; the policy asks for the windows at every eviction.
        st = store.stats()
        self._host_cap = st["host"]["capacity_bytes"]
        self._disk_cap = st["disk"].get("capacity_bytes", 0)
        self._policy = store.policy if isinstance(store.policy, QueueAwarePolicy) else None
        if self._policy is not None:
            self._policy.bind(self)
        elif save:
            log.info("cachedattn: the store evicts by %r, blind to the queue; eviction='queue' lets the queue decide",
                     store.policy.name)
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stop = False
        # A server needs only the last position's logits (generate() does the same).
        self._device = next(model.parameters()).device
        self._fwd_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self._pending_prefetch: list = []
        self._worker = None
        if background:
            self._worker = threading.Thread(target=self._run, name="cachedattn-engine", daemon=True)
            self._worker.start()

    # ---- the queue --------------------------------------------------------------

    def submit(
        self, conv_id: str, input_ids, max_new_tokens: int = 128, answer=None, submitted: float | None = None, **gen_kwargs
    ) -> Job:
        """Queues one turn (full history + new message); returns its Job at once.
        ``answer``: token ids to feed as the answer instead of generating one;
        ``submitted``: when the job arrived on the engine's clock (default: now; replays)."""
        ids = torch.as_tensor(input_ids)
        ids = ids[None] if ids.dim() == 1 else ids
        if answer is not None:
            answer = torch.as_tensor(answer)
            answer = answer[None] if answer.dim() == 1 else answer
        job = Job(conv_id, ids, int(max_new_tokens), answer, gen_kwargs)
        job.submitted = self.clock() if submitted is None else float(submitted)
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine is closed")
            self._queue.append(job)
            self._cv.notify()
        if self._policy is not None:
            self._policy.on_submit(conv_id, job.submitted)
        return job

    def queued_conversations(self) -> list[str]:
        with self._cv:
            return [j.conv_id for j in self._queue]

    def prefetch_window(self) -> int:
        """L_pw = C_mem / S_kv: how many queued jobs' conversations host memory can hold."""
        return fetching.window_size(self._host_cap, self.store.mean_conversation_bytes())

    def disk_window(self) -> int:
        """(C_mem + C_disk) / S_kv: queued jobs whose KV is never dropped from disk."""
        return fetching.window_size(self._host_cap + self._disk_cap, self.store.mean_conversation_bytes())

    # ---- the worker -------------------------------------------------------------

    def step(self) -> Job | None:
        """Runs the next queued job to its end; None when the queue is empty."""
        with self._cv:
            if not self._queue:
                return None
            job = self._queue.popleft()
        self._pending_prefetch = []
        if self.prefetch and self.save:
            window = self.queued_conversations()[: self.prefetch_window()]
            need = (job.input_ids.shape[1] + (0 if job.answer is None else job.answer.shape[1])) * self._bytes_per_token
            self._best_effort("prefetching", lambda: self._pending_prefetch.extend(
                fetching.prefetch_window(self.store, window, job.conv_id, need)))
        self._execute(job)
        if hasattr(self.clock, "charge"):
            self.clock.charge(job)
        job.finished = self.clock()
        if self._policy is not None:
            self._policy.on_finish(job.conv_id, job.finished, job.answer_tokens)
        if self.save and self.reserve:
            self._best_effort("keeping the reserve free",
                              lambda: self.store.make_host_room(int(self.reserve * self._host_cap)))
        return job

    @staticmethod
    def _best_effort(what: str, fn) -> None:
        """Prefetching and demoting ahead of time are optimisations: a failure is logged, not fatal to a job."""
        try:
            fn()
        except Exception as e:  # e.g. the disk failed or host memory is held by open loads
            log.warning("cachedattn: %s failed (%s); the jobs go on without it", what, e)

    def wait_background_io(self) -> None:
        """Waits for prefetches and disk writes started so far (a virtual clock's idea of time passing)."""
        for f in self._pending_prefetch:
            f.exception()
        self.store.flush()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
            self.step()

    def _read_ahead(self, current: Job) -> None:
        """Read buffer: while `current` decodes, bring the next job's disk-resident KV into host memory."""
        with self._cv:
            nxt = next((j for j in self._queue if j.conv_id != current.conv_id), None)
        if nxt is not None:
            self._best_effort("reading ahead", lambda: self._pending_prefetch.extend(
                fetching.prefetch_window(self.store, [nxt.conv_id], current.conv_id, 0)))

    def _execute(self, job: Job) -> None:
        job.started = self.clock()
        reserve = 0 if job.answer is None else job.answer.shape[1]
        ids = job.input_ids.to(self._device)
        try:
            with torch.no_grad(), cachedattn.session(
                self.model, job.conv_id, save=self.save, reserve=reserve, layerwise=self.layerwise
            ) as s:
                if self.read_buffer and self.save:
                    s.on_first_token = lambda: self._read_ahead(job)
                if job.answer is None:
                    out = self.model.generate(ids, max_new_tokens=job.max_new_tokens, **job.gen_kwargs)
                    out = getattr(out, "sequences", out)
                    job.answer_tokens = s.generated_tokens
                else:
                    self.model(ids, **self._fwd_kwargs)
                    kept = s.turn_ids[None]
                    if self.save:
                        s.continue_turn(job.answer.to(self._device), **self._fwd_kwargs)
                    out = torch.cat([kept.cpu(), job.answer.cpu()], 1)
                    job.answer_tokens = job.answer.shape[1]
        except BaseException as e:
            job.future.set_exception(e)
            return
        job.ttft, job.reused_tokens, job.computed_tokens = s.ttft, s.reused_tokens, s.computed_tokens
        job.dropped_tokens, job.tier_tokens = s.dropped_tokens, dict(s.tier_tokens)
        job.prompt_tokens = s.reused_tokens + s.computed_tokens
        job.future.set_result(out.cpu())

    def close(self) -> None:
        """Finishes the queued jobs (a background worker), then stops."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
