"""One request through the engine: the job's generate() arguments (sampling,
a streamer, a cancel flag as a stopping criterion) and the text the client sees
(incremental detokenisation, stop strings).

The engine runs generate() on its own thread; the Run hands each new token to
the request's event loop. A client that goes away sets the cancel flag: the
next decoding step stops, and the session stores the KV computed so far, as
for any turn that ends."""

from __future__ import annotations

import asyncio
import random
import threading

import torch


class Sampler:
    """Temperature, top-k and top-p sampling with the request's own seeded generator, as
    a logits processor that leaves only the sampled token (generate() then picks
    it greedily): no global RNG, so concurrent requests and `seed` are reproducible."""

    def __init__(self, temperature: float, top_p: float, seed: int | None, top_k: int = 0):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.generator = torch.Generator().manual_seed(random.getrandbits(63) if seed is None else seed)

    def __call__(self, input_ids, scores):
        # Shift to max 0 before dividing: a tiny temperature (1e-320) or huge logits then give -inf, never
        # inf - inf = NaN; the best token keeps logit 0, so sampling tends to greedy as it should.
        logits = scores.double().cpu()  # float64: a temperature of 1e-320 is 0 in float32
        logits = (logits - logits.max(-1, keepdim=True).values) / self.temperature
        if 0 < self.top_k < logits.shape[-1]:  # vLLM's top_k: -1 and 0 keep every token
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            # Keep the smallest set of tokens whose probability reaches top_p (the first always).
            drop = probs.cumsum(-1) - probs >= self.top_p
            sorted_logits[drop] = float("-inf")
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        token = torch.multinomial(logits.softmax(-1), 1, generator=self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, token.to(scores.device), 0.0)


class Run:
    """The engine-side hooks of one request: streamer (put/end), stopping criterion
    (the cancel flag) and completion, each posted to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.job = None
        self._prompt_seen = False

    def _post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is gone, nobody listens
            pass

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first hands the streamer the prompt
            self._prompt_seen = True
            return
        self._post(("tokens", value.reshape(-1).tolist()))

    def end(self) -> None:
        """generate() ends here; the request learns the end from the job's future (job_done),
        which also carries an error, so nothing is posted twice."""

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    def job_done(self, _future) -> None:
        self._post(("done", None))

    def gen_kwargs(self, sampler: Sampler | None, eos_token_id: int | list[int] | None,
                   pad_token_id: int | None) -> dict:
        kw = dict(do_sample=False, streamer=self, stopping_criteria=[self],
                  logits_processor=[sampler] if sampler else [])
        if eos_token_id is not None:
            kw["eos_token_id"] = eos_token_id
        if pad_token_id is not None:
            kw["pad_token_id"] = pad_token_id
        return kw


class TextStream:
    """Generated ids to the text the client sees: text is released only when it
    cannot change (no trailing partial UTF-8 character, no tail that may begin a
    stop string); a stop string ends the text before it."""

    def __init__(self, decode, stops: list[str]):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            return self._release(len(self.text))
        self.text = text
        base = len(text.rstrip("\ufffd"))
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, base), 0, -1):
                if text[base - k:base] == s[:k]:
                    hold = max(hold, k)
                    break
        return self._release(base - hold)

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
