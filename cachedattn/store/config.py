"""Store configuration: a dataclass, validated field by field, also read
from ``CACHEDATTN_*`` environment variables."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Mapping

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(field: str, value) -> int:
    """Bytes from an int or a string such as '8G', '512MiB', '1.5g'."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a byte size, got {value!r}")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{field}: cannot read {value!r} as a byte size (e.g. 8G, 512M, 1048576)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()[:1]])


def physical_memory_bytes() -> int:
    """The machine's RAM: the most pinned host memory a store can ask for."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not reported here: only the native pool's own limit applies
        return (1 << 64) - 1


def _parse_bool(field: str, value) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{field}: expected a boolean (1/0, true/false), got {value!r}")


@dataclass
class StoreConfig:
    host_bytes: int = 1 << 30
    """Capacity of the pinned host-memory tier; a hard limit."""
    disk_dir: str | None = None
    """Directory of the SSD tier; None: no disk tier."""
    disk_bytes: int = 16 << 30
    """Capacity of the disk tier for this model's chunks; a hard limit."""
    chunk_tokens: int = 256
    """Tokens per chunk: the unit of storage and of disk I/O."""
    write_through: bool = True
    """Write new chunks to disk at once (in the background); else only when demoted."""
    sync_writes: bool = False
    """fdatasync each chunk before it counts as stored (power-loss safety; slower)."""
    io_backend: str = "auto"
    io_threads: int = 2
    hugepages: str = "auto"
    eviction: str = "lru"
    remote: str | None = None
    """Shared remote tier: redis://host:port, redis+cluster://h1:p1,h2:p2 or
    redis+sentinel://h1:p1/service (README: "Several servers, one Redis"); None: none."""
    remote_ttl_s: int | None = None
    """Expiry of each chunk written to the remote tier, seconds; None: Redis's eviction alone."""
    remote_timeout_s: float = 1.0
    """Socket timeout of remote requests: a slow Redis costs a lookup at most this, then backs off."""
    remote_inflight_bytes: int = 256 << 20
    """Bytes of chunks queued for the remote tier at most (and a quarter of host_bytes at most: they hold
    host blocks); more are skipped, never waited for."""

    def __post_init__(self):
        self.host_bytes = parse_size("host_bytes", self.host_bytes)
        self.disk_bytes = parse_size("disk_bytes", self.disk_bytes)
        if self.host_bytes <= 0:
            raise ValueError(f"host_bytes: must be positive, got {self.host_bytes}")
        limit = physical_memory_bytes()
        if self.host_bytes > limit:
            # Pinned memory cannot exceed RAM; past 2**64 the native pool cannot even be asked.
            raise ValueError(
                f"host_bytes: {self.host_bytes} is more than this machine's memory ({limit} bytes), the limit "
                "of pinned host memory; lower host_bytes"
            )
        if self.disk_bytes <= 0:
            raise ValueError(f"disk_bytes: must be positive, got {self.disk_bytes}")
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or not (
            1 <= self.chunk_tokens <= 65536
        ):
            raise ValueError(f"chunk_tokens: must be an integer in 1..65536, got {self.chunk_tokens!r}")
        if self.disk_dir is not None:
            self.disk_dir = os.fspath(self.disk_dir)
            if not self.disk_dir:
                raise ValueError("disk_dir: must be a path or None")
        self.write_through = _parse_bool("write_through", self.write_through)
        self.sync_writes = _parse_bool("sync_writes", self.sync_writes)
        if self.io_backend not in ("auto", "io_uring", "threads"):
            raise ValueError(f"io_backend: must be 'auto', 'io_uring' or 'threads', got {self.io_backend!r}")
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or not 1 <= self.io_threads <= 64:
            raise ValueError(f"io_threads: must be an integer in 1..64, got {self.io_threads!r}")
        if self.hugepages not in ("off", "auto", "on"):
            raise ValueError(f"hugepages: must be 'off', 'auto' or 'on', got {self.hugepages!r}")
        self._check_remote()
        if not isinstance(self.eviction, str) or not self.eviction:
            raise ValueError(f"eviction: must be a policy name, got {self.eviction!r}")

    def _check_remote(self) -> None:
        from cachedattn.store.remote_url import parse_remote_url

        if self.remote is not None:
            parse_remote_url(self.remote)  # raises ValueError naming what is wrong
        self.remote_inflight_bytes = parse_size("remote_inflight_bytes", self.remote_inflight_bytes)
        if self.remote_inflight_bytes <= 0:
            raise ValueError(f"remote_inflight_bytes: must be positive, got {self.remote_inflight_bytes}")
        t = self.remote_ttl_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t <= 0):
            raise ValueError(f"remote_ttl_s: must be a positive integer (seconds) or None, got {t!r}")
        t = self.remote_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 60:
            raise ValueError(f"remote_timeout_s: must be a number of seconds in (0, 60], got {t!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> StoreConfig:
        """Fields from ``CACHEDATTN_<FIELD>`` (e.g. CACHEDATTN_HOST_BYTES=8G), then overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"CACHEDATTN_{f.name.upper()}")
            if raw is None:
                continue
            if f.name in ("chunk_tokens", "io_threads", "remote_ttl_s"):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"{f.name} (CACHEDATTN_{f.name.upper()}): not an integer: {raw!r}") from None
            elif f.name == "remote_timeout_s":
                try:
                    values[f.name] = float(raw)
                except ValueError:
                    raise ValueError(f"{f.name} (CACHEDATTN_{f.name.upper()}): not a number: {raw!r}") from None
            elif f.name in ("disk_dir", "remote"):
                values[f.name] = raw or None
            else:
                values[f.name] = raw
        values.update(overrides)
        return cls(**values)
