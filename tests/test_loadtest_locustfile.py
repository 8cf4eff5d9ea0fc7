"""The locustfile under real Locust processes (single and distributed) against a stub service.

The stub speaks the service's HTTP contract and remembers what it was sent, so these tests check the
replay's promises without a model: warm-up before the measured phase, each user's events in time
order and exactly once, never two requests of one user in flight at once, users partitioned across
workers, and a record per request.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from kvrec.loadtest.records import read_records
from kvrec.loadtest.streams import load_source

ROOT = Path(__file__).resolve().parents[1]
DATASET = "synth-short:users=10,mean_len=24"


class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.lock = threading.Lock()
        self.log: list[tuple] = []  # (kind, user, payload) in arrival order
        self.in_flight: set[str] = set()
        self.overlaps: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class StubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    def do_PUT(self) -> None:
        user = unquote(self.path.split("/")[2])
        body = self._body()
        with self.server.lock:
            self.server.log.append(("put", user, body["events"]))
        state = {"events_seen": len(body["events"]), "tokens_kept": 0, "bytes": 0, "source": "miss"}
        self._reply({"user_id": user, "policy": "stub", "timing_ms": {}, "state": state})

    def do_POST(self) -> None:
        body = self._body()
        if self.path == "/metrics/reset":
            with self.server.lock:
                self.server.log.append(("reset", None, None))
            return self._reply({"reset": True})
        user = body["user_id"]
        with self.server.lock:
            if user in self.server.in_flight:
                self.server.overlaps.append(user)
            self.server.in_flight.add(user)
            self.server.log.append(("recommend", user, body))
        time.sleep(0.02)  # long enough for a second request of the same user to overlap, were one sent
        with self.server.lock:
            self.server.in_flight.discard(user)
        items = body["candidates"] or [str(i) for i in range(body["k"])]
        self._reply({"user_id": user, "items": [{"item_id": str(i), "score": 0.0} for i in items[:body["k"]]],
                     "policy": "stub", "timing_ms": {"total": 1.0},
                     "state": {"events_seen": 0, "tokens_kept": 0, "bytes": 10, "source": "hit"}})


@pytest.fixture
def stub():
    server = Stub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def locust(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest/locustfile.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


REPLAY = ["--dataset", DATASET, "--events-per-request", "2", "--think-time", "0.05",
          "--replay-users", "6"]


def check_replay(stub: Stub, records: list[dict]) -> None:
    source = load_source(DATASET, prefix_fraction=0.5, max_users=6)
    futures = {s.user_id: s.future for s in source.streams}
    kinds = [k for k, _, _ in stub.log]
    assert kinds.count("put") == 6 and kinds.count("reset") == 1
    assert kinds.index("reset") > max(i for i, k in enumerate(kinds) if k == "put")  # warm-up, then reset
    assert kinds.index("recommend") > kinds.index("reset")
    assert {u: e for k, u, e in stub.log if k == "put"} == {s.user_id: s.prefix for s in source.streams}
    sent: dict[str, list] = {}
    for kind, user, body in stub.log:
        if kind == "recommend":
            sent.setdefault(user, []).extend(body["events"])
    assert sent, "no /recommend reached the stub"
    for user, events in sent.items():
        assert events == futures[user][: len(events)]  # in time order, each once, nothing skipped
    assert stub.overlaps == []
    assert len(records) == kinds.count("recommend")
    assert all(r["ok"] and r["policy"] == "stub" and len(r["top10"]) == 10 for r in records)


@pytest.mark.slow
def test_headless_replay_warms_up_and_replays_each_user_in_order(stub, tmp_path):
    recs = tmp_path / "recs.jsonl"
    proc = locust("--headless", "-u", "3", "-r", "3", "-t", "4s", "--host", stub.url, "--records", str(recs),
                  *REPLAY)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    check_replay(stub, read_records(recs))


@pytest.mark.slow
def test_distributed_workers_replay_disjoint_users(stub, tmp_path):
    recs = tmp_path / "recs.jsonl"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    master = locust("--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
                    "--expect-workers", "2", "--headless", "-u", "4", "-r", "4", "-t", "4s",
                    "--host", stub.url, "--records", str(recs), *REPLAY)
    workers = [locust("--worker", "--master-host", "127.0.0.1", "--master-port", port) for _ in range(2)]
    try:
        out, _ = master.communicate(timeout=120)
        assert master.returncode == 0, out
    finally:
        for w in workers:
            try:
                w.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
    files = sorted(tmp_path.glob("recs.worker*.jsonl"))
    per_worker = [{r["user_id"] for r in read_records(f)} for f in files]
    assert len(per_worker) == 2 and all(per_worker) and not per_worker[0] & per_worker[1]
    assert not recs.exists()  # the master sends no requests and writes no records
    check_replay(stub, read_records(recs))


@pytest.mark.slow
def test_step_load_shape_adds_users_per_step_and_ends_the_test(stub, tmp_path):
    recs = tmp_path / "recs.jsonl"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest/stepload.py"), "--headless",
           "--host", stub.url, "--records", str(recs), "--step-users", "1", "--step-seconds", "1.5", "--steps", "2",
           *REPLAY]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert "Shape test completed" in proc.stderr or "shape" in proc.stderr.lower()
    records = read_records(recs)
    assert records and all(r["ok"] for r in records)
    assert max(r["t"] for r in records) - min(r["t"] for r in records) < 4  # 2 steps of 1.5 s, then it ends
