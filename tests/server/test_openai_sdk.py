"""The official openai SDK against the real server: sync and async, streaming and not."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.server.conftest import MODEL


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


def messages(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


def test_models_lists_the_served_model_with_its_context_length(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["max_model_len"] == 512  # --max-model-len
    assert client.models.retrieve(MODEL).id == MODEL


def test_sync_chat_answers_with_usage(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    r = client.chat.completions.create(model=MODEL, messages=messages("What is a cache?"), max_tokens=7,
                                       temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 7
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_sync_streaming_text_equals_the_unstreamed_answer(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    kw = dict(model=MODEL, messages=messages("Streams, please."), max_tokens=9, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == whole.choices[0].finish_reason


def test_async_client_streaming_and_not(server):
    async def go():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused")
        kw = dict(model=MODEL, messages=messages("Async?"), max_tokens=6, temperature=0)
        whole, stream = await asyncio.gather(client.chat.completions.create(**kw),
                                             client.chat.completions.create(**kw, stream=True))
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        await client.close()
        return whole.choices[0].message.content, text

    whole, streamed = asyncio.run(go())
    assert whole == streamed


def test_async_concurrent_requests_all_answered(server):
    async def go():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused")
        rs = await asyncio.gather(*[
            client.chat.completions.create(model=MODEL, messages=messages(f"Question number {i}"), max_tokens=4,
                                           temperature=0, user=f"user-{i}") for i in range(4)])
        await client.close()
        return rs

    rs = asyncio.run(go())
    assert all(r.usage.completion_tokens >= 1 for r in rs)


def test_completions_endpoint_streaming_and_not(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens <= 5
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_completions_accept_token_ids(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    r = client.completions.create(model=MODEL, prompt=[10, 11, 12, 13], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 4
