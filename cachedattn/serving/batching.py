"""Which queued jobs run together: the engine's batch formation (static batching,
see cachedattn.serving.engine's docstring for why joining a running batch is not done).

A batch is the head of the queue plus the jobs right behind it that may join
(FCFS: none jumps the queue): the same kind of job (all fed answers, or all
generating with the same options), one conversation at most once, within
max_batch, max_batch_tokens and host memory. Jobs that cannot batch at all
run alone, the reason logged once.

A job's own hooks (ROW_HOOKS: its streamer, stopping criteria and logits
processors) and its max_new_tokens are its row's, not the batch's: jobs that
differ only in those share a batch (cachedattn.hf.batch_rows).
"""

from __future__ import annotations

import logging
from collections import deque

from cachedattn.hf.batch import ALLOWED as BATCH_OPTIONS
from cachedattn.serving.job import Job
from cachedattn.store.spec import ChunkGeometry

log = logging.getLogger("cachedattn")
# generate() options that belong to one job, served per row in a batch (the BatchSession argument each goes to).
ROW_HOOKS = {"streamer": "row_streamers", "stopping_criteria": "row_stopping_criteria",
             "logits_processor": "row_logits_processors"}


def shared_options(job: Job) -> dict:
    """The job's generate() options that its batch shares (all but its row hooks)."""
    return {k: v for k, v in job.gen_kwargs.items() if k not in ROW_HOOKS}


def job_tokens(job: Job) -> int:
    """Tokens the job's turn holds at its end: prompt plus answer (or its bound)."""
    return job.input_ids.shape[1] + (job.max_new_tokens if job.answer is None else job.answer.shape[1])


def same_kind(a: Job, b: Job) -> bool:
    """b may share a's batch: both fed answers, or both generating with the same options."""
    if (a.answer is None) != (b.answer is None):
        return False
    if a.answer is not None:
        return True
    if (a.max_new_tokens == 0) != (b.max_new_tokens == 0):  # each row stops at its own bound, from 1 up
        return False
    oa, ob = shared_options(a), shared_options(b)
    if set(oa) != set(ob):
        return False
    try:
        return all(bool(oa[k] == ob[k]) for k in oa)
    except Exception:  # e.g. tensors of different shapes: not the same options
        return False


class BatchFormer:
    def __init__(self, model, store, max_batch: int, max_batch_tokens: int | None):
        self.model, self.store = model, store
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        # Why this model's jobs never batch (None: they may), and the reasons already logged.
        self._model_solo = None
        if any(w is not None for w in model._cachedattn.kv.sliding):
            self._model_solo = ("the model has sliding-window layers (the padding holes of a batch would shorten "
                                "the window per row: not exact)")
        self._logged: set[str] = set()
        self._block_bytes: int | None = None

    def solo_reason(self, job: Job) -> str | None:
        """Why this job cannot run in a batch (None: it can)."""
        if self._model_solo is not None:
            return self._model_solo
        limit = self.model._cachedattn.options["max_context"]
        if limit is not None and job_tokens(job) > limit:
            return "a turn overflows max_context (batches do not truncate: the session alone does)"
        if job.answer is not None:
            return None  # fed answers: no decoding options apply
        unknown = sorted(set(shared_options(job)) - BATCH_OPTIONS)
        if unknown:
            return f"generate options {unknown} are not served in batches"
        if job.gen_kwargs.get("do_sample", self.model.generation_config.do_sample):
            return ("sampling: a batch draws every row from one random stream, so a job's answer would depend on "
                    "its batch-mates")
        return None

    def host_need(self, job: Job) -> int:
        """Host bytes a running row holds: its history's blocks (the open load) and its new chunks (the
        append): the turn's tokens in whole chunks, plus the partial chunk both share (copied on write)."""
        chunk = self.store.config.chunk_tokens
        if self._block_bytes is None:  # the store's chunk block for this model (it is attached by now)
            self._block_bytes = ChunkGeometry(self.store.spec, chunk).block_bytes
        return (-(-job_tokens(job) // chunk) + 1) * self._block_bytes

    def take(self, queue: deque, host_cap: int | None) -> list[Job]:
        """Pops the next batch from a non-empty queue (the caller holds its lock): the head job,
        then the jobs right behind it while they may join; the first that may not ends the batch.
        `host_cap`: host bytes the running rows may hold (None: they hold none, nothing is saved)."""
        first = queue.popleft()
        batch = [first]
        if self.max_batch == 1:
            return batch
        why = self.solo_reason(first)
        if why is not None:
            self._note(why)
            return batch
        tokens, host = job_tokens(first), self.host_need(first)
        convs = {first.conv_id}
        while queue and len(batch) < self.max_batch:
            job = queue[0]
            if job.conv_id in convs or not same_kind(first, job) or self.solo_reason(job) is not None:
                break
            t, h = job_tokens(job), self.host_need(job)
            if self.max_batch_tokens is not None and tokens + t > self.max_batch_tokens:
                break
            if host_cap is not None and host + h > host_cap:
                break
            batch.append(queue.popleft())
            convs.add(job.conv_id)
            tokens, host = tokens + t, host + h
        return batch

    def _note(self, why: str) -> None:
        if why not in self._logged:
            self._logged.add(why)
            log.warning("cachedattn: max_batch=%d, but some jobs run one at a time: %s (logged once)",
                        self.max_batch, why)
