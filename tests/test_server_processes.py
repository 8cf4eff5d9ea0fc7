"""`kvrec serve` as a real process: several workers sharing metrics through Redis, the embedded
redis-server, and the startup errors an operator sees."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import redis
from kvrec.server.embedded_redis import free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]

KVREC = [sys.executable, "-m", "kvrec.cli"]


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVREC_") and k != "REDIS_URL"}
    return {**env, **extra}


@contextmanager
def serving(args: list[str], env: dict | None = None):
    """Run `kvrec serve ARGS` on a free port until /readyz answers; SIGTERM it afterwards."""
    port = free_port()
    proc = subprocess.Popen([*KVREC, "serve", "--port", str(port), "--log-level", "warning", *args],
                            env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # two workers importing torch on a busy 2-core machine
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"kvrec serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "kvrec serve did not become ready"
            time.sleep(0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()


def test_metrics_are_the_same_totals_from_every_worker(tiny_checkpoint, private_redis):
    args = ["--model", str(tiny_checkpoint), "--policy", "int8", "--workers", "2", "--redis-url",
            private_redis.url]
    with serving(args) as (base, _):
        with httpx.Client(base_url=base, timeout=10) as client:
            client.post("/metrics/reset")
            for i in range(40):  # a fresh connection each time, so both workers answer some
                r = httpx.post(f"{base}/recommend", json={
                    "user_id": f"u{i % 8}", "events": [{"item_id": str(i % 50), "ts": i}], "k": 5})
                assert r.status_code == 200, r.text
            httpx.post(f"{base}/recommend", json={"user_id": "u0", "k": 0})
            time.sleep(1.0)  # each worker adds its counts to Redis every metrics_flush_s (0.25 s)
            reports = [httpx.get(f"{base}/metrics", timeout=10).json() for _ in range(12)]
    for m in reports:
        assert m["requests"] == {"total": 41, "by_status": {"200": 40, "422": 1}}
        assert m["latency_ms"]["total"]["count"] == 40
        assert m["cache"]["misses"] == 8 and m["cache"]["hits"] == 32
        assert m["state"]["users"] == 8
        assert m["accuracy"]["evaluated"] == 32
        assert m["policy"] == "int8"


def test_embedded_redis_is_started_and_stopped(tiny_checkpoint):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on the PATH")
    with serving(["--model", str(tiny_checkpoint)]) as (base, _):
        r = httpx.post(f"{base}/recommend", json={"user_id": "u", "events": [{"item_id": "1", "ts": 1}]})
        assert r.status_code == 200, r.text
        url = httpx.get(f"{base}/metrics").json()["redis"]["url"]
        assert url != "redis://127.0.0.1:6379/0"
        embedded = redis.Redis.from_url(url, socket_connect_timeout=1)
        assert embedded.ping()
    deadline = time.monotonic() + 10
    while True:  # stopped with the service
        try:
            embedded.ping()
        except redis.ConnectionError:
            break
        assert time.monotonic() < deadline, "the embedded redis-server outlived kvrec serve"
        time.sleep(0.1)
    embedded.close()


@pytest.mark.parametrize("case", ["missing model", "bad policy", "a WAIT longer than the socket timeout"])
def test_startup_errors_are_one_clear_line(tiny_checkpoint, tmp_path, case, private_redis):
    model, policy = (str(tmp_path / "absent.ckpt"), "full") if case == "missing model" else (
        str(tiny_checkpoint), "h2o:budgett=3" if case == "bad policy" else "full")
    more = ["--redis-url", private_redis.url, "--redis-wait-replicas", "1", "--redis-wait-timeout-ms", "5000"]
    r = subprocess.run([*KVREC, "serve", "--model", model, "--policy", policy, *more], env=clean_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    if case == "missing model":
        assert str(tmp_path / "absent.ckpt") in r.stderr and "kvrec train" in r.stderr
    elif case == "bad policy":
        assert "budgett" in r.stderr
    else:
        assert "redis_wait_timeout_ms (5000) must be below redis_timeout_s" in r.stderr


@pytest.mark.parametrize("hot_tier", [True, False], ids=["hot tier", "no hot tier"])
def test_bench_serve_runs(tiny_checkpoint, tmp_path, hot_tier):
    """Every stage timed; with the hot tier nothing is decoded (the users are held), without it `full` and
    int8 decode the stored blob."""
    out = tmp_path / "bench.json"
    r = subprocess.run([*KVREC, "bench", "serve", "--model", str(tiny_checkpoint), "--lengths", "20,40",
                        "--policies", "full;int8;recompute", "--requests", "3", "--seconds", "1",
                        "--redis-url", "redis://127.0.0.1:6379/0", "--json", str(out),
                        *([] if hot_tier else ["--hot-tier-bytes", "0"])],
                       env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "vs recomp" in r.stdout and "codec" in r.stdout
    assert ("hot tier 268435456 bytes" if hot_tier else "hot tier off") in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(row["length"], row["policy"]) for row in rows] == [
        (n, p) for n in (20, 40) for p in ("full", "int8", "recompute")]
    for row in rows:
        assert row["requests"] >= 3 and row["ms"]["total"] > 0
        assert row["speedup_vs_recompute"] > 0
        assert (row["blob_bytes"] > 0) == (row["policy"] != "recompute")
        assert (row["ms"]["decode"] > 0) == (row["policy"] != "recompute" and not hot_tier), row
    assert not redis.Redis().keys("kvrec-bench-*")  # it cleans up after itself


def test_huge_bodies_beside_small_requests(tiny_checkpoint, private_redis):
    """A 50 MB body, announced or streamed, is refused (413) without being read whole, and small requests
    are answered meanwhile, also while a body at the limit (4 MiB) is parsed."""
    with serving(["--model", str(tiny_checkpoint), "--redis-url", private_redis.url]) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        head = b"POST /recommend HTTP/1.1\r\nHost: kvrec\r\nContent-Type: application/json\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # announced: answered at once
            s.sendall(head + b"Content-Length: 52428800\r\n\r\n" + b"{" * 65536)
            assert s.recv(4096).startswith(b"HTTP/1.1 413 ")

        def streamed() -> bytes:
            """50 MB in 1 MiB chunks without a length; the answer comes once the limit is passed."""
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
                try:
                    for _ in range(50):
                        s.sendall(b"100000\r\n" + b" " * 2**20 + b"\r\n")
                except OSError:  # the server answered and closed while we were still sending
                    pass
                return s.recv(4096)

        at_limit = b'{"user_id": "u", ' + b", ".join(b'"k%d": 0' % i for i in range(300_000)) + b"}"
        assert 3.5 * 2**20 < len(at_limit) < 4 * 2**20
        with ThreadPoolExecutor(2) as pool:
            big = pool.submit(streamed)
            near = pool.submit(lambda: httpx.post(f"{base}/recommend", content=at_limit, timeout=60))
            slowest = 0.0
            for i in range(30):
                clock = time.monotonic()
                r = httpx.post(f"{base}/recommend", json={"user_id": f"s{i}", "events": [{"item_id": "1", "ts": 1}]},
                               timeout=10)
                slowest = max(slowest, time.monotonic() - clock)
                assert r.status_code == 200, r.text
            assert big.result().startswith(b"HTTP/1.1 413 ")
            r = near.result()
        assert r.status_code == 422 and r.json()["errors"][0]["type"] == "extra_forbidden"
        assert len(r.json()["errors"]) == 20  # not 300,000
        assert slowest < 3.0, f"a small request waited {slowest:.2f} s"
        by_status = httpx.get(f"{base}/metrics").json()["requests"]["by_status"]
        assert by_status == {"200": 30, "413": 2, "422": 1}
