"""Faults of a real Redis process under the service, each bounded in time: a stall (SIGSTOP) longer than
the socket timeout and one within the retry budget, kill -9 and restart with AOF and without any
persistence, and memory pressure (maxmemory with volatile-lru). The invariants: no acknowledged event
lost where Redis keeps data, no event ever twice, 503s that arrive within the budget and say what was
written, a process that stays up, and a loss of data that is detected and reported."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from kvrec.server.embedded_redis import free_port, redis_server_binary

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]

FAST = dict(redis_timeout_s=0.3, redis_retries=1, redis_watch_s=0.1, metrics_flush_s=0.05)
BUDGET_S = 0.3 * 2 + 0.5  # (retries + 1) x timeout, and slack for a busy machine


class RedisProcess:
    """A redis-server of the test's own on a fixed port, which the test may pause (SIGSTOP), kill
    (SIGKILL) and start again: with `aof`, every write is fsynced before Redis answers it."""

    def __init__(self, workdir: Path, aof: bool = False, maxmemory: str | None = None,
                 policy: str = "noeviction"):
        self.port = free_port()
        self.args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir),
                     "--save", "", "--appendonly", "yes" if aof else "no", "--appendfsync", "always",
                     "--maxmemory-policy", policy, "--loglevel", "warning"]
        if maxmemory:
            self.args += ["--maxmemory", maxmemory]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> RedisProcess:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + 10
        with redis.Redis.from_url(self.url, socket_connect_timeout=0.5) as probe:
            while True:
                try:
                    if probe.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.05)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.kill()
            self.process.wait()


@pytest.fixture
def redis_process(tmp_path):
    """`redis_process(aof=True, maxmemory="3mb", policy="volatile-lru")`: started; stopped afterwards."""
    made = []

    def make(**options) -> RedisProcess:
        made.append(RedisProcess(tmp_path, **options).start())
        return made[-1]

    yield make
    for process in made:
        process.stop()


def one(user: str, item: str, ts: int) -> dict:
    return {"user_id": user, "events": [{"item_id": item, "ts": ts}], "k": 3}


def logged(server: RedisProcess, user: str, prefix: str) -> list[str]:
    with server.client() as r:
        return [e[10:].decode() for e in r.lrange(f"{prefix}:{{{user}}}:events", 0, -1)]


async def test_stall_longer_than_the_timeout_appends_once_and_says_so(client_for, redis_process, key_prefix):
    server = redis_process()
    async with client_for(redis_url=server.url, **FAST) as client:
        assert (await client.post("/recommend", json=one("one-3", "1", 1))).status_code == 200
        server.pause()
        clock = time.monotonic()
        r = await client.post("/recommend", json=one("one-3", "2", 2), headers={"Idempotency-Key": "k2"})
        assert time.monotonic() - clock < BUDGET_S
        assert r.status_code == 503 and r.json()["written"] == "unknown" and r.json()["idempotency_key"] == "k2"
        assert "retry with the same Idempotency-Key" in r.json()["detail"]
        await asyncio.sleep(1.0)  # the stall outlasts the request; redis-py's retry is queued behind it
        server.resume()
        r = await client.post("/recommend", json=one("one-3", "2", 2), headers={"Idempotency-Key": "k2"})
        assert r.status_code == 200 and r.json()["replayed"]  # the stalled script ran: nothing appended again
        r = await client.post("/recommend", json=one("one-3", "3", 3))
        assert r.json()["state"]["events_seen"] == 3
    assert logged(server, "one-3", key_prefix) == ["1", "2", "3"]


async def test_stall_within_the_retry_budget_appends_once(client_for, redis_process, key_prefix):
    server = redis_process()
    async with client_for(redis_url=server.url, redis_timeout_s=0.4, redis_retries=3) as client:
        await client.post("/recommend", json=one("u", "1", 1))
        server.pause()
        two = asyncio.create_task(client.post("/recommend", json={**one("u", "2", 2), "events": [
            {"item_id": "2", "ts": 2}, {"item_id": "3", "ts": 3}]}))
        await asyncio.sleep(0.6)  # the first attempt timed out and the retry waits behind it
        server.resume()
        r = await two
        assert r.status_code == 200, r.text  # not the false 422 "earlier than the user's last event"
        assert r.json()["state"]["events_seen"] == 3
    assert logged(server, "u", key_prefix) == ["1", "2", "3"]


async def test_a_long_stall_is_503_within_the_budget_and_counted(client_for, redis_process, key_prefix):
    server = redis_process()
    async with client_for(redis_url=server.url, **FAST) as client:
        assert (await client.post("/recommend", json=one("u", "0", 0))).status_code == 200
        server.pause()
        clock = time.monotonic()
        stalled = await asyncio.gather(*(client.post("/recommend", json=one(f"u{i}", "1", 1)) for i in range(6)),
                                       client.post("/recommend", json={"user_id": "u", "k": 3}))
        assert time.monotonic() - clock < BUDGET_S + 0.5  # concurrently, not one after the other
        assert [r.status_code for r in stalled] == [503] * 7
        assert [r.json()["written"] for r in stalled] == ["unknown"] * 6 + ["nothing"]  # the last had no events
        clock = time.monotonic()
        assert (await client.get("/readyz")).status_code == 503
        assert time.monotonic() - clock < 0.3 + 0.3  # /readyz waits one timeout at most
        assert (await client.get("/healthz")).status_code == 200
        await asyncio.sleep(1.5)
        server.resume()
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/recommend", json=one("u", "2", 2))).status_code == 200
        # the client's part: retry each 503 with its key. Some scripts reached Redis and ran when it
        # resumed, some never left (their connection's handshake timed out); each event is logged once
        retried = await asyncio.gather(*(client.post("/recommend", json=one(f"u{i}", "1", 1), headers={
            "Idempotency-Key": r.json()["idempotency_key"]}) for i, r in enumerate(stalled[:6])))
        assert [r.status_code for r in retried] == [200] * 6
        m = (await client.get("/metrics")).json()
    assert m["requests"]["by_status"] == {"200": 8, "503": 7}  # counted while Redis was stalled, added after
    for i in range(6):
        assert logged(server, f"u{i}", key_prefix) == ["1"]


@pytest.mark.parametrize("aof", [True, False], ids=["aof", "no persistence"])
async def test_kill_and_restart(client_for, redis_process, key_prefix, aof, caplog):
    server = redis_process(aof=aof)
    acknowledged = []
    async with client_for(redis_url=server.url, **FAST) as client:
        for i in range(20):
            r = await client.post("/recommend", json=one("u", str(i), i))
            assert r.status_code == 200
            acknowledged.append(str(i))
        before = (await client.get("/metrics")).json()["redis"]
        server.kill()
        r = await client.post("/recommend", json=one("u", "x", 100))
        assert r.status_code == 503 and r.json()["written"] in ("unknown", "nothing")
        server.start()
        await asyncio.sleep(0.5)  # the watch (every 0.1 s) sees the new run id
        m = (await client.get("/metrics")).json()
        r = await client.post("/recommend", json=one("u", "20", 200))
        assert r.status_code == 200
    assert m["redis"]["run_id"] != before["run_id"] and m["redis"]["restarts"] == 1
    assert m["redis"]["persistent"] is aof
    if aof:
        assert logged(server, "u", key_prefix) == [*acknowledged, "20"]  # nothing acknowledged was lost
        assert m["redis"]["data_lost"] == 0
    else:
        assert logged(server, "u", key_prefix) == ["20"]  # the log is gone, and that is said
        assert m["redis"]["data_lost"] == 1 and m["redis"]["lost_at"] > 0
        assert any(r.levelno == logging.ERROR and "keeps no data over a restart" in r.getMessage()
                   for r in caplog.records)
        assert r.json()["state"]["source"] == "miss"


async def test_memory_pressure_refuses_writes_whole(client_for, redis_process, key_prefix):
    """Logs have no TTL, so volatile-lru can evict only states, request ids and metrics: memory fills up
    with logs. Every write is then either applied whole or, answered 503 `written: nothing`, not at all:
    replacing a history never deletes the old log and then fails to write the new one."""
    server = redis_process(maxmemory="3mb", policy="volatile-lru")

    def history(tag: str) -> list[dict]:  # long item ids: 130 KB of log a history
        return [{"item_id": f"{tag}{i:0120d}", "ts": i} for i in range(1000)]

    def memory() -> tuple[int, int]:
        with server.client() as raw:
            info = raw.info("memory")
        return info["used_memory"], info["maxmemory"]

    refusals = {"new user": 0, "replace": 0, "append": 0}
    async with client_for(redis_url=server.url, redis_timeout_s=2.0) as client:
        assert (await client.put("/users/keep/history", json={"events": history("k")[:10]})).status_code == 200
        for i in range(80):
            kind = ["new user", "replace", "append"][i % 3]
            user = f"u{i}" if kind == "new user" else "keep"
            before = logged(server, user, key_prefix)
            if kind == "append":
                ts = int(before[-1][-120:]) + 1 if before else 0
                r = await client.post("/recommend", json=one(user, f"a{ts:0120d}", ts))
                new = [*before, f"a{ts:0120d}"]
            else:
                new = [e["item_id"] for e in history(str(i))]
                r = await client.put(f"/users/{user}/history", json={"events": history(str(i))})
            if r.status_code == 503:
                assert r.json()["written"] == "nothing" and "out of memory" in r.json()["detail"], r.text
                assert logged(server, user, key_prefix) == before  # the old log intact
                refusals[kind] += 1
            else:
                assert r.status_code == 200, r.text
                assert logged(server, user, key_prefix) == new
            used, limit = memory()
            assert used < limit + 512 * 1024  # over by at most about one write, never a runaway
            if refusals["new user"] >= 2 and refusals["replace"] >= 2:
                break
        # an append of one event mostly gets in: Redis first evicts volatile keys (request ids, metrics)
        assert refusals["new user"] >= 2 and refusals["replace"] >= 2, refusals
        r = await client.post("/recommend", json={"user_id": "keep", "k": 3})  # reads still serve
        assert r.status_code == 200
        assert (await client.delete("/users/u0")).status_code == 200  # a delete frees memory; it is allowed
        m = (await client.get("/metrics")).json()
    assert m["redis"]["maxmemory"] == 3 * 2**20
