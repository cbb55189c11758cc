"""Per-row hooks of a batched generate (cachedattn.hf.batch): each row's own streamer,
stopping criteria, logits processors and answer bound, as a conversation alone has them.

generate() takes one streamer, one stopping-criteria list and one logits-processor list
for the whole batch. `RowHooks` is all three at once and hands each row only what is its
own:
- as the stopping criterion it decides, per row and per step, whether the row has finished
  (its eos token, its own max_new_tokens, or its own criteria) and returns a [batch] bool
  tensor True for exactly those rows: generate's per-row `unfinished_sequences` then
  stops them while the others go on;
- as the streamer it gives each row's streamer that row's prompt first (generate does so
  for a batch of one), then each of its new tokens as a 1-element tensor, then end()
  once the row has finished;
- as a logits processor (`processor`) it runs each unfinished row's processors on that
  row's scores alone ([1, vocab]).

What a row's criteria and processors see as input_ids is the conversation's own ids
(its full prompt, then its tokens so far), without the batch's padding holes: what they
see when the conversation runs alone.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, StoppingCriteria


def _per_row(name: str, value, rows: int) -> list:
    """None (no row has one) or a list with one entry per row (None: that row has none);
    a criterion / processor entry may be one callable or a list of them."""
    if value is None:
        return [None] * rows
    if not isinstance(value, (list, tuple)) or len(value) != rows:
        raise ValueError(f"{name} must be a list with one entry per row ({rows}), None where a row has none")
    return list(value)


def _callables(name: str, entry) -> list:
    if entry is None:
        return []
    fns = list(entry) if isinstance(entry, (list, tuple)) else [entry]
    for f in fns:
        if not callable(f):
            raise ValueError(f"{name}: {type(f).__name__} is not callable")
    return fns


class RowHooks(StoppingCriteria):
    def __init__(self, prompts: list[torch.Tensor], start: int, bounds: list[float], eos: set[int],
                 streamers=None, stopping_criteria=None, logits_processors=None):
        n = len(prompts)
        self.prompts, self.start, self.bounds, self.eos = prompts, start, bounds, eos
        self.streamers = _per_row("row_streamers", streamers, n)
        for s in self.streamers:
            if s is not None and not (callable(getattr(s, "put", None)) and callable(getattr(s, "end", None))):
                raise ValueError(f"row_streamers: {type(s).__name__} has no put() and end()")
        self.criteria = [_callables("row_stopping_criteria", c) for c in _per_row("row_stopping_criteria",
                                                                                   stopping_criteria, n)]
        self.processors = [_callables("row_logits_processors", p) for p in _per_row("row_logits_processors",
                                                                                     logits_processors, n)]
        self.done: list[int | None] = [None] * n  # generated tokens when row r finished
        self.streamed = [False] * n  # a row's streamer has had a generated token (its client saw output)
        self._ended = [False] * n
        self._prompt_put = False
        self._puts = 0

    def has_row_hooks(self) -> bool:
        return any(s is not None for s in self.streamers) or any(self.criteria) or any(self.processors)

    def row_ids(self, input_ids: torch.Tensor, r: int) -> torch.Tensor:
        """Row r's ids as its conversation alone has them: prompt, then the tokens generated so far."""
        return torch.cat([self.prompts[r].to(input_ids.device), input_ids[r, self.start:]])[None]

    # ---- stopping criterion ----------------------------------------------------------

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        step = input_ids.shape[1] - self.start  # tokens generated so far
        last = input_ids[:, -1].tolist()
        stop = []
        for r, done in enumerate(self.done):
            if done is None:
                finished = last[r] in self.eos or step >= self.bounds[r]
                if not finished and self.criteria[r]:
                    ids = self.row_ids(input_ids, r)
                    row_scores = scores[r : r + 1] if isinstance(scores, torch.Tensor) else scores
                    finished = any(bool(torch.as_tensor(c(ids, row_scores, **kwargs)).any()) for c in self.criteria[r])
                if finished:
                    self.done[r] = step
            stop.append(self.done[r] is not None)
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

    # ---- streamer -------------------------------------------------------------------

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_put:  # generate() puts the (padded) prompt first: each row gets its own
            self._prompt_put = True
            for s, p in zip(self.streamers, self.prompts):
                if s is not None:
                    s.put(p[None].cpu())
            return
        self._puts += 1
        step, tokens = self._puts, value.reshape(-1)
        for r, s in enumerate(self.streamers):
            if self._ended[r]:
                continue
            done = self.done[r]
            if done is not None and step > done:  # generate checked stops after putting (older versions)
                self._end(r)
                continue
            if s is not None:
                s.put(tokens[r : r + 1].clone())
                self.streamed[r] = True
            if done == step:
                self._end(r)

    def end(self) -> None:
        for r in range(len(self._ended)):
            if not self._ended[r]:
                self._end(r)

    def _end(self, r: int) -> None:
        self._ended[r] = True
        if self.streamers[r] is not None:
            self.streamers[r].end()

    # ---- logits processor -----------------------------------------------------------

    def processor(self) -> LogitsProcessor:
        return _RowProcessors(self)


class _RowProcessors(LogitsProcessor):
    """Each unfinished row's own processors on its own scores (a finished row's token is discarded)."""

    def __init__(self, hooks: RowHooks):
        self.hooks = hooks

    def __call__(self, input_ids, scores):
        h = self.hooks
        if not any(h.processors):
            return scores
        rows = list(scores.split(1))
        for r, procs in enumerate(h.processors):
            if procs and h.done[r] is None:
                ids = h.row_ids(input_ids, r)
                for p in procs:
                    rows[r] = p(ids, rows[r])
        return torch.cat(rows)
