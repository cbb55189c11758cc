"""`cachedattn serve --max-batch N`: concurrent requests run as batches, and each client gets
what it gets from a server running one request at a time (--max-batch 1), with the official
openai SDK: greedy and seeded sampling, stop strings, a client leaving mid-stream."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, serve
from tests.server.test_compat import metrics, wait_idle

ARGS = ("--max-queue", "32", "--max-model-len", "512", "--chunk-tokens", "16")


@pytest.fixture(scope="module")
def servers(tiny_dir):
    yield from serve(tiny_dir, (*ARGS, "--max-batch", "1"), (*ARGS, "--max-batch", "4"))


def request(i: int, **kw) -> dict:
    return {"model": MODEL, "user": f"user-{i}", "max_tokens": 20, "temperature": 0,
            "messages": [{"role": "user", "content": f"Tell me about topic number {i}, briefly."}], **kw}


async def _stream(client, body: dict, leave_after: int | None = None) -> tuple[str, str | None]:
    """The streamed text and finish reason; `leave_after`: close the stream after that many text chunks."""
    text, finish, chunks = "", None, 0
    stream = await client.chat.completions.create(**body, stream=True)
    async for c in stream:
        if c.choices and c.choices[0].delta.content:
            text += c.choices[0].delta.content
            chunks += 1
        if c.choices and c.choices[0].finish_reason:
            finish = c.choices[0].finish_reason
        if leave_after is not None and chunks >= leave_after:
            await stream.close()
            break
    return text, finish


def run_together(server, bodies: list[dict], leave: dict[int, int] | None = None) -> list[tuple[str, str | None]]:
    """Sends every body at once, each streamed; returns each one's (text, finish_reason)."""
    leave = leave or {}

    async def go():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        try:
            return await asyncio.gather(*[_stream(client, b, leave.get(i)) for i, b in enumerate(bodies)])
        finally:
            await client.close()

    return asyncio.run(go())


def batched_turns(server) -> float:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        m = wait_idle(http)
    return m[("cachedattn_batch_size_count", ())] - m[("cachedattn_batch_size_bucket", (("le", "1.0"),))]


def test_concurrent_requests_batch_and_each_gets_what_it_gets_alone(servers):
    one, four = servers
    bodies = [request(i) for i in range(6)]
    bodies[2]["max_tokens"] = 9  # its own bound inside a batch
    for i in (3, 4):  # seeded sampling: the same seed on two different prompts
        bodies[i].update(temperature=0.9, top_p=0.95, seed=1234)
    full = run_together(one, [request(5)])[0][0]
    stop = full.strip()[len(full.strip()) // 2:][:3]
    bodies[5]["stop"] = [stop]
    before = batched_turns(four)
    want = run_together(one, bodies)
    got = run_together(four, bodies)
    assert got == want
    assert want[5] == (full[: full.find(stop)], "stop")  # the stop string ended only its own request
    assert want[2][1] == "length" and want[0][1] == "length"
    assert batched_turns(four) > before  # batches of two or more rows did run
    assert batched_turns(one) == 0


def test_a_client_leaving_mid_stream_stops_only_its_row(servers):
    one, four = servers
    bodies = [request(10 + i, max_tokens=60) for i in range(4)]
    want = run_together(one, bodies)
    with httpx.Client(base_url=four.url, timeout=60) as http:
        before = wait_idle(http)
        got = run_together(four, bodies, leave={1: 3})
        after = wait_idle(http)
    assert after[("cachedattn_cancelled_total", ())] == before[("cachedattn_cancelled_total", ())] + 1
    assert [got[i] for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]  # the others ran to their end
    assert want[1][0].startswith(got[1][0]) and len(got[1][0]) < len(want[1][0])
    batched = after[("cachedattn_batch_size_count", ())] - after[("cachedattn_batch_size_bucket", (("le", "1.0"),))]
    assert batched > before[("cachedattn_batch_size_count", ())] - before[("cachedattn_batch_size_bucket",
                                                                             (("le", "1.0"),))]
