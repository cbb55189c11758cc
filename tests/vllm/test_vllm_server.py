"""README's vLLM command: `cachedattn serve --engine vllm` starts vLLM's
OpenAI server with the connector from cachedattn's own flags; the official
openai SDK holds a two-turn chat with it, and the connector stores the
conversation's KV (the disk tier holds its chunk files). Token equality
with and without the connector is test_vllm_engine.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.remote.redis_servers import free_port
from tests.vllm.test_vllm_engine import VENV_PY

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def vllm_server(tmp_path):
    if not VENV_PY.exists():
        pytest.skip(f"no vLLM environment at {VENV_PY}: run `bash scripts/setup.sh --vllm`")
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    env = dict(os.environ, CACHEDATTN_VLLM_PYTHON=str(VENV_PY))
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # serve --engine vllm's own default must work
    p = subprocess.Popen([sys.executable, "-m", "cachedattn", "serve", "--engine", "vllm", "--port", str(port),
                          "--disk-dir", str(tmp_path / "kv"), "--host-bytes", "64M", "--dtype", "float32",
                          "--max-model-len", "1024",
                          # vLLM's own prefix cache off: the second turn's history then comes from cachedattn's store
                          "--vllm-args=--no-enable-prefix-caching"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    import httpx

    deadline = time.monotonic() + 300
    try:
        while True:
            if p.poll() is not None:
                pytest.fail(f"vLLM server exited ({p.returncode}):\n{(tmp_path / 'server.log').read_text()[-4000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vLLM server did not come up in 300 s")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", tmp_path
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
        log.close()


def test_serve_engine_vllm_answers_a_two_turn_chat_and_stores_its_kv(vllm_server):
    import openai

    url, tmp = vllm_server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "You are terse. " * 60}, {"role": "user", "content": "Tell me a story " * 20}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "More."}]
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert first.choices[0].message.content and second.choices[0].message.content
    files = [f for _, _, fs in os.walk(tmp / "kv") for f in fs]
    assert len(files) > 2, files  # the connector stored the conversation's blocks on disk
    # vLLM's /metrics carries the connector's counters: the second turn found the first turn's blocks.
    import httpx

    deadline = time.monotonic() + 30
    while True:  # vLLM records stats on its logging interval
        text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=5).text
        hits = sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("cachedattn:chunk_hits_total{") and 'tier="host"' in line)
        if hits > 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert hits > 0, [line for line in text.splitlines() if line.startswith("cachedattn")]
    assert any(line.startswith("cachedattn:blocks_saved_total{") and float(line.split()[-1]) > 0
               for line in text.splitlines())
