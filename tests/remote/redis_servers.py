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


class RedisSentinel:
    """One master and one Sentinel watching it as `service`."""

    def __init__(self, workdir: Path, service: str = "kvmaster"):
        self.service = service
        self.master = RedisServer(workdir)
        self.port = free_port()
        d = workdir / f"sentinel-{self.port}"
        d.mkdir()
        conf = d / "sentinel.conf"  # Sentinel rewrites its file: it must be its own and writable
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {d}\nprotected-mode no\n"
                        f"sentinel monitor {service} 127.0.0.1 {self.master.port} 1\n")
        self.proc = subprocess.Popen([SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            r = subprocess.run([CLI, "-p", str(self.port), "sentinel", "get-master-addr-by-name", service],
                               capture_output=True, text=True, timeout=10)
            if str(self.master.port) in r.stdout:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the sentinel did not come up")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.master.stop()
