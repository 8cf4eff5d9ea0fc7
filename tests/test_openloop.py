"""The open loop: arrival schedules, the dispatcher's rules, and real Locust runs against a service that
can answer only one request at a time (a stub with a fixed service time, so its capacity is known).

What the open loop is for is checked on that stub: above its capacity, latency measured from each
request's intended send time grows with the queue, while a closed loop against the same stub reports a
latency near the service time (it slows down with the service instead: coordinated omission).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from kvrec.loadtest import report
from kvrec.loadtest.arrivals import LATE_S, NO_STREAM_LEFT, RUN_ENDED, Dispatcher, arrival_offsets
from kvrec.loadtest.capacity import Step, find_capacity, judge
from kvrec.loadtest.options import ReplayOptions
from kvrec.loadtest.records import read_records
from kvrec.loadtest.streams import Pacing, StreamPool, UserStream, plan_requests
from kvrec.loadtest.sweep import SweepConfig, run_locust
from test_loadtest_locustfile import StubHandler

ROOT = Path(__file__).resolve().parents[1]
DATASET = "synth-short:users=12,mean_len=60"


# ------------------------------------------------------------------------------------------- schedules


def take(it, n):
    return [next(it) for _ in range(n)]


def test_constant_arrivals_are_evenly_spaced_and_processes_interleave():
    assert take(arrival_offsets(4.0, "constant"), 4) == [0.0, 0.25, 0.5, 0.75]
    # two processes at half the rate each, phased by 1/rate: together one even schedule at the rate
    merged = sorted(take(arrival_offsets(2.0, "constant", phase=0.0), 4)
                    + take(arrival_offsets(2.0, "constant", phase=0.25), 4))
    assert merged == pytest.approx([i * 0.25 for i in range(8)])


def test_the_report_counts_late_as_the_dispatcher_does():
    assert report.LATE_MS == LATE_S * 1000  # one threshold (report.py keeps torch out of its imports)


def test_poisson_arrivals_have_the_rate_exponential_gaps_and_a_seed():
    times = take(arrival_offsets(50.0, "poisson", seed=3), 20_000)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(1 / 50, rel=0.05)  # exponential: sd == mean
    assert times == sorted(times)
    assert take(arrival_offsets(50.0, "poisson", seed=3), 5) == times[:5]
    assert take(arrival_offsets(50.0, "poisson", seed=4), 5) != times[:5]
    with pytest.raises(ValueError, match="positive"):
        next(arrival_offsets(0.0, "constant"))
    with pytest.raises(ValueError, match="arrivals"):
        next(arrival_offsets(1.0, "bursty"))


# ------------------------------------------------------------------------------------------ dispatcher


def pool_of(users: int, requests: int) -> StreamPool:
    def stream(uid):
        events = [{"item_id": str(i), "ts": i, "action": 0} for i in range(2 * requests)]
        return UserStream(uid, events[:requests], events[requests:])

    return StreamPool([stream(f"u{i}") for i in range(users)],
                      lambda s: plan_requests(s, events_per_request=1, negatives=None, catalogue=["0"],
                                              pacing=Pacing()))


class Harness:
    """A dispatcher whose "greenlets" run only when the test says so, and whose clock the test sets."""

    def __init__(self, users: int, requests: int, max_in_flight: int):
        self.now = 100.0
        self.spawned, self.sent, self.unsent = [], [], []
        self.d = Dispatcher(pool_of(users, requests), self.sent.append, lambda fn, dep: self.spawned.append((fn, dep)),
                            lambda t, why: self.unsent.append((t, why)), max_in_flight=max_in_flight,
                            clock=lambda: self.now)

    def finish(self, i: int = 0):
        fn, dep = self.spawned.pop(i)
        fn(dep)
        return dep

    def in_flight_users(self):
        return [dep.lease.stream.user_id for _, dep in self.spawned]


def test_a_due_request_leaves_at_once_with_the_user_idle_longest():
    h = Harness(users=3, requests=5, max_in_flight=10)
    for t in (100.0, 100.0, 100.0):
        h.d.arrive(t)
    assert h.in_flight_users() == ["u0", "u1", "u2"]
    h.finish(1)  # u1 answered: it goes to the back of the queue, behind nobody (u0, u2 in flight)
    h.finish(0)  # then u0
    h.d.arrive(100.0)
    assert h.in_flight_users() == ["u2", "u1"]  # u1 idle longest
    assert h.d.counts.late == 0 and h.d.counts.waited == 0


def test_no_user_has_two_requests_in_flight_and_a_waiting_request_is_charged_for_the_wait():
    h = Harness(users=2, requests=5, max_in_flight=10)
    h.d.arrive(100.0)
    h.d.arrive(100.0)
    h.d.arrive(100.0)  # both users busy: it waits
    assert h.in_flight_users() == ["u0", "u1"] and h.d.counts.waited == 1 and list(h.d.backlog) == [100.0]
    h.now = 100.5
    h.finish(0)  # u0 answers half a second later: the waiting request leaves with u0, late
    assert h.in_flight_users() == ["u1", "u0"]
    dep = h.spawned[-1][1]
    assert dep.intended == 100.0 and dep.lag_s == pytest.approx(0.5) and h.d.counts.late == 1
    assert [r.index for r in (h.spawned[-1][1].request,)] == [1]  # u0's second request, in order


def test_max_in_flight_bounds_concurrency():
    h = Harness(users=10, requests=5, max_in_flight=3)
    for _ in range(5):
        h.d.arrive(100.0)
    assert len(h.spawned) == 3 and len(h.d.backlog) == 2
    h.finish()
    assert len(h.spawned) == 3 and len(h.d.backlog) == 1


def test_requests_left_at_the_end_or_past_every_stream_are_reported_unsent():
    h = Harness(users=1, requests=2, max_in_flight=10)
    h.d.arrive(100.0)
    h.d.arrive(100.1)  # waits for u0
    in_flight = h.d.close()
    assert [d.intended for d in in_flight] == [100.0] and h.unsent == [(100.1, RUN_ENDED)]
    h2 = Harness(users=1, requests=1, max_in_flight=10)
    h2.d.arrive(100.0)
    h2.d.arrive(100.2)
    h2.finish()  # u0's only request answered: the stream is done, nothing can carry the waiting one
    assert h2.unsent == [(100.2, NO_STREAM_LEFT)] and h2.d.counts.unsent == 1
    h2.d.arrive(100.3)
    assert h2.unsent[-1] == (100.3, NO_STREAM_LEFT)


# ------------------------------------------------------------------------------- Locust against a stub


class SerialStub(ThreadingHTTPServer):
    """The service's HTTP contract with one request served at a time, each taking `service_s`:
    capacity 1/service_s requests per second, whatever the client does."""

    daemon_threads = True

    def __init__(self, service_s: float):
        super().__init__(("127.0.0.1", 0), SerialHandler)
        self.service_s = service_s
        self.lock = threading.Lock()
        self.served = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up at the end of its run (a cut-off request) is no failure here


class SerialHandler(StubHandler):
    """The locustfile test's stub, answering one request at a time after `service_s`."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the real service

    def do_PUT(self) -> None:
        self._body()
        self._reply({"state": {}})

    def do_POST(self) -> None:
        body = self._body()
        if self.path == "/metrics/reset":
            return self._reply({"reset": True})
        with self.server.lock:
            time.sleep(self.server.service_s)
            self.server.served += 1
        items = [{"item_id": str(i), "score": 0.0} for i in range(body["k"])]
        self._reply({"user_id": body["user_id"], "items": items, "policy": "stub", "timing_ms": {"total": 1.0},
                     "state": {"events_seen": 0, "tokens_kept": 0, "bytes": 10, "source": "hit"}})


