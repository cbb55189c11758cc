"""The replayed trace: a seeded sample of multi-turn ShareGPT conversations
with arrival times and turn lengths.

- Rounds: a user message and the answer to it (consecutive messages of one
  role are merged). Only conversations with at least two rounds are kept.
- Lengths: `estimate_tokens` (ceil(characters / 4), the usual rule of thumb
  for English BPE vocabularies), capped at max_user / max_answer tokens, and
  at max_rounds rounds per conversation; the token ids themselves are random
  (the model's weights are random too), drawn from the seed.
- Arrivals: sessions start as a Poisson process (`rate` per second); each next
  round arrives `think` seconds after the previous answer ends, exponential
  with mean think_mean. The end of an answer depends on the system serving it,
  so the trace fixes the draws, not the absolute times. `think_spread` > 0
  gives each conversation its own mean, think_mean times a lognormal factor
  of mean 1 (users differ); 0, the default, gives every one the same.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from cachedattn.data import sharegpt


@dataclass
class Round:
    user_tokens: int
    answer_tokens: int
    think: float  # seconds between the previous answer's end and this round's arrival (0 for the first)


@dataclass
class Conversation:
    id: str
    start: float  # arrival of the first round
    rounds: list[Round]
    seed: int  # token ids of this conversation come from random.Random(seed)


@dataclass
class Trace:
    conversations: list[Conversation]
    params: dict = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return sum(len(c.rounds) for c in self.conversations)

    def total_tokens(self, conv: Conversation) -> int:
        return sum(r.user_tokens + r.answer_tokens for r in conv.rounds)


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def rounds_of(messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """[(user text, answer text)] from alternating messages; merges repeats of a role."""
    merged: list[list[str]] = []
    for role, text in messages:
        if merged and merged[-1][0] == role:
            merged[-1][1] += "\n" + text
        else:
            merged.append([role, text])
    return [(u[1], a[1]) for u, a in zip(merged[0::2], merged[1::2]) if u[0] == "user" and a[0] == "assistant"]


def build_trace(
    conversations: int = 80,
    seed: int = 0,
    rate: float = 1.0,
    think_mean: float = 60.0,
    max_user: int = 512,
    max_answer: int = 256,
    max_rounds: int = 10,
    path=None,
    think_spread: float = 0.0,
) -> Trace:
    for name, v in dict(conversations=conversations, max_user=max_user, max_answer=max_answer, max_rounds=max_rounds).items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if rate <= 0 or think_mean < 0 or think_spread < 0:
        raise ValueError(f"rate must be > 0, think_mean and think_spread >= 0 (got {rate}, {think_mean}, {think_spread})")
    pool = [r for r in (rounds_of(m) for m in sharegpt.conversations(path, min_turns=4)) if len(r) >= 2]
    if len(pool) < conversations:
        raise ValueError(f"asked for {conversations} conversations; the dataset has {len(pool)} with two rounds or more")
    rng = random.Random(seed)
    picked = rng.sample(range(len(pool)), conversations)
    t = 0.0
    convs = []
    for i, idx in enumerate(sorted(picked)):
        t += rng.expovariate(rate)
        mean = think_mean
        if think_spread > 0:  # own stream: the default trace does not depend on it
            mean *= math.exp(random.Random(seed * 7919 + idx).gauss(0, think_spread) - think_spread**2 / 2)
        rounds = [
            Round(
                min(estimate_tokens(u), max_user),
                min(estimate_tokens(a), max_answer),
                0.0 if k == 0 else (rng.expovariate(1 / mean) if mean > 0 else 0.0),
            )
            for k, (u, a) in enumerate(pool[idx][:max_rounds])
        ]
        convs.append(Conversation(f"conv{i:04d}-sg{idx}", t, rounds, rng.getrandbits(32)))
    params = dict(conversations=conversations, seed=seed, rate=rate, think_mean=think_mean, think_spread=think_spread,
                  max_user=max_user,
                  max_answer=max_answer, max_rounds=max_rounds, dataset_conversations=len(pool))
    return Trace(convs, params)
