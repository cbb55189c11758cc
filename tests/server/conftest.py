"""The real server as a subprocess on a free port, driven over HTTP.

The tiny model is built once per machine (cached under CACHEDATTN_SERVE_CACHE,
default ~/.cache/cachedattn/serve); each test module starts its own server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
START_TIMEOUT = 300  # a fresh machine trains the tokenizer first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: Path, *args: str, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="cachedattn-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "cachedattn", "serve", "--model", str(model_dir), "--served-model-name", MODEL,
               "--port", str(self.port), "--threads", "1", "--host-bytes", "256M", "--log-level", "warning",
               *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not come up in {START_TIMEOUT} s:\n{self.output()}")
            time.sleep(0.2)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a graceful shutdown), then the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from cachedattn.server import model

    return model.resolve(MODEL)


def serve(model_dir: Path, *arg_lists: tuple[str, ...]):
    """A generator for a module-scoped fixture: servers started together (one per
    argument list), yielded as one or a list, stopped after the module."""
    servers = [ServerProcess(model_dir, *args, wait=False) for args in arg_lists or [()]]
    try:
        for s in servers:
            s.wait_ready()
        yield servers[0] if len(servers) == 1 else servers
    finally:
        for s in servers:
            s.stop()
            os.unlink(s.log.name)


# One server for the modules that only talk to it (each start costs ~20 s of imports on 2 cores).
SHARED_ARGS = ("--max-queue", "4", "--max-body-bytes", "100000", "--max-model-len", "512", "--chunk-tokens", "16")


@pytest.fixture(scope="session")
def shared_server(tiny_dir):
    yield from serve(tiny_dir, SHARED_ARGS)
