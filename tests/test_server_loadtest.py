"""The load harness against a service that asks for a bearer token (KVREC_API_TOKEN) and answers 503s:
the warm-up and the Locust users send the token and an Idempotency-Key per request, and send a 503 once
more with the same key; a sweep runs with the token set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import pytest
from conftest import SWEEP_DATASET
from kvrec.loadtest.options import ReplayOptions
from kvrec.loadtest.records import read_records
from kvrec.loadtest.sweep import Server, SweepConfig, run_sweep
from kvrec.loadtest.warmup import RETRY_AFTER_S
from test_loadtest_locustfile import REPLAY, ROOT, Stub, StubHandler

pytestmark = pytest.mark.slow
TOKEN = "sweep-secret"


class FlakyHandler(StubHandler):
    """The stub service, noting each request's Authorization, and answering each /recommend 503 the first
    time its Idempotency-Key comes."""

    def do_PUT(self) -> None:
        self._note()
        super().do_PUT()

    def do_POST(self) -> None:
        key = self._note()
        if self.path == "/recommend":
            with self.server.lock:
                self.server.keys[key] = self.server.keys.get(key, 0) + 1
                first = self.server.keys[key] == 1
            if first:
                self._body()
                return self._reply({"detail": "Redis is unavailable", "written": "unknown"}, 503)
        super().do_POST()

    def _note(self) -> str | None:
        with self.server.lock:
            self.server.auth.add(self.headers.get("Authorization"))
        return self.headers.get("Idempotency-Key")


class FlakyStub(Stub):
    def __init__(self):
        super().__init__()
        self.RequestHandlerClass = FlakyHandler
        self.keys: dict[str, int] = {}  # Idempotency-Key -> /recommend requests that carried it
        self.auth: set[str | None] = set()  # every Authorization header seen


def test_locust_sends_the_token_and_a_key_and_retries_a_503_once_with_it(tmp_path):
    stub = FlakyStub()
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    recs = tmp_path / "recs.jsonl"
    try:
        cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest/locustfile.py"), "--headless", "-u", "2",
               "-r", "2", "-t", "3s", "--host", stub.url, "--records", str(recs), "--exit-code-on-error", "0",
               "--stop-timeout", "2", *REPLAY]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "KVREC_API_TOKEN": TOKEN}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr
    finally:
        stub.shutdown()
    records = read_records(recs)
    assert stub.auth == {f"Bearer {TOKEN}"}  # warm-up PUTs, the reset and every /recommend
    answered = [k for k, n in stub.keys.items() if n == 2]
    assert all(k and n <= 2 for k, n in stub.keys.items())  # a key per request, retried once at most
    assert len(records) == len(answered) > 0  # one record per request, the retry's
    assert all(r["ok"] and r["latency_ms"] >= RETRY_AFTER_S * 1000 for r in records)  # timed from the 1st try


@pytest.mark.redis
def test_a_sweep_runs_with_the_api_token_set(sweep_model, tmp_path, monkeypatch):
    """The token reaches the server (an unauthenticated write is refused) and every client of the sweep."""
    monkeypatch.setenv("KVREC_API_TOKEN", TOKEN)
    refused = []
    read = Server.metrics

    def probe_then_read(server: Server) -> dict:
        refused.append(httpx.post(f"{server.url}/recommend", json={"user_id": "x", "events": []}).status_code)
        return read(server)

    monkeypatch.setattr(Server, "metrics", probe_then_read)
    out = tmp_path / "sweep"
    rows = run_sweep(SweepConfig(model=sweep_model, policies=["full"], out=out, users=2, spawn_rate=2, duration_s=4,
                                 replay=ReplayOptions(dataset=SWEEP_DATASET)), echo=lambda line: None)
    assert refused == [401] and rows[0]["rps"] > 0
    records = read_records(out / "policies" / "01-full" / "records.jsonl")
    assert records and all(r["ok"] for r in records)
    metrics = json.loads((out / "policies" / "01-full" / "metrics.json").read_text())
    assert metrics["requests"]["by_status"] == {"200": len(records), "401": 1}
