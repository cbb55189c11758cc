"""Job: one turn of one conversation, queued in the engine."""

from __future__ import annotations

from concurrent.futures import Future

import torch


class Job:
    """Timings are in seconds of the engine's clock (submitted, started, finished)
    and of the wall clock (ttft: from the start of the turn to its first token,
    loading included)."""

    def __init__(self, conv_id: str, input_ids: torch.Tensor, max_new_tokens: int, answer, gen_kwargs: dict):
        self.conv_id = conv_id
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.answer = answer  # [1, n] ids fed as the answer instead of generating (replays), or None
        self.gen_kwargs = gen_kwargs
        self.future: Future = Future()
        self.submitted: float | None = None
        self.started: float | None = None
        self.finished: float | None = None
        self.ttft: float | None = None
        self.prompt_tokens = 0  # tokens of the prompt after any overflow truncation
        self.reused_tokens = 0
        self.computed_tokens = 0
        self.dropped_tokens = 0
        self.answer_tokens = 0
        self.tier_tokens = {"host": 0, "disk": 0}  # where the reused tokens came from
        self.service_time: float | None = None  # set by a virtual clock: the modelled time the job took
        self.modelled_prefill: float | None = None  # the prefill part of it (a batch's: this job's share)
        self.batch_id = 0  # which step of the engine ran it (jobs of one batch share it)
        self.batch_size = 1  # jobs in that batch
        self.run_seconds: float | None = None  # measured wall time of the run that served it (its whole batch's)

    @property
    def tier_hits(self) -> dict[str, int]:
        """Reused tokens per tier (the same as tier_tokens)."""
        return self.tier_tokens

    def result(self, timeout: float | None = None) -> torch.Tensor:
        """The sequence after the turn (the kept window plus the answer), as [1, tokens] on the CPU;
        raises what the turn raised if it failed. Timings are set by the time it returns."""
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    def __repr__(self) -> str:
        return f"Job({self.conv_id!r}, prompt={self.input_ids.shape[1]}, reused={self.reused_tokens})"
