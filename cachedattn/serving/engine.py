"""Engine: a FCFS job queue and a worker running turns through a patched model.

submit() returns at once; jobs run in arrival order, one at a time by default
(max_batch=1). Around each job (or batch) the engine drives the store from the queue:

    step():
        batch = the next job, plus (max_batch > 1) the jobs behind it that may join
        prefetch the look-ahead window's disk-resident KV      (fetching.py)
            the window starts after the running batch
        run the batch: prefill, then the answers;
            while it decodes, pre-load the next job's KV         (read buffer)
        keep `reserve` of host memory free for the next job     (policy order)

Batching is static: a batch is formed from the head of the queue, runs to its
end (every row's last token), and only then is the next batch formed; a job
arriving meanwhile waits for the whole batch. Joining a running batch
(continuous batching) is not done because it is not exact here: the running
batch is one left-padded DynamicCache whose rows all share the current column,
so a joiner's history and prompt would have to be placed in that layout
mid-decode: re-laying out (copying) every row's cache to open the joiner's
columns, or recomputing the batch; neither keeps the rows' KV and positions as
the conversation alone computes them at no cost. A batch of one runs exactly
as max_batch=1 (layer-wise loading, overflow truncation).

Which jobs may join a batch, and which always run alone (the reason logged
once): cachedattn/serving/batching.py. A job's streamer, stopping criteria,
logits processors and max_new_tokens are its row's own in the batch
(cachedattn/hf/batch_rows.py): each row streams its tokens and ends on its own
eos, bound or criteria while the others go on; the batch ends with its last row.
A failed batch runs its jobs again one at a time, except a job whose streamer
already had tokens (its client saw them): it fails. While a batch runs, every row's
conversation is in use (its history's load stays open), so the store never
evicts a running job's chunks.

A background worker calls step() as jobs come (background=True), or the
caller does (background=False: replays driving a virtual clock).
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import itertools
import threading
import time
from collections import deque

import torch

import cachedattn
from cachedattn.hf.batch import BatchSession
from cachedattn.serving import fetching
from cachedattn.serving.batching import ROW_HOOKS, BatchFormer, job_tokens, shared_options
from cachedattn.serving.job import Job
from cachedattn.serving.policies import QueueAwarePolicy, QueueView
from cachedattn.store import lock_order
from cachedattn.store.keys import validate_conversation_id

log = logging.getLogger("cachedattn")


def _token_ids(name: str, value) -> torch.Tensor:
    """A non-empty 1-D or [1, n] tensor of integer token ids, as [1, n]."""
    try:
        ids = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a tensor or a sequence of token ids, got {type(value).__name__} ({e})") from None
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"{name} must be 1-D or [1, n] (one conversation per job), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} must not be empty")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    return ids


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _batch_option(name: str, value, allow_none: bool = False) -> int | None:
    """max_batch / max_batch_tokens: an int >= 1 (or None where allowed), else ValueError naming it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _time(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds on the engine's clock, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    return float(value)


class Engine:
    """Options: ``prefetch`` (scheduler-aware fetching), ``read_buffer`` (pre-load
    the next job while this one decodes), ``layerwise`` (False: load all history,
    then compute), ``save`` (False: store nothing, i.e. recompute every turn),
    ``reserve`` (fraction of host memory kept free after each job), ``clock``
    (a callable; one with a ``charge(job)`` method is a virtual clock, advanced
    by it after each job, and by ``charge_batch(jobs)`` after a batch where it
    has one), ``background`` (run a worker thread), ``max_batch`` (jobs run
    together, static batching: see the module docstring; 1 = one at a time),
    ``max_batch_tokens`` (cap on a batch's prompt + answer tokens; None: no cap)."""

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
        max_batch: int = 1,
        max_batch_tokens: int | None = None,
        **patch_options,
    ):
        if not 0 <= reserve < 1:
            raise ValueError(f"reserve must be a fraction of host memory in [0, 1), got {reserve!r}")
        # Checked before the model is patched: a refused engine leaves nothing behind.
        self.max_batch = _batch_option("max_batch", max_batch)
        self.max_batch_tokens = _batch_option("max_batch_tokens", max_batch_tokens, allow_none=True)
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
        if self._policy is None and save:
            log.info("cachedattn: the store evicts by %r, blind to the queue; eviction='queue' lets the queue decide",
                     store.policy.name)
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition(lock_order.ordered(threading.Lock(), lock_order.ENGINE, "engine queue"))
        self._views = itertools.count(1)  # orders the queue views pushed into the policy (under _cv)
        self._stop = False
        # A server needs only the last position's logits (generate() does the same).
        self._device = next(model.parameters()).device
        self._fwd_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self._pending_prefetch: list = []
        self._former = BatchFormer(model, store, self.max_batch, self.max_batch_tokens)
        self._batches = 0
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
        ``submitted``: when the job arrived on the engine's clock (default: now; replays).
        Bad arguments raise here (TypeError / ValueError); ``gen_kwargs`` go to generate() as they are,
        and what it rejects fails that job alone."""
        validate_conversation_id(conv_id)
        ids = _token_ids("input_ids", input_ids)
        max_new_tokens = _count("max_new_tokens", max_new_tokens)
        if answer is not None:
            answer = _token_ids("answer", answer)
        if submitted is not None:
            submitted = _time("submitted", submitted)
        job = Job(conv_id, ids, max_new_tokens, answer, gen_kwargs)
        job.submitted = self.clock() if submitted is None else submitted
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine is closed")
            self._queue.append(job)
            self._cv.notify()
        problems: list[str] = []
        self._best_effort(problems, "telling the policy of the queue", self._push_queue_view)
        if self._policy is not None:
            self._best_effort(problems, "telling the policy of the job",
                              lambda: self._policy.on_submit(conv_id, job.submitted))
        self._log_problems(job, problems)
        return job

    def _push_queue_view(self) -> None:
        """Tells the store's policy what is queued (after each submit and each start). Taken under
        the queue's lock, pushed without it: the policy never calls the engine, and nothing of the
        engine is locked while the store's lock is taken (the windows ask the store)."""
        with self._cv:
            seq, queued = next(self._views), tuple(j.conv_id for j in self._queue)
        view = QueueView(queued, self.disk_window(), self.clock, seq)
        self.store.policy.on_queue(view)

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
        """Runs the next queued job (with max_batch > 1: the next batch) to its end; returns
        that job (the batch's first), None when the queue is empty. A job that fails fails
        alone: its future holds the exception and the queue goes on; the optimisations
        around it (prefetch, read buffer, reserve, policy and clock hooks) are best effort."""
        batch = self.step_batch()
        return batch[0] if batch else None

    def step_batch(self) -> list[Job]:
        """Runs the next batch (one job with max_batch=1) to its end; returns its jobs, [] when
        the queue is empty."""
        with self._cv:
            if not self._queue:
                return []
            batch = self._former.take(self._queue, self._host_cap if self.save else None)
        self._best_effort([], "telling the policy of the queue", self._push_queue_view)
        self._batches += 1
        if len(batch) == 1:
            self._run_one(batch[0])
        else:
            self._run_batch(batch)
        with self._cv:
            idle = not self._queue
        if idle:
            self._release_staging()
        return batch

    def _release_staging(self) -> None:
        """The queue ran dry: the GPU staging buffers no load holds go back to the allocator
        (the next turn allocates what it needs; a read buffer still filled keeps its own)."""
        state = getattr(self.model, "_cachedattn", None)
        if state is not None:
            try:
                state.path.trim()
            except Exception as e:  # bookkeeping, never the job's failure
                log.warning("cachedattn: freeing idle GPU staging failed (%s: %s)", type(e).__name__, e)

    def _run_one(self, job: Job) -> None:
        """One job alone: exactly the engine's behaviour before batching existed."""
        job.batch_id, job.batch_size = self._batches, 1
        problems: list[str] = []
        out = error = None
        try:
            self._pending_prefetch = []
            if self.prefetch and self.save:
                self._best_effort(problems, "prefetching", lambda: self._prefetch_for(job))
            try:
                out = self._execute(job, problems)
            except BaseException as e:  # the job's own failure: its caller gets it from the future
                error = e
            if hasattr(self.clock, "charge"):
                self._best_effort(problems, "charging the clock", lambda: self.clock.charge(job))
            self._best_effort(problems, "reading the clock", lambda: setattr(job, "finished", self.clock()))
            if self._policy is not None:
                self._best_effort(problems, "telling the policy the job ended",
                                  lambda: self._policy.on_finish(job.conv_id, job.finished, job.answer_tokens))
            if self.save and self.reserve:
                self._best_effort(problems, "keeping the reserve free",
                                  lambda: self.store.make_host_room(int(self.reserve * self._host_cap)))
        except BaseException as e:  # a failure of the engine itself around this job: it too ends only this job
            error = error or e
        finally:
            if error is not None:
                problems.insert(0, f"the job failed ({type(error).__name__}: {error})")
            self._log_problems(job, problems)
            # Completed last, so whoever waits on the job sees its timings set.
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(out)
        if error is not None and not isinstance(error, Exception) and threading.current_thread() is not self._worker:
            raise error  # Ctrl-C (or an exit) of whoever steps the engine: theirs to see, not only the job's

    # ---- batches ----------------------------------------------------------------

    def _run_batch(self, batch: list[Job]) -> None:
        """Runs a batch of two or more jobs through a BatchSession. If the batch itself fails,
        its jobs run again one at a time, so that a job that fails fails alone."""
        problems: list[str] = []
        outs = error = None
        streamed: list[bool] = [False] * len(batch)
        try:
            self._pending_prefetch = []
            if self.prefetch and self.save:
                self._best_effort(problems, "prefetching", lambda: self._prefetch_for(batch))
            try:
                outs = self._execute_batch(batch, problems, streamed)
            except Exception as e:  # an input or state the batch cannot serve: each job alone says which
                log.warning("cachedattn: a batch of %d jobs failed (%s: %s); its jobs run one at a time",
                            len(batch), type(e).__name__, e)
                failed = e
            if outs is None:
                self._log_problems(batch[0], problems)
                for job, seen in zip(batch, streamed):
                    if seen:  # its streamer has had tokens: running it again would stream them twice
                        job.batch_id, job.batch_size = self._batches, len(batch)
                        job.future.set_exception(failed)
                    else:
                        self._run_one(job)
                return
            if hasattr(self.clock, "charge_batch"):
                self._best_effort(problems, "charging the clock", lambda: self.clock.charge_batch(batch))
            elif hasattr(self.clock, "charge"):
                self._best_effort(problems, "charging the clock", lambda: [self.clock.charge(j) for j in batch])
            self._best_effort(problems, "reading the clock",
                              lambda: [setattr(j, "finished", self.clock()) for j in batch])
            if self._policy is not None:
                for j in batch:
                    self._best_effort(problems, "telling the policy the job ended",
                                      lambda j=j: self._policy.on_finish(j.conv_id, j.finished, j.answer_tokens))
            if self.save and self.reserve:
                self._best_effort(problems, "keeping the reserve free",
                                  lambda: self.store.make_host_room(int(self.reserve * self._host_cap)))
        except BaseException as e:  # Ctrl-C, or the engine failing around the batch: it ends these jobs
            error = e
        finally:
            if outs is not None or error is not None:
                if error is not None:
                    problems.insert(0, f"the batch failed ({type(error).__name__}: {error})")
                for job in batch:
                    if job.future.done():  # served alone already (the fallback) before the error
                        continue
                    self._log_problems(job, problems)
                    problems = []  # the batch's problems once, on its first job
                    if error is not None:
                        job.future.set_exception(error)
                    else:
                        job.future.set_result(outs[job])
        if error is not None and not isinstance(error, Exception) and threading.current_thread() is not self._worker:
            raise error

    def _execute_batch(self, batch: list[Job], problems: list[str], streamed: list[bool]) -> dict:
        """Runs the batch; returns {job: sequence after its turn ([1, n], CPU)}. Raises what the batch raises;
        `streamed[i]` then says whether job i's streamer had tokens before it failed."""
        started = self.clock()
        t0 = time.perf_counter()
        ids = [j.input_ids[0].to(self._device) for j in batch]
        with torch.no_grad():
            bs = BatchSession(self.model, [j.conv_id for j in batch], save=self.save)
            if self.read_buffer and self.save:
                bs.on_first_token = lambda: self._read_ahead(batch, problems)
            if batch[0].answer is None:
                hooks = {arg: [j.gen_kwargs.get(k) for j in batch] for k, arg in ROW_HOOKS.items()}
                bounds = [j.max_new_tokens for j in batch]
                try:
                    res = bs.generate(ids, max_new_tokens=bounds if min(bounds) else 0, **hooks,
                                      **shared_options(batch[0]))
                finally:
                    streamed[:] = bs.streamed
                gens = res.rows if hasattr(res, "rows") else res
                seqs = [torch.cat([x, g.to(x.device)]).cpu() for x, g in zip(ids, gens)]
                answers = [g.numel() for g in gens]
            else:
                _, seqs = bs.forward_turns(ids, [j.answer[0].to(self._device) for j in batch])
                answers = [j.answer.shape[1] for j in batch]
        run = time.perf_counter() - t0
        outs = {}
        for j, row, seq, a in zip(batch, bs.rows, seqs, answers):
            j.started, j.run_seconds, j.batch_id, j.batch_size = started, run, self._batches, len(batch)
            j.ttft, j.reused_tokens, j.computed_tokens = row.ttft, row.reused_tokens, row.computed_tokens
            j.dropped_tokens, j.tier_tokens = 0, dict(row.tier_tokens)
            j.prompt_tokens, j.answer_tokens = row.reused_tokens + row.computed_tokens, a
            outs[j] = seq[None]
        return outs

    def _prefetch_for(self, running: Job | list[Job]) -> None:
        """Starts the look-ahead window's prefetches, leaving room for what the running job(s) need.
        The window is the queue as it is: the running batch has left it, so it starts after it."""
        running = [running] if isinstance(running, Job) else running
        window = self.queued_conversations()[: self.prefetch_window()]
        need = sum(job_tokens(j) if j.answer is not None else j.input_ids.shape[1] for j in running)
        convs = [j.conv_id for j in running]
        with self._cv:  # the remote tier is found by tokens: the window's prompts (cachedattn/store/remote_sync.py)
            prompts = [(j.conv_id, j.input_ids[0]) for j in self._queue][: len(window)]
        self._pending_prefetch.extend(fetching.prefetch_remote(self.store, prompts, convs))
        self._pending_prefetch.extend(fetching.prefetch_window(self.store, window, convs, need * self._bytes_per_token))

    @staticmethod
    def _best_effort(problems: list[str], what: str, fn) -> None:
        """Prefetching, demoting and bookkeeping are not the job: a failure is noted, never fatal to it."""
        try:
            return fn()
        except Exception as e:  # e.g. the disk failed or host memory is held by open loads
            problems.append(f"{what} failed ({type(e).__name__}: {e})")
            return None

    @staticmethod
    def _log_problems(job: Job, problems: list[str]) -> None:
        """One line per job, whatever went wrong around it."""
        if problems:
            log.warning("cachedattn: job of %r: %s; the queue goes on", job.conv_id, "; ".join(problems))

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
            try:
                self.step()
            except BaseException:  # step() completes its job whatever happens; the worker must outlive it anyway
                log.exception("cachedattn: the engine's worker caught an error; it goes on")

    def _read_ahead(self, current: Job | list[Job], problems: list[str]) -> None:
        """Read buffer: while `current` (a job or a batch) decodes, bring the next job's first layers
        onto the GPU (a model with a copy engine), else its disk-resident KV into host memory."""
        running = [current.conv_id] if isinstance(current, Job) else [j.conv_id for j in current]
        with self._cv:
            nxt = next((j for j in self._queue if j.conv_id not in running), None)
        from cachedattn.hf.patch import preload

        if nxt is not None and not self._best_effort(problems, "reading ahead to the GPU", lambda: preload(
                self.model, nxt.conv_id, nxt.input_ids)):  # with a copy engine: its first layers onto the GPU
            self._best_effort(problems, "reading ahead", lambda: self._pending_prefetch.extend(
                fetching.prefetch_window(self.store, [nxt.conv_id], running, 0)))

    def _execute(self, job: Job, problems: list[str]) -> torch.Tensor:
        """Runs the turn; returns the sequence after it (CPU). Raises what the turn raises."""
        job.started = self.clock()
        t0 = time.perf_counter()
        reserve = 0 if job.answer is None else job.answer.shape[1]
        ids = job.input_ids.to(self._device)
        with torch.no_grad(), cachedattn.session(
            self.model, job.conv_id, save=self.save, reserve=reserve, layerwise=self.layerwise
        ) as s:
            if self.read_buffer and self.save:
                s.on_first_token = lambda: self._read_ahead(job, problems)
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
        job.ttft, job.reused_tokens, job.computed_tokens = s.ttft, s.reused_tokens, s.computed_tokens
        job.dropped_tokens, job.tier_tokens = s.dropped_tokens, dict(s.tier_tokens)
        job.prompt_tokens = s.reused_tokens + s.computed_tokens
        job.run_seconds = time.perf_counter() - t0
        return out.cpu()

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
