"""Locust replay of real user streams against `kvrec serve`.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --dataset ml-latest-small \\
        --headless -u 8 -r 8 -t 60s --records out/records.jsonl
    locust -f loadtest/stepload.py ...            # the same user under a step-load shape
    locust -f loadtest/locustfile.py --master ... / --worker --master-host H   # distributed

Each virtual user takes one dataset user at a time from the stream split's future part and sends its
events in time order, `--events-per-request` at a time, asking for a catalogue top-k or for a ranking
of the true next items plus sampled negatives (loadtest.streams). Per-request records go to JSON lines
from Locust's request event (loadtest.records). The options are in loadtest/options.py; Locust's
`--help` does not list them (it prints before loading a locustfile), the web UI's start form does.

Every request carries an Idempotency-Key of its own and, when KVREC_API_TOKEN is set (the service then
refuses writes without it), `Authorization: Bearer $KVREC_API_TOKEN`. A 503 is sent once more with the
same key after RETRY_AFTER_S, which the key makes safe whatever the 503 says was written; the replay
request then has one record, the retry's, timed from the first attempt.

Per process, nothing is shared: in a distributed run the master loads the dataset, warms every
replayed user up and then tells each worker which partition of the users is its own (a message sent in
test_start, before any spawn message, so a worker knows its share before its first user starts);
each worker builds a pool over its partition only, so no dataset user is replayed by two workers.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import gevent
from kvrec.loadtest.options import ReplayOptions, add_arguments
from kvrec.loadtest.records import RecordWriter, record_of, worker_path
from kvrec.loadtest.streams import (
    Lease,
    PlannedRequest,
    ReplaySource,
    StreamPool,
    load_source,
    partition,
    plan_requests,
)
from kvrec.loadtest.warmup import RETRIED_STATUS, RETRY_AFTER_S, request_headers, warm_up
from locust import HttpUser, events, task
from locust.runners import MasterRunner, WorkerRunner

# The imports above take seconds (torch, via models.data) while gevent's loop sits idle with the clock
# it read when Locust started; a timer set from that stale clock, like the one for `-t`, fires early.
# One pass through the loop refreshes it.
gevent.sleep(0)

log = logging.getLogger("kvrec.replay")
PARTITION_MESSAGE = "kvrec_partition"
IDLE_POLL_S = 1.0  # how often a virtual user without a stream looks for one


@dataclass
class ProcessReplay:
    """What one Locust process replays: its pool, its record file and the options they came from."""

    options: ReplayOptions
    source: ReplaySource
    pool: StreamPool
    exclude_seen: bool
    writer: RecordWriter | None


class Partition:
    """This process's share of the users: (0, 1) unless a master assigned another."""

    index, count = 0, 1
    assigned = False


_replay: ProcessReplay | None = None  # set in test_start, per process; None on a master


@events.init_command_line_parser.add_listener
def _add_options(parser, **_kw) -> None:
    add_arguments(parser)


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    if isinstance(environment.runner, WorkerRunner):
        def assign(environment, msg, **_kw) -> None:
            Partition.index, Partition.count, Partition.assigned = msg.data["index"], msg.data["count"], True
        environment.runner.register_message(PARTITION_MESSAGE, assign)


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    """Master: warm up, then partition. Single process: warm up, build the pool. Worker: build the pool."""
    global _replay
    opts = ReplayOptions.from_namespace(environment.parsed_options)
    runner = environment.runner
    source = load_source(opts.dataset, prefix_fraction=opts.prefix_fraction,
                         max_users=opts.replay_users, holdout=opts.holdout)
    if not isinstance(runner, WorkerRunner):
        if not environment.host:
            raise ValueError("no --host: give the service's base URL, e.g. --host http://127.0.0.1:8000")
        if not opts.skip_warm_up:
            result = warm_up(environment.host, source.streams, concurrency=opts.warm_up_concurrency)
            log.info("warm-up: %d users, %d prefix events in %.1f s",
                     result.users, result.events, result.seconds)
    if opts.rate > 0 and ReplayUser in environment.user_classes:
        log.warning("--rate %g is ignored by the closed-loop ReplayUser: run -f loadtest/openloop.py for an "
                    "open loop", opts.rate)
    if isinstance(runner, MasterRunner):
        workers = sorted(runner.clients.ready + runner.clients.spawning + runner.clients.running,
                         key=lambda node: runner.get_worker_index(node.id))
        for index, node in enumerate(workers):
            runner.send_message(PARTITION_MESSAGE, {"index": index, "count": len(workers)}, client_id=node.id)
        return
    if isinstance(runner, WorkerRunner) and not Partition.assigned:
        raise RuntimeError("this worker got no user partition from the master (it joined after the test "
                           "started); restart the test so the master partitions users over all workers")
    streams = partition(source.streams, Partition.index, Partition.count)
    pool = StreamPool(streams, lambda s: plan_requests(
        s, events_per_request=opts.events_per_request, negatives=opts.sampled_negatives,
        catalogue=source.catalogue, pacing=opts.pacing, seed=opts.seed))
    writer = None
    if opts.records:
        worker = isinstance(runner, WorkerRunner)
        path = worker_path(opts.records, Partition.index) if worker else opts.records
        writer = RecordWriter(path)
    _replay = ProcessReplay(opts, source, pool, opts.exclude_seen_for(source.repeats), writer)
    log.info("replaying %d of %d users (partition %d of %d)", len(streams), len(source.streams),
             Partition.index, Partition.count)


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw) -> None:
    global _replay
    if _replay is None:
        return
    if _replay.writer is not None:
        _replay.writer.close()
        log.info("%d records in %s", _replay.writer.count, _replay.writer.path)
    log.info("streams: %d replayed to the end, %d in progress", _replay.pool.done, _replay.pool.leased)
    _replay = None


