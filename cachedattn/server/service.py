"""The serving state behind the routes: model, store, engine, tokenizer,
conversation index, limits; one turn from prompt ids to answer; shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from cachedattn.server.errors import APIError, bad_request
from cachedattn.server.generation import Run, Sampler, TextStream
from cachedattn.server.identity import Conversations
from cachedattn.server.metrics import Metrics

log = logging.getLogger("cachedattn")
DISCONNECT_POLL_S = 0.5  # how often a request that does not stream checks that its client is still there


@dataclass
class Turn:
    """A request, ready for the engine."""
    conv_id: str
    prompt_text: str
    ids: list[int]
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stops: list[str]
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Answer:
    text: str
    finish_reason: str
    usage: dict


class Server:
    def __init__(self, model, store, engine, tokenizer, model_name: str, max_model_len: int, max_queue: int = 64,
                 default_max_tokens: int = 256):
        self.model, self.store, self.engine, self.tokenizer = model, store, engine, tokenizer
        self.model_name, self.max_model_len = model_name, max_model_len
        self.max_queue, self.default_max_tokens = max_queue, default_max_tokens
        self.conversations = Conversations()
        self.metrics = Metrics(store)
        self.pad_token_id = getattr(model.generation_config, "pad_token_id", None)
        if self.pad_token_id is None:
            self.pad_token_id = tokenizer.eos_token_id
        # The model's end tokens (a list for some chat models: end of text, end of turn) and the tokenizer's.
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self._runs: set[Run] = set()
        self._lock = threading.Lock()
        self.closing = False

    # ---- admission --------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def max_new_tokens(self, prompt_len: int, asked: int | None) -> int:
        room = self.max_model_len - prompt_len
        if room < 1 or (asked is not None and asked > room):
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + (asked or 1)} tokens ({prompt_len} in the messages, {asked or 1} in the completion). "
                "Please reduce the length of the messages or completion.", "messages", "context_length_exceeded")
        return asked if asked is not None else min(self.default_max_tokens, room)

    # ---- one turn ---------------------------------------------------------------

    def start(self, turn: Turn) -> Run:
        """Queues the turn in the engine; 503 when the queue is full or the server is stopping."""
        max_new = self.max_new_tokens(len(turn.ids), turn.max_tokens)
        turn.max_tokens = max_new
        run = Run(asyncio.get_running_loop())
        sampler = Sampler(turn.temperature, turn.top_p, turn.seed, turn.top_k) if turn.temperature > 0 else None
        with self._lock:
            if self.closing:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._runs) >= self.max_queue:
                raise APIError(503, f"the server is overloaded ({len(self._runs)} requests in flight); retry later",
                               code="overloaded")
            self._runs.add(run)
            self.metrics.in_flight.set(len(self._runs))
        try:
            run.job = self.engine.submit(turn.conv_id, torch.tensor(turn.ids), max_new_tokens=max_new,
                                         **run.gen_kwargs(sampler, self.eos_token_ids or None, self.pad_token_id))
        except BaseException:
            self._forget(run)
            raise
        run.job.future.add_done_callback(lambda f: self._finished(run))
        run.job.future.add_done_callback(run.job_done)
        return run

    def _finished(self, run: Run) -> None:
        try:
            self.metrics.observe_job(run.job)
        except Exception as e:  # metrics never fail a turn
            log.warning("cachedattn: metrics: %s", e)
        self._forget(run)

    def _forget(self, run: Run) -> None:
        with self._lock:
            self._runs.discard(run)
            self.metrics.in_flight.set(len(self._runs))

    async def pieces(self, turn: Turn, run: Run, disconnected=None):
        """Yields the answer's text as it becomes final, then an Answer. `disconnected`:
        an async callable polled while waiting (requests that do not stream)."""
        text = TextStream(self.tokenizer.decode, turn.stops)
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        while True:
            if disconnected is None:
                kind, ids = await run.queue.get()
            else:
                # Polled on a clock, not only when no token comes: tokens may come all the time.
                if loop.time() >= next_check:
                    if await disconnected():
                        self.abandon(turn, run)
                        return
                    next_check = loop.time() + DISCONNECT_POLL_S
                try:
                    kind, ids = await asyncio.wait_for(run.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
            if kind == "done":
                break
            piece = text.add(ids)
            if text.stopped:
                run.cancel.set()
            if piece:
                yield piece
        err = run.job.future.exception()
        if err is not None:
            if isinstance(err, (ValueError, TypeError)):
                raise bad_request(f"the request cannot be served: {err}")
            log.error("cachedattn: turn of %s failed: %r", turn.conv_id, err)
            raise APIError(500, f"the turn failed: {err}", code="internal_error")
        rest = text.finish()
        if rest:
            yield rest
        job = run.job
        ids = text.ids
        if text.stopped:
            finish = "stop"
        elif ids and ids[-1] in self.eos_token_ids:
            finish = "stop"
        else:
            finish = "length" if len(ids) >= turn.max_tokens else "stop"
        answer_ids = ids[:-1] if ids and ids[-1] in self.eos_token_ids else ids
        if text.stopped:  # the ids run past the text the client keeps: remember the prompt only
            self.conversations.record(turn.conv_id, turn.prompt_text, turn.prompt_text, turn.ids)
        else:
            self.conversations.record(turn.conv_id, turn.prompt_text, turn.prompt_text + text.text,
                                      turn.ids + answer_ids)
        usage = {"prompt_tokens": len(turn.ids), "completion_tokens": len(ids),
                 "total_tokens": len(turn.ids) + len(ids),
                 "prompt_tokens_details": {"cached_tokens": job.reused_tokens}}
        yield Answer(text.text, finish, usage)

    def abandon(self, turn: Turn, run: Run) -> None:
        """The client went away: stop generating; the KV computed so far is stored."""
        if not run.cancel.is_set() and not run.job.done():
            self.metrics.cancelled.inc()
        run.cancel.set()
        self.conversations.record(turn.conv_id, turn.prompt_text, turn.prompt_text, turn.ids)

    # ---- shutdown ---------------------------------------------------------------

    def shutdown(self) -> None:
        """Cancels what is still in flight (each stops at its next token, its KV
        stored), lets the engine finish its queue, then flushes and closes the store."""
        with self._lock:
            self.closing = True
            runs = list(self._runs)
        for r in runs:
            r.cancel.set()
        self.engine.close()
        self.store.flush()
        self.store.close()
        log.info("cachedattn: server stopped (%d requests were cancelled), store closed", len(runs))
