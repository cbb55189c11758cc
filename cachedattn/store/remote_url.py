"""Where the remote tier lives: a Redis URL, checked when the store is configured
(no connection needed) and turned into a client of the official `redis` package
when the store attaches to a model.

    redis://[:password@]host:port[/db]      one server (rediss:// for TLS)
    redis+cluster://h1:p1,h2:p2,...         a Redis Cluster (any reachable nodes)
    redis+sentinel://h1:p1,h2:p2/service    the master that Sentinel names for `service`
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SCHEMES = ("redis", "rediss", "redis+cluster", "redis+sentinel")


@dataclass(frozen=True)
class RemoteURL:
    url: str
    scheme: str
    nodes: tuple[tuple[str, int], ...]
    password: str | None
    db: int
    service: str | None  # sentinel only

    @property
    def cluster(self) -> bool:
        return self.scheme == "redis+cluster"


def _bad(url: str, why: str) -> ValueError:
    return ValueError(
        f"remote: {why} in {url!r}; expected redis://host:port[/db], redis+cluster://h1:p1,h2:p2 "
        "or redis+sentinel://h1:p1,h2:p2/service"
    )


def parse_remote_url(url) -> RemoteURL:
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"remote: expected a Redis URL string, got {url!r}")
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise _bad(url, f"unknown scheme {scheme!r}")
    scheme = scheme.lower()
    parts = urlsplit(f"redis://{rest}")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    password = unquote(userinfo.partition(":")[2] or userinfo) if at and userinfo else None
    if not hosts:
        raise _bad(url, "no host")
    nodes = []
    for h in hosts.split(","):
        host, colon, port = h.rpartition(":") if ":" in h else (h, "", "6379")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _bad(url, f"bad host:port {h!r}")
        nodes.append((host, int(port)))
    path = [p for p in parts.path.split("/") if p]
    service, db = None, 0
    if scheme == "redis+sentinel":
        if not path:
            raise _bad(url, "no sentinel service name (…/service)")
        service, path = path[0], path[1:]
    if path:
        if len(path) > 1 or not path[0].isdigit():
            raise _bad(url, f"bad database {'/'.join(path)!r}")
        db = int(path[0])
    if scheme in ("redis", "rediss") and len(nodes) != 1:
        raise _bad(url, "several hosts (use redis+cluster:// or redis+sentinel://)")
    if scheme == "redis+cluster" and db:
        raise _bad(url, "a database number (a cluster has only database 0)")
    return RemoteURL(url, scheme, tuple(nodes), password, db, service)


def make_client(u: RemoteURL, timeout_s: float):
    """A client that fails fast (no retries of its own: the tier retries with backoff)."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError as e:  # the package is a dependency; say so rather than fail obscurely
        raise RuntimeError("the remote tier needs the `redis` package (pip install redis)") from e
    # Chunks are megabytes: read them in large pieces (the default 64 KiB costs a copy per piece).
    common = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, password=u.password, socket_read_size=4 << 20)
    if u.cluster:
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in u.nodes],
            require_full_coverage=False,  # a shard down costs its keys, not the whole cluster
            retry=Retry(NoBackoff(), 1),
            **common,
        )
    if u.scheme == "redis+sentinel":
        from redis.sentinel import Sentinel

        sentinel = Sentinel(list(u.nodes), socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return sentinel.master_for(u.service, db=u.db, retry=Retry(NoBackoff(), 0), **common)
    return redis.Redis(
        host=u.nodes[0][0], port=u.nodes[0][1], db=u.db, ssl=u.scheme == "rediss", retry=Retry(NoBackoff(), 0), **common
    )
