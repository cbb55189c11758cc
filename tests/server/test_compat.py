"""What third-party clients depend on, checked on the wire: the streaming format,
usage, errors in OpenAI's shape with their codes, unknown fields, sampling
parameters, a client leaving mid-stream, overload, /metrics."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL

CHAT = "/v1/chat/completions"
MAX_QUEUE = 4  # conftest.SHARED_ARGS


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def chat_body(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 5,
            "temperature": 0, **kw}


def events(http, path: str, body: dict) -> list[str]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[len("data: "):] for line in lines]


def metrics(http) -> dict:
    out = {}
    for fam in text_string_to_metric_families(http.get("/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


STREAMS = {
    "chat, include_usage": (CHAT, {"stream_options": {"include_usage": True}}, True),
    "chat, include_usage false": (CHAT, {"stream_options": {"include_usage": False}}, False),
    "chat, no stream_options": (CHAT, {}, False),
    "completions, include_usage": ("/v1/completions", {"stream_options": {"include_usage": True}}, True),
    "completions, no stream_options": ("/v1/completions", {}, False),
}


@pytest.mark.parametrize("path,extra,with_usage", STREAMS.values(), ids=STREAMS.keys())
def test_stream_format(http, path, extra, with_usage):
    body = chat_body(stream=True, **extra)
    if path != CHAT:
        body = {k: v for k, v in body.items() if k != "messages"} | {"prompt": "Say something."}
    data = events(http, path, body)
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    chunks = [json.loads(d) for d in data[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1
    body_chunks = chunks[:-1] if with_usage else chunks
    for c in body_chunks:
        assert len(c["choices"]) == 1
        choice = c["choices"][0]
        assert ("delta" in choice) if path == CHAT else ("text" in choice)
        assert ("usage" in c) == with_usage and c.get("usage") is None
    assert [c["choices"][0]["finish_reason"] for c in body_chunks][-1] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in body_chunks[:-1])
    if with_usage:
        last = chunks[-1]
        assert last["choices"] == []
        u = last["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert u["completion_tokens"] == 5 or body_chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert "cached_tokens" in u["prompt_tokens_details"]
    if path == CHAT:
        assert body_chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_unknown_fields_are_ignored(http):
    r = http.post(CHAT, json=chat_body(frobnicate={"x": 1}, metadata={"a": "b"}, store=False, service_tier="auto",
                                       parallel_tool_calls=True, logprobs=False))
    assert r.status_code == 200, r.text


ERRORS = {
    "unknown model": (dict(model="gpt-17"), 404, "model_not_found"),
    "n > 1": (dict(n=2), 400, "unsupported_value"),
    "temperature out of range": (dict(temperature=7), 400, None),
    "top_p zero": (dict(top_p=0), 400, None),
    "max_tokens zero": (dict(max_tokens=0), 400, None),
    "no messages": (dict(messages=[]), 400, None),
    "unknown role": (dict(messages=[{"role": "wizard", "content": "hi"}]), 400, None),
    "image content": (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                      400, "unsupported_value"),
    "penalty": (dict(presence_penalty=0.5), 400, "unsupported_value"),
    "tools": (dict(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_value"),
    "context too long": (dict(max_tokens=600), 400, "context_length_exceeded"),
    "prompt too long": (dict(messages=[{"role": "user", "content": "word " * 700}]), 400, "context_length_exceeded"),
}


@pytest.mark.parametrize("change,status,code", ERRORS.values(), ids=ERRORS.keys())
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_errors_in_openai_shape(http, change, status, code, stream):
    r = http.post(CHAT, json=chat_body(stream=stream, **change))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code


MALFORMED = {
    "not json": (b"{nope", 400),
    "not an object": (b"[1, 2]", 400),
    "too large": (b'{"model": "tiny", "pad": "' + b"x" * 200_000 + b'"}', 413),
}


@pytest.mark.parametrize("payload,status", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bodies_get_openai_errors(http, payload, status):
    r = http.post(CHAT, content=payload, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert "message" in r.json()["error"]


def test_unknown_route_is_a_404_in_openai_shape(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_the_sdk_raises_its_own_error_types(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=3)


def test_max_completion_tokens_bounds_the_answer(http):
    r = http.post(CHAT, json=chat_body(max_tokens=None, max_completion_tokens=3)).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"


def test_seed_makes_sampling_reproducible(http):
    answers = [http.post(CHAT, json=chat_body(temperature=1.0, top_p=0.9, seed=s, max_tokens=12)).json()
               for s in (1, 1, 2)]
    texts = [a["choices"][0]["message"]["content"] for a in answers]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    greedy = http.post(CHAT, json=chat_body(max_tokens=12)).json()["choices"][0]["message"]["content"]
    assert texts[0] != greedy


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_stop_string_ends_the_answer_before_it(http, stream):
    full = http.post(CHAT, json=chat_body(max_tokens=16)).json()["choices"][0]["message"]["content"]
    stop = full.strip()[len(full.strip()) // 2:][:3]
    expected = full[:full.find(stop)]
    if stream:
        chunks = [json.loads(d) for d in events(http, CHAT, chat_body(max_tokens=16, stop=[stop], stream=True))[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        r = http.post(CHAT, json=chat_body(max_tokens=16, stop=stop)).json()
        text, finish = r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]
    assert text == expected and finish == "stop"


def wait_idle(http, deadline_s: float = 120) -> dict:
    """Polls /metrics until nothing is in flight (a correctness wait, not a timing assertion)."""
    end = time.monotonic() + deadline_s
    while True:
        m = metrics(http)
        if m[("cachedattn_requests_in_flight", ())] == 0:
            return m
        assert time.monotonic() < end, "a request stayed in flight"
        time.sleep(0.1)


def test_a_client_leaving_mid_stream_frees_its_slot_and_its_kv_is_stored(server, http):
    wait_idle(http)
    before = metrics(http)
    body = chat_body(max_tokens=400, stream=True)
    received = 0
    with httpx.Client(base_url=server.url, timeout=120) as c, c.stream("POST", CHAT, json=body,
                                                                      headers={"x-session-id": "leaver"}) as r:
        lines = r.iter_lines()  # kept open: leaving a `for` over it would close the response
        while received < 4:
            if '"content"' in next(lines):
                received += 1
    after = wait_idle(http)
    assert after[("cachedattn_cancelled_total", ())] == before[("cachedattn_cancelled_total", ())] + 1
    prompt = http.post(CHAT, json=chat_body(max_tokens=1), headers={"x-session-id": "probe"}).json()["usage"]
    stored = after[("cachedattn_store_tokens_stored_total", ())] - before[("cachedattn_store_tokens_stored_total", ())]
    # The prompt and the answer up to where it stopped: at least what was streamed, far from all 400 tokens.
    assert prompt["prompt_tokens"] + received - 1 <= stored < prompt["prompt_tokens"] + 399
    again = http.post(CHAT, json=chat_body(max_tokens=2), headers={"x-session-id": "leaver"}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1


def test_a_client_leaving_an_unstreamed_request_frees_its_slot(server, http):
    wait_idle(http)
    before = metrics(http)
    # The client gives up well before the answer can end: 400 tokens take about a second
    # on a quiet machine, so a one-second patience let the answer finish first at times.
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + CHAT, json=chat_body(max_tokens=400), timeout=httpx.Timeout(120, read=0.3))
    after = wait_idle(http)
    assert after[("cachedattn_cancelled_total", ())] == before[("cachedattn_cancelled_total", ())] + 1
    generated = after[("cachedattn_generation_tokens_total", ())] - before[("cachedattn_generation_tokens_total", ())]
    assert 0 < generated < 400
    assert http.post(CHAT, json=chat_body()).status_code == 200


def test_overload_is_a_503_in_openai_shape_and_the_server_recovers(server, http):
    wait_idle(http)
    with contextlib.ExitStack() as stack:
        for _ in range(MAX_QUEUE):
            c = stack.enter_context(httpx.Client(base_url=server.url, timeout=120))
            # The headers come back once the turn is queued: then it holds its slot until it ends
            # (one turn runs at a time: together these take far longer than this test).
            r = stack.enter_context(c.stream("POST", CHAT, json=chat_body(max_tokens=500, stream=True)))
            assert r.status_code == 200
        busy = httpx.post(server.url + CHAT, json=chat_body())
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "overloaded"
    wait_idle(http)
    assert http.post(CHAT, json=chat_body()).status_code == 200


def test_metrics_parse_and_count(http):
    http.post(CHAT, json=chat_body(), headers={"x-user-id": "m"})
    http.post(CHAT, json=chat_body(messages=[{"role": "user", "content": "Say something."},
                                             {"role": "assistant", "content": "ok"},
                                             {"role": "user", "content": "more"}]), headers={"x-user-id": "m"})
    m = metrics(http)
    names = {name for name, _ in m}
    for name in ("cachedattn_requests_total", "cachedattn_prompt_tokens_total", "cachedattn_generation_tokens_total",
                 "cachedattn_reused_tokens_total", "cachedattn_computed_tokens_total",
                 "cachedattn_time_to_first_token_seconds_bucket", "cachedattn_time_to_first_token_seconds_count",
                 "cachedattn_store_hits_total", "cachedattn_store_read_bytes_total", "cachedattn_store_used_bytes",
                 "cachedattn_store_capacity_bytes", "cachedattn_store_conversations"):
        assert name in names, name
    assert m[("cachedattn_requests_total", (("endpoint", CHAT), ("status", "200")))] >= 2
    assert m[("cachedattn_reused_tokens_total", ())] > 0
    assert m[("cachedattn_store_hits_total", (("tier", "host"),))] > 0
    assert m[("cachedattn_store_capacity_bytes", (("tier", "host"),))] > 0
    assert m[("cachedattn_requests_total", (("endpoint", CHAT), ("status", "404")))] >= 1


def test_health(http):
    assert http.get("/health").json() == {"status": "ok"}
