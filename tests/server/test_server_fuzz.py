"""The request surface fuzzed on the wire: every request the server cannot
serve is a 4xx in OpenAI's error JSON, never a 5xx, and the server keeps
answering, with the right answer. Seeded, bounded (a few hundred requests,
answers of a few tokens), against a real server process with the tiny model."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import httpx
import pytest

from cachedattn.server.identity import ID_LIMIT  # the store's limit less the server's prefix
from tests.server.conftest import MODEL, SHARED_ARGS, serve
from tests.server.test_compat import chat_body, metrics

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
SEED, ROUNDS = 20261206, 300
BURST = 20
# The shared server's arguments with room for a burst of BURST streams in flight at once.
ARGS = SHARED_ARGS + ("--max-queue", str(BURST + 4))  # the last --max-queue wins

EVIL = [
    2**80, -(2**80), 2**63, 2**63 - 1, -(2**63) - 1, 2**31, -1, 0, 1, 1e308, -1e308, 1e-320, 0.5, float("nan"),
    float("inf"), -float("inf"), True, False, None, "", "x", "0", "NaN", "\u0000", "\ud800", "\udfff x",
    "é" * 3000, "x" * 5000, [], [1], [2**80], [""], ["\ud800"], [[1, 2]], [["a"]], [None], {}, {"a": 1},
    {"type": "text", "text": 1}, {"include_usage": True}, [{"role": "user", "content": "\ud800"}],
    [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}], [{"role": 5}], [{"a": [{"b": {}}]}],
]
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop",
          "seed", "stream", "stream_options", "user", "conversation_id", "presence_penalty", "frequency_penalty",
          "logprobs", "top_logprobs", "echo", "best_of", "logit_bias", "tools", "tool_choice", "response_format",
          "prompt", "suffix"]
# Header values as raw bytes on the wire: long, at the limit, multi-byte UTF-8, not UTF-8, control characters.
HEADER_VALUES = [b"", b"a" * ID_LIMIT, b"a" * (ID_LIMIT + 1), b"a" * 20000, "é".encode() * (ID_LIMIT // 2),
                 "é".encode() * (ID_LIMIT // 2 + 1), "会話".encode(), b"\xff\xfe", b"\xc3", b"a\x80b",
                 b"../../etc/passwd", b"x y", b"a\tb", b"a\x01b", b"a\x1b[31mb", b"a\x7fb"]
CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/vnd.x+json"]
JUNK = [b"", b"null", b"[]", b"5", b'"x"', b"{", b"}", b"\xff\xfe\x00", b"{\"model\": \"\xff\"}", b"NaN",
        b'{"a":' * 3000 + b"1" + b"}" * 3000, b"[" * 5000, b"\x00" * 100]


@pytest.fixture(scope="module")
def server(tiny_dir):
    yield from serve(tiny_dir, ARGS)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(http):
    """The greedy answer to chat_body(), before any fuzzing: the server must still give it afterwards."""
    r = http.post(CHAT, json=chat_body())
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def post_raw(http, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    """A body with lone surrogates kept (json escapes them as \\udXXX, which JSON allows)."""
    return http.post(path, content=json.dumps(body, allow_nan=True).encode(),
                     headers={"content-type": "application/json", **(headers or {})})


def assert_refused(r: httpx.Response, param: str | None, what="") -> dict:
    assert r.status_code == 400, (what, r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], what
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, (what, err)
    return err


def assert_served_or_refused(r: httpx.Response, what) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:500]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], what
    elif r.headers["content-type"].startswith("text/event-stream"):
        # An error after the headers travels as an event: a bad request must never get that far.
        lines = [line for line in r.text.splitlines() if line]
        assert lines and lines[-1] == "data: [DONE]", (what, lines[-3:])
        assert not any(line.startswith('data: {"error"') for line in lines), (what, lines)


# ---- the two 500s of issue 22, and their classes ----------------------------------------------------------------


def test_seed_beyond_int64_is_a_400_naming_seed(http):
    for seed in (2**80, 2**63, -(2**63) - 1):
        assert_refused(http.post(CHAT, json=chat_body(seed=seed, temperature=1)), "seed")
    assert http.post(CHAT, json=chat_body(seed=2**63 - 1, temperature=1)).status_code == 200


OUT_OF_RANGE = [
    ("seed", 1.5), ("seed", float("nan")), ("seed", "x"),
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", float("inf")),
    ("max_completion_tokens", 0), ("max_completion_tokens", -(2**80)),
    ("n", 0), ("n", -1), ("n", 2**80), ("n", 129), ("best_of", 0), ("best_of", 2**80),
    ("top_logprobs", -1), ("top_logprobs", 21), ("top_logprobs", 2**80),
    ("logprobs", -1), ("logprobs", 2**80),
    ("top_k", -2), ("top_k", -(2**80)), ("top_k", 2**80), ("top_k", 1.5),
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0), ("top_p", 1.5), ("top_p", float("nan")),
    ("presence_penalty", 2.5), ("presence_penalty", -(2**80)), ("presence_penalty", float("nan")),
    ("frequency_penalty", float("inf")), ("frequency_penalty", -2.5),
]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completions"])
@pytest.mark.parametrize("field,value", OUT_OF_RANGE, ids=[f"{f}={v}" for f, v in OUT_OF_RANGE])
def test_a_number_out_of_its_range_is_a_400_naming_the_field(http, path, field, value):
    body = chat_body() if path == CHAT else {"model": MODEL, "prompt": "Once", "max_tokens": 3, "temperature": 0}
    if field in ("max_completion_tokens", "top_logprobs") and path == COMPLETIONS:
        return  # chat fields; completions ignore them as any unknown field
    err = assert_refused(post_raw(http, path, {**body, field: value}), field, (field, value))
    assert field in err["message"]


def test_top_k_is_honoured_and_one_is_greedy(http, reference):
    """top_k (vLLM's sampling field) samples among the k best tokens: k=1 at any temperature is the greedy answer;
    -1 and 0 mean every token."""
    for seed in (1, 2, 3):
        r = http.post(CHAT, json=chat_body(temperature=2, seed=seed, top_k=1))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == reference
    for k in (-1, 0, 10**6):
        assert http.post(CHAT, json=chat_body(temperature=1, top_k=k)).status_code == 200


@pytest.mark.parametrize("where", ["x-session-id", "x-user-id", "conversation_id", "user"])
def test_an_id_longer_than_the_store_holds_is_a_400_naming_where_it_came_from(http, where):
    def send(v: str):
        if where.startswith("x-"):
            return http.post(CHAT, json=chat_body(), headers={where: v})
        return http.post(CHAT, json=chat_body(**{where: v}))

    err = assert_refused(send("a" * (ID_LIMIT + 1)), where)
    assert str(ID_LIMIT) in err["message"] and str(ID_LIMIT + 1) in err["message"]
    assert send("a" * ID_LIMIT).status_code == 200


def test_ids_the_store_refuses_are_400s(http):
    for v in ("a\u0000b", "\ud800"):
        assert_refused(post_raw(http, CHAT, chat_body(conversation_id=v)), "conversation_id", ascii(v))


@pytest.mark.parametrize("name", ["x-session-id", "x-user-id"])
def test_a_header_id_is_its_utf8_bytes(http, name):
    """A header's bytes are the id's UTF-8 (not Latin-1 characters): the limit counts those bytes, bytes that are
    not UTF-8 are refused naming the header, and the header and the field name the same conversation."""
    e = "é".encode()
    assert http.post(CHAT, json=chat_body(), headers={name: e * (ID_LIMIT // 2)}).status_code == 200
    err = assert_refused(http.post(CHAT, json=chat_body(), headers={name: e * (ID_LIMIT // 2 + 1)}), name)
    assert str(ID_LIMIT) in err["message"]
    for bad in (b"\xff\xfe", b"\xc3", b"a\x80b"):
        err = assert_refused(http.post(CHAT, json=chat_body(), headers={name: bad}), name, bad)
        assert "UTF-8" in err["message"]

    conv = f"fuzz-{name}-héllo-{time.monotonic_ns()}"
    prompt = "Once upon a time there was a little cat who liked to sit in the sun all day long."
    first = http.post(COMPLETIONS, json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0},
                      headers={name: conv.encode()})
    assert first.status_code == 200, first.text
    second = http.post(COMPLETIONS, json={"model": MODEL, "prompt": prompt + " The end.", "max_tokens": 2,
                                          "temperature": 0, "conversation_id": conv})
    assert second.status_code == 200, second.text
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


TEXT_FIELDS = {
    "message content": ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
    "content part": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
                     "messages.0.content"),
    "message name": ({"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, "messages.0.name"),
    "stop": ({"stop": ["ok", "\ud800"]}, "stop"),
    "model": ({"model": "\ud800"}, "model"),
    "user": ({"user": "\ud800"}, "user"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("change,param", TEXT_FIELDS.values(), ids=TEXT_FIELDS.keys())
def test_text_that_is_not_unicode_is_a_400_naming_the_field(http, change, param, stream):
    """JSON may escape a lone surrogate (\\ud800): no tokenizer, store or response can take it."""
    assert_refused(post_raw(http, CHAT, chat_body(stream=stream, **change)), param)


def test_a_prompt_that_is_not_unicode_is_a_400(http):
    for prompt in ("\ud800", ["\udc00 x"]):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        assert_refused(post_raw(http, COMPLETIONS, body), None, ascii(prompt))


def test_a_header_the_http_parser_refuses_is_a_400_and_the_server_goes_on(http, server, reference):
    """A NUL in a header never reaches the app: the HTTP parser (uvicorn's h11) answers 400 itself, in plain
    text, and closes that connection; the server goes on."""
    body = json.dumps(chat_body()).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"X-Session-ID: a\x00b\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert http.post(CHAT, json=chat_body()).json()["choices"][0]["message"]["content"] == reference


# ---- the fuzz -----------------------------------------------------------------------------------------------------


def _mutated(rng: random.Random) -> tuple[str, bytes, dict]:
    path = rng.choice([CHAT, COMPLETIONS])
    body = chat_body() if path == CHAT else {"model": MODEL, "prompt": "Once", "max_tokens": 3, "temperature": 0}
    body["stream"] = rng.random() < 0.4
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS)
        if rng.random() < 0.1:
            body.pop(field, None)
        else:
            body[field] = rng.choice(EVIL)
    if body.get("stream") is True and rng.random() < 0.5:
        body["stream_options"] = rng.choice([{"include_usage": True}, {"include_usage": "yes"}, None, 1])
    # A valid but long request must not make the fuzz slow: keep answers short unless the fuzz chose a bad value.
    for k in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(k), int) and not isinstance(body[k], bool) and 0 < body[k] < 2**31:
            body[k] = min(body[k], 4)
    if rng.random() < 0.05:  # not an object at the top
        body = rng.choice(EVIL)
    headers = {"content-type": "application/json"}
    if rng.random() < 0.3:
        headers[rng.choice(["x-session-id", "x-user-id"])] = rng.choice(HEADER_VALUES)
    raw = json.dumps(body, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode("utf-8", "surrogatepass")
    r = rng.random()
    if r < 0.05:
        raw = raw[: rng.randint(0, len(raw))]  # cut short
    elif r < 0.1:
        raw = rng.choice(JUNK)
    elif r < 0.13:
        i = rng.randint(0, len(raw))
        raw = raw[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]) + raw[i:]  # bytes that are not UTF-8
    if rng.random() < 0.1:
        ct = rng.choice(CONTENT_TYPES)
        if ct is None:
            del headers["content-type"]
        else:
            headers["content-type"] = ct
    return path, raw, headers


def test_fuzzed_requests_are_answered_or_refused_in_openai_shape(http, reference):
    rng = random.Random(SEED)
    before = metrics(http)
    statuses = {}
    for i in range(ROUNDS):
        path, raw, headers = _mutated(rng)
        r = http.post(path, content=raw, headers=headers)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert_served_or_refused(r, (i, path, raw[:300], {k: v[:60] for k, v in headers.items()}))
    assert statuses.get(200, 0) > ROUNDS // 20 and statuses.get(400, 0) > ROUNDS // 2, statuses  # both kinds seen
    after = metrics(http)
    fives = {k: v - before.get(k, 0) for k, v in after.items()
             if k[0] == "cachedattn_requests_total" and dict(k[1]).get("status", "").startswith("5")}
    assert not any(fives.values()), fives
    assert http.get("/health").status_code == 200
    assert http.post(CHAT, json=chat_body()).json()["choices"][0]["message"]["content"] == reference


def test_clients_leaving_in_bursts_leave_the_server_idle_and_answering(http, server, reference):
    """Bursts of BURST streams open at once, each client gone after its first event (some before it): every slot
    is freed (in-flight back to 0, each counted as cancelled or finished), and the next turn gets the right answer."""
    def leave(i: int, errors: list):
        try:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                path = CHAT if i % 2 else COMPLETIONS
                body = chat_body(stream=True, max_tokens=64) if path == CHAT else \
                    {"model": MODEL, "prompt": "Once", "max_tokens": 64, "stream": True}
                with c.stream("POST", path, json=body) as r:
                    if r.status_code != 200:
                        errors.append(r.status_code)
                        return
                    if i % 5:  # one in five leaves before reading anything
                        for _ in r.iter_lines():
                            break
        except Exception as e:  # noqa: BLE001 -- reported by the test, not swallowed
            errors.append(repr(e))

    def idle(expected: int) -> dict:
        """The metrics once nothing is in flight and every stream is counted (within seconds, not decodes)."""
        deadline = time.monotonic() + 30
        while True:
            m = metrics(http)
            answered = sum(v - before.get(k, 0) for k, v in m.items() if k[0] == "cachedattn_requests_total")
            if m[("cachedattn_requests_in_flight", ())] == 0 and answered >= expected or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    before = metrics(http)
    for burst in range(2):
        errors: list = []
        threads = [threading.Thread(target=leave, args=(i, errors)) for i in range(BURST)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        assert not errors, errors
        m = idle((burst + 1) * BURST)
        assert m[("cachedattn_requests_in_flight", ())] == 0
    left: dict[str, float] = {}
    for k, v in m.items():
        if k[0] == "cachedattn_requests_total":
            status = dict(k[1])["status"]
            left[status] = left.get(status, 0) + v - before.get(k, 0)
    assert sum(left.values()) == 2 * BURST, left  # each stream counted once: 499 (gone) or 200 (it ended first)
    assert set(s for s, n in left.items() if n) <= {"200", "499"}, left
    assert m[("cachedattn_cancelled_total", ())] > before.get(("cachedattn_cancelled_total", ()), 0)
    assert http.get("/health").status_code == 200
    assert http.post(CHAT, json=chat_body()).json()["choices"][0]["message"]["content"] == reference


# ---- an unexpected exception, in process --------------------------------------------------------------------------


def test_an_unexpected_exception_is_a_500_in_openai_shape_without_a_trace():
    from fastapi.testclient import TestClient

    from cachedattn.server.app import create_app
    from cachedattn.server.metrics import Metrics

    class Broken:
        closing = False
        metrics = Metrics(store=None)

        def check_model(self, name):
            raise RuntimeError("a defect, not the client's")

        def shutdown(self):
            pass

    with TestClient(create_app(Broken()), raise_server_exceptions=False) as c:
        r = c.post(CHAT, json=chat_body())
    assert r.status_code == 500
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "server_error" and err["code"] == "internal_error"
    assert "Traceback" not in r.text and "a defect" in err["message"]
