"""A graceful shutdown: SIGTERM with a stream in flight ends the stream, exits
cleanly, and leaves the store flushed: a new server on the same disk directory
continues the conversations."""

from __future__ import annotations

import signal
import threading

import httpx

from tests.server.conftest import MODEL, ServerProcess

CHAT = "/v1/chat/completions"


def ask(server, session: str, messages: list[dict], max_tokens: int) -> dict:
    r = httpx.post(server.url + CHAT, headers={"X-Session-ID": session}, timeout=120,
                   json={"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_sigterm_ends_streams_flushes_the_store_and_a_restart_continues(tiny_dir, tmp_path):
    args = ("--disk-dir", str(tmp_path / "kv"), "--chunk-tokens", "16", "--shutdown-timeout", "1",
            "--log-level", "info")
    first = ServerProcess(tiny_dir, *args)
    try:
        done = [{"role": "user", "content": "A finished turn, please."}]
        answer = ask(first, "done", done, 20)
        seen, ended = threading.Event(), []

        def stream():
            body = {"model": MODEL, "messages": [{"role": "user", "content": "A long answer."}], "stream": True,
                    "max_tokens": 3000, "temperature": 0}
            try:
                with httpx.stream("POST", first.url + CHAT, json=body, timeout=120,
                                  headers={"X-Session-ID": "cut"}) as r:
                    for line in r.iter_lines():
                        if '"content"' in line:
                            seen.set()
            except httpx.HTTPError as e:  # the connection may close once the grace period is over
                ended.append(e)
            ended.append("end")

        t = threading.Thread(target=stream)
        t.start()
        assert seen.wait(120)
        # uvicorn re-raises the signal once it has shut down: the status says "ended by SIGTERM".
        assert first.stop(timeout=120) in (0, -signal.SIGTERM), first.output()
        t.join(60)
        assert not t.is_alive() and ended[-1] == "end"
        assert "store closed" in first.output()
    finally:
        first.stop()
    second = ServerProcess(tiny_dir, *args)
    try:
        nxt = done + [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "And the next turn."}]
        again = ask(second, "done", nxt, 4)
        # A fresh server re-encodes the answer's text (its in-memory index is gone): reuse reaches at least the prompt.
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= answer["usage"]["prompt_tokens"]
        cut = ask(second, "cut", [{"role": "user", "content": "A long answer."}], 2)
        assert cut["usage"]["prompt_tokens_details"]["cached_tokens"] == cut["usage"]["prompt_tokens"] - 1
    finally:
        second.stop()
