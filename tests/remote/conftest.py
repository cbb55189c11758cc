import pytest

from tests.remote.redis_servers import RedisCluster, RedisSentinel, RedisServer, need_redis


@pytest.fixture
def redis_server(tmp_path):
    need_redis()
    srv = RedisServer(tmp_path)
    yield srv
    srv.stop()


@pytest.fixture
def redis_lru(tmp_path):
    """A small Redis that evicts (allkeys-lru) once 2 MB are used."""
    need_redis()
    srv = RedisServer(tmp_path, "maxmemory 2mb", "maxmemory-policy allkeys-lru")
    yield srv
    srv.stop()


@pytest.fixture
def redis_cluster(tmp_path):
    need_redis()
    c = RedisCluster(tmp_path)
    yield c
    c.stop()


@pytest.fixture
def redis_sentinel(tmp_path):
    need_redis()
    s = RedisSentinel(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def redis_full(tmp_path):
    """A Redis that refuses writes once 1.5 MB are used (noeviction: `OOM command not allowed`)."""
    need_redis()
    srv = RedisServer(tmp_path, "maxmemory 1500kb", "maxmemory-policy noeviction")
    yield srv
    srv.stop()