@events.request.add_listener
def _on_request(context, response, response_time, start_time, exception, **_kw) -> None:
    """One record per replay request (other requests, e.g. from other user classes, carry no
    `replay` context and are ignored): a first attempt that `send_recommend` retries has none, and its
    retry's record counts from the first attempt's start."""
    if _replay is None or _replay.writer is None or "replay" not in context:
        return
    status = int(getattr(response, "status_code", 0) or 0)
    if context.get("first_t") is None and status == RETRIED_STATUS:
        return
    rec = record_of(context["replay"], response, response_time, start_time, exception)
    if context.get("first_t") is not None:
        first = context["first_t"]
        rec["response_ms"] += (rec["t"] - first) * 1000
        rec["t"] = first
        if rec["intended_t"] is not None:
            rec["send_lag_ms"] = (first - rec["intended_t"]) * 1000
        rec["latency_ms"] = rec["response_ms"] + max(rec["send_lag_ms"] or 0.0, 0.0)
    _replay.writer.write(rec)


def send_recommend(client, body: dict, context: dict) -> None:
    """POST /recommend with a fresh Idempotency-Key, and once more with the same key after a 503 (its
    events are appended at most once either way). `client`: a Locust HttpSession or FastHttpSession."""
    headers = request_headers(uuid.uuid4().hex)
    first_t = time.time()
    response = client.post("/recommend", json=body, name="/recommend", headers=headers, context=context)
    if response.status_code == RETRIED_STATUS:
        gevent.sleep(RETRY_AFTER_S)
        client.post("/recommend", json=body, name="/recommend", headers=headers,
                    context={**context, "first_t": first_t})


def recommend_request(replay: ProcessReplay, lease: Lease, req: PlannedRequest,
                      intended_t: float | None = None) -> tuple[dict, dict]:
    """(JSON body, Locust request context) of one replay request; `intended_t`: an open loop's due time,
    from which its record measures latency (loadtest.records)."""
    body = {"user_id": lease.stream.user_id, "events": req.events, "candidates": req.candidates,
            "k": replay.options.k, "exclude_seen": replay.exclude_seen}
    context = {"user_id": lease.stream.user_id, "request": req.index, "events": len(req.events),
               "targets": req.targets}
    if intended_t is not None:
        context["intended_t"] = intended_t
    return body, {"replay": context}


class ReplayUser(HttpUser):
    """A virtual user that replays dataset users one after another, each in its own time order."""

    def on_start(self) -> None:
        self.lease: Lease | None = None
        self.pause = 0.0

    def wait_time(self) -> float:
        return self.pause

    @task
    def replay(self) -> None:
        if _replay is None:  # test_start failed; its error is already logged
            self.pause = IDLE_POLL_S
            return
        if self.lease is None:
            self.lease = _replay.pool.take()
            if self.lease is None:  # every stream is replayed or held by another virtual user
                self.pause = IDLE_POLL_S
                return
        lease = self.lease
        req = lease.next_request()
        body, context = recommend_request(_replay, lease, req)
        send_recommend(self.client, body, context)
        self.pause = req.wait_s
        if lease.finished:
            _replay.pool.release(lease)
            self.lease = None

    def on_stop(self) -> None:
        """A user stopped mid-stream hands the rest of it back, to be resumed by another."""
        if self.lease is not None and _replay is not None:
            _replay.pool.release(self.lease)
            self.lease = None