@pytest.fixture
def serial_stub():
    servers = []

    def start(service_s: float) -> SerialStub:
        server = SerialStub(service_s)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


def locust_run(locustfile: str, host: str, records: Path, *args: str, seconds: float = 3) -> str:
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / locustfile), "--headless",
           "-t", f"{seconds}s", "--host", host, "--records", str(records), "--dataset", DATASET,
           "--replay-users", "12", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
def test_open_loop_above_capacity_shows_the_queue_that_a_closed_loop_hides(serial_stub, tmp_path):
    """Capacity 25 requests/s (40 ms each, one at a time). Offered 50/s for 3 s, the backlog grows by
    25 requests a second, so requests due late in the run wait about a second: p99 far above the service
    time. A closed loop of 2 users against the same stub sees at most one request ahead of its own."""
    stub = serial_stub(0.040)
    log = locust_run("openloop.py", stub.url, tmp_path / "open.jsonl", "-u", "1", "-r", "1", "--rate", "50",
                     "--stop-timeout", "5")
    assert "open loop:" in log
    opened = sorted(read_records(tmp_path / "open.jsonl"), key=lambda r: r["intended_t"])
    sent = [r for r in opened if not r["unsent"]]
    assert 120 <= len(opened) <= 160  # ~50/s for 3 s were due, each recorded once, answered or not
    assert all(r["ok"] for r in sent) and all(r["intended_t"] is not None for r in opened)
    for r in sent:  # latency counts from the intended time: what it waited to leave plus the answer
        assert r["latency_ms"] == pytest.approx(max(r["send_lag_ms"], 0) + r["response_ms"])
    open_stats = report.client_stats(opened)
    assert open_stats["p99_ms"] > 500  # the queue: ~1 s by the end of the run
    assert max(r["latency_ms"] for r in sent[-10:]) > max(r["latency_ms"] for r in sent[:10])  # it grew

    stub2 = serial_stub(0.040)
    locust_run("locustfile.py", stub2.url, tmp_path / "closed.jsonl", "-u", "2", "-r", "2", "--skip-warm-up")
    closed_stats = report.client_stats(read_records(tmp_path / "closed.jsonl"))
    assert closed_stats["p99_ms"] < 250  # ~80 ms: the one request ahead of it, whatever was "offered"
    assert open_stats["p99_ms"] > 3 * closed_stats["p99_ms"]


