"""Multi-turn conversations through the real server: the second turn reuses the
first turn's prompt and answer, and answers as a server that recomputes."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL, serve

QUESTIONS = ["Tell me about the history of Rome, in as much detail as you can manage.",
             "And what about Greece?", "Which of the two lasted longer, and why?"]


@pytest.fixture(scope="module")
def servers(tiny_dir):
    yield from serve(tiny_dir, (), ("--no-reuse",))


@pytest.fixture(scope="module")
def reuse(servers):
    return servers[0]


@pytest.fixture(scope="module")
def recompute(servers):
    return servers[1]


def converse(server, name: str, identify: dict, answers: list[str] | None = None, max_tokens: int = 24):
    """Three turns; `answers`: what the client sends back as the assistant's messages (default: the answers)."""
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    msgs = [{"role": "system", "content": f"You are assistant {name}."}]
    out = []
    for i, q in enumerate(QUESTIONS):
        msgs.append({"role": "user", "content": q})
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens, temperature=0,
                                           **identify)
        out.append(r)
        msgs.append({"role": "assistant", "content": r.choices[0].message.content if answers is None else answers[i]})
    return out


IDENTITIES = {
    "no id (prompt-prefix digest)": {},
    "x-user-id header": {"extra_headers": {"x-user-id": "alice"}},
    "X-Session-ID header": {"extra_headers": {"X-Session-ID": "s-42"}},
    "user field": {"user": "bob"},
    "conversation_id field": {"extra_body": {"conversation_id": "c-7"}},
}


@pytest.mark.parametrize("identify", IDENTITIES.values(), ids=IDENTITIES.keys())
def test_next_turn_reuses_the_whole_previous_prompt_and_answer(reuse, identify):
    turns = converse(reuse, "one", identify)
    assert turns[0].usage.prompt_tokens_details.cached_tokens == 0
    for prev, nxt in zip(turns, turns[1:]):
        # Every token of the previous turn but its last answer token (which never went through the model).
        previous = prev.usage.prompt_tokens + prev.usage.completion_tokens
        assert nxt.usage.prompt_tokens_details.cached_tokens == previous - 1
        assert nxt.usage.prompt_tokens > prev.usage.prompt_tokens + prev.usage.completion_tokens


def test_answers_equal_those_of_a_server_that_recomputes(reuse, recompute):
    cached = converse(reuse, "two", {})
    fresh = converse(recompute, "two", {})
    assert [r.choices[0].message.content for r in cached] == [r.choices[0].message.content for r in fresh]
    assert [r.usage.prompt_tokens for r in cached] == [r.usage.prompt_tokens for r in fresh]
    assert all(r.usage.prompt_tokens_details.cached_tokens == 0 for r in fresh)
    assert cached[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_a_client_that_rewrites_the_answers_still_reuses_up_to_them(reuse, recompute):
    edited = ["Rome: a city.", "Greece: many cities.", "unused"]
    cached = converse(reuse, "three", {}, answers=edited)
    fresh = converse(recompute, "three", {}, answers=edited)
    assert [r.choices[0].message.content for r in cached] == [r.choices[0].message.content for r in fresh]
    for prev, nxt in zip(cached, cached[1:]):
        # The previous prompt is stored, and the edited answer is not what was generated.
        assert prev.usage.prompt_tokens <= nxt.usage.prompt_tokens_details.cached_tokens
        assert nxt.usage.prompt_tokens_details.cached_tokens < prev.usage.prompt_tokens + prev.usage.completion_tokens


def test_conversations_that_open_alike_keep_their_own_kv_once_they_differ(reuse):
    """Two conversations with the same first turn (same messages, same greedy answer), interleaved:
    once their messages differ, each turn reuses its own previous turn."""
    client = openai.OpenAI(base_url=reuse.base_url, api_key="unused")
    a = [{"role": "user", "content": "Hello!"}]
    b = list(a)
    previous = {}
    for turn, (qa, qb) in enumerate([("Hello!", "Hello!"), ("Tell me about A.", "Tell me about B."),
                                     ("More on A.", "More on B.")]):
        for name, msgs, q in (("a", a, qa), ("b", b, qb)):
            if turn:
                msgs.append({"role": "user", "content": q})
            r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
            if turn:
                p = previous[name].usage
                assert r.usage.prompt_tokens_details.cached_tokens == p.prompt_tokens + p.completion_tokens - 1
            previous[name] = r
            msgs.append({"role": "assistant", "content": r.choices[0].message.content})
