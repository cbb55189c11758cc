"""Real Redis servers for the remote-tier tests: started on free ports in temporary
directories, stopped (and their files removed) by the fixtures' teardown."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

SERVER = shutil.which("redis-server")
CLI = shutil.which("redis-cli")
NEED = "redis-server/redis-cli not installed (apt-get install redis-server; scripts/setup.sh installs it)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path, *extra: str):
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True)
        conf = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.dir}",
            'save ""',
            "appendonly no",
            "protected-mode no",
            *extra,
        ]
        (self.dir / "redis.conf").write_text("\n".join(conf) + "\n")
        self.proc = subprocess.Popen([SERVER, str(self.dir / "redis.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.cli("ping").strip() == "PONG":
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def cli(self, *args: str) -> str:
        r = subprocess.run([CLI, "-p", str(self.port), *args], capture_output=True, text=True, timeout=20)
        return r.stdout

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class RedisCluster:
    """Three masters, no replicas; a shard that goes down costs only its keys."""

    def __init__(self, workdir: Path, masters: int = 3):
        self.nodes = []
        try:
            for _ in range(masters):
                self.nodes.append(
                    RedisServer(workdir, "cluster-enabled yes", "cluster-config-file nodes.conf",
                                "cluster-node-timeout 2000", "cluster-require-full-coverage no",
                                f"cluster-port {free_port()}")  # not port + 10000: that may be taken or > 65535
                )
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            r = subprocess.run([CLI, "--cluster", "create", *addrs, "--cluster-yes"], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {r.stdout[-500:]} {r.stderr[-500:]}")
            deadline = time.monotonic() + 20
            while not all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not become ready")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def need_redis() -> None:
    if SERVER is None or CLI is None:
        pytest.skip(NEED)