@pytest.mark.slow
def test_open_loop_below_capacity_keeps_the_rate_and_the_service_time(serial_stub, tmp_path):
    """10/s against a capacity of 50/s: every request leaves on time (poisson too), about 10 per second
    arrive, and latency stays near the service time."""
    stub = serial_stub(0.020)
    locust_run("openloop.py", stub.url, tmp_path / "open.jsonl", "-u", "1", "-r", "1", "--rate", "10",
               "--arrivals", "poisson", "--stop-timeout", "5", seconds=4)
    records = sorted(read_records(tmp_path / "open.jsonl"), key=lambda r: r["intended_t"])
    assert 20 <= len(records) <= 65 and all(r["ok"] for r in records)
    late = [r for r in records if r["send_lag_ms"] > LATE_S * 1000]
    assert len(late) <= len(records) // 10  # a busy test machine may delay a few; a queue would delay most
    assert report.client_stats(records)["p50_ms"] < 150
    gaps = sorted(b["intended_t"] - a["intended_t"] for a, b in zip(records, records[1:]))
    assert gaps[0] < 0.05 < gaps[-1]  # poisson: irregular gaps, not a fixed 0.1 s


# ------------------------------------------------------------------------------------- capacity search


def probe_of(capacity: float, tried: list[float]):
    """A service that sustains any rate up to `capacity` (p99 5 ms) and none above (p99 500 ms)."""

    def probe(rate: float) -> Step:
        tried.append(rate)
        stats = {"requests": 100, "errors": 0, "unsent": 0, "late": 0, "p99_ms": 5.0 if rate <= capacity else 500.0}
        return judge(rate, stats, p99_target_ms=50)

    return probe


def test_the_search_doubles_then_bisects_to_within_the_tolerance():
    tried: list[float] = []
    found = find_capacity(probe_of(37.0, tried), start=1, min_rate=1, max_rate=1000, max_steps=20, tolerance=0.05)
    assert found.bound == "" and 37.0 / 1.05 <= found.rate <= 37.0
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]  # doubling until the first failure
    assert all(32 < r < 64 for r in tried[7:])  # then only inside the bracket
    assert [s.rate for s in found.steps] == tried and len(tried) <= 20


def test_the_search_halves_from_a_start_above_capacity_and_states_its_bounds():
    tried: list[float] = []
    found = find_capacity(probe_of(10.0, tried), start=80, min_rate=1, max_rate=1000, max_steps=20)
    assert tried[:4] == [80, 40, 20, 10] and 10 / 1.1 <= found.rate <= 10 and found.bound == ""
    assert find_capacity(probe_of(1e9, []), start=1, min_rate=1, max_rate=50, max_steps=20).bound == ">="
    none = find_capacity(probe_of(0.5, []), start=4, min_rate=1, max_rate=50, max_steps=20)
    assert (none.rate, none.bound) == (1, "<")
    short = find_capacity(probe_of(1e9, []), start=1, min_rate=1, max_rate=1000, max_steps=3)
    assert (short.rate, short.bound, len(short.steps)) == (4, ">=", 3)  # out of steps while going up


def test_a_step_is_sustained_only_under_the_target_without_errors_or_unsent_requests():
    ok = {"requests": 50, "errors": 0, "unsent": 0, "late": 2, "p99_ms": 49.0}
    assert judge(10, ok, 50).sustained and judge(10, ok, 50).why == ""
    assert "p99 51.0 ms > 50 ms" in judge(10, {**ok, "p99_ms": 51.0}, 50).why
    assert "3 errors (3 unsent)" in judge(10, {**ok, "errors": 3, "unsent": 3}, 50).why
    assert not judge(10, {**ok, "requests": 0, "p99_ms": None}, 50).sustained


@pytest.mark.slow
def test_capacity_search_through_locust_finds_a_serial_service_s_known_capacity(serial_stub, tmp_path):
    """20 ms per request, one at a time: 50 requests/s at most. The search, probing with real open-loop
    Locust runs, must land below that and not far below (queueing theory: at 70% load p99 is still a
    few service times). A rate of 100/s shows the queue in every step."""
    stub = serial_stub(0.020)
    cfg = SweepConfig(model=Path("unused"), policies=[], out=tmp_path, drain_s=3,
                      replay=ReplayOptions(dataset=DATASET, replay_users=12))
    tried = []

    def probe(rate: float) -> Step:
        records = tmp_path / f"{len(tried)}" / "records.jsonl"
        records.parent.mkdir()
        run_locust(cfg, stub.url, records, records.with_name("locust.log"), replace(cfg.replay, rate=rate), 3)
        tried.append(rate)
        return judge(rate, report.client_stats(read_records(records)), p99_target_ms=100)

    found = find_capacity(probe, start=12.5, min_rate=5, max_rate=200, max_steps=5, tolerance=0.2)
    assert tried[:3] == [12.5, 25, 50] or tried[:4] == [12.5, 25, 50, 100]
    assert found.bound == "" and 25 <= found.rate <= 50, found.as_dict()
    over = [s for s in found.steps if s.rate >= 100]
    assert all(not s.sustained for s in over)


@pytest.mark.slow
def test_distributed_open_loop_splits_the_rate_and_the_users_over_workers(serial_stub, tmp_path):
    """`--locust-workers 2`: a master and two workers, each sending half of --rate for its own half of
    the users; together the rate asked for, every user replayed by one worker only."""
    stub = serial_stub(0.002)
    cfg = SweepConfig(model=Path("unused"), policies=[], out=tmp_path, drain_s=3, locust_workers=2,
                      replay=ReplayOptions(dataset=DATASET, replay_users=12, rate=20))
    records = tmp_path / "records.jsonl"
    run_locust(cfg, stub.url, records, tmp_path / "locust.log", duration_s=4)
    files = sorted(tmp_path.glob("records.worker*.jsonl"))
    assert len(files) == 2 and not records.exists()  # the master sends nothing
    per_worker = [read_records(f) for f in files]
    assert all(30 <= len(recs) <= 50 for recs in per_worker), [len(r) for r in per_worker]  # ~10/s x 4 s each
    users = [{r["user_id"] for r in recs} for recs in per_worker]
    assert users[0] and users[1] and not users[0] & users[1]
    assert all(r["ok"] and r["intended_t"] is not None for recs in per_worker for r in recs)
    assert (tmp_path / "locust.worker0.log").exists() and (tmp_path / "locust.worker1.log").exists()
