"""Open-loop replay: `locust -f loadtest/openloop.py --rate 50 --host ... --headless -u 1 -t 60s --stop-timeout 10`.

The same replayed users, options, warm-up, partitioning and records as loadtest/locustfile.py (whose hooks
this file imports), but requests leave on a schedule of `--rate` requests per second in total
(`--arrivals constant|poisson`) instead of after each answer, and each record's latency counts from the
request's intended send time (see loadtest.arrivals for why, and how a due request finds a replayed user).
`kvrec sweep --rate R` and `--find-capacity` run this file.

One OpenLoopUser per Locust process runs that process's schedule: `-u 1` alone, `-u N` with N workers
(`--master --expect-workers N`), each worker sending rate/N for its own partition of the users; a further
user in a process idles. `--stop-timeout` is the drain: when the run ends no request is sent any more,
requests in flight get that long to answer, and any still unanswered are recorded as cut off (errors),
like the requests still waiting to be sent. Without it Locust kills the user at once and every request
in flight at the end is recorded as cut off.

When to run distributed: one Locust process is one core; when it is busy (Locust warns "CPU usage above
90%", records show send_lag_ms growing while the service's server_ms does not) requests leave late and
the lag is charged to the service. Add workers until the lag goes away (`kvrec sweep --locust-workers N`).
Load only this file, not this and locustfile.py together (the replay's hooks would be registered twice).
"""

from __future__ import annotations

import logging
import time

import gevent
import kvrec.loadtest.locustfile as replay  # the replay's hooks: options, warm-up, partition, records
from gevent.pool import Group
from kvrec.loadtest.arrivals import Departure, Dispatcher, arrival_offsets
from kvrec.loadtest.options import ReplayOptions
from kvrec.loadtest.records import unsent_record
from locust import events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.runners import MasterRunner
from locust.user.task import LOCUST_STATE_STOPPING

log = logging.getLogger("kvrec.openloop")
TICK_S = 0.2  # longest sleep between two checks for the end of the run
DRAIN_MARGIN_S = 0.5  # the drain ends this much before Locust's stop timeout kills the user


@events.test_start.add_listener
def _check_rate(environment, **_kw) -> None:
    opts = ReplayOptions.from_namespace(environment.parsed_options)
    if opts.rate <= 0:
        raise ValueError("loadtest/openloop.py needs --rate > 0 (requests per second in total)")
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        workers = runner.worker_count
        users = environment.parsed_options.num_users or 0
        if users < workers:
            log.warning("-u %d with %d workers: a worker without a user sends none of its share of "
                        "--rate; use -u %d", users, workers, workers)


class OpenLoopUser(FastHttpUser):
    """Runs its process's arrival schedule; FastHttpUser for a connection pool as large as
    --max-in-flight and a cheaper client per request than requests' (the load generator is the
    first thing to saturate)."""

    _running: object | None = None  # the ProcessReplay whose schedule a user of this process runs

    def __init__(self, environment):
        self.concurrency = ReplayOptions.from_namespace(environment.parsed_options).max_in_flight
        super().__init__(environment)

    def wait_time(self) -> float:
        return replay.IDLE_POLL_S

    @task
    def run_schedule(self) -> None:
        state = replay._replay
        if state is None or state.options.rate <= 0 or OpenLoopUser._running is state:
            return  # no replay (its error is logged), or another user of this process runs it: idle
        OpenLoopUser._running = state
        opts = state.options
        index, count = replay.Partition.index, replay.Partition.count
        offsets = arrival_offsets(opts.rate / count, opts.arrivals, seed=f"{opts.seed}:{index}",
                                  phase=index / opts.rate)
        group = Group()
        dispatcher = Dispatcher(state.pool, lambda dep: self._send(state, dep), group.spawn,
                                lambda intended, reason: self._record(state, unsent_record(
                                    intended, time.time(), reason)),
                                max_in_flight=opts.max_in_flight)
        start = time.time()
        log.info("open loop: %g requests/s (%s) from partition %d of %d", opts.rate / count, opts.arrivals,
                 index, count)
        try:
            for offset in offsets:
                if not self._sleep_until(start + offset):
                    break
                dispatcher.arrive(start + offset)
            self._drain(state, dispatcher, group)
        except gevent.GreenletExit:  # killed: no stop timeout, or the drain overran it
            self._cut_off(state, dispatcher, group)
            raise
        finally:
            c = dispatcher.counts
            log.info("open loop: %d due, %d sent (%d late by more than 10 ms, %d waited for a free user or "
                     "slot), %d unsent", c.due, c.sent, c.late, c.waited, c.unsent)

    def _sleep_until(self, due: float) -> bool:
        """Sleep until `due` (unix seconds); False as soon as the run is stopping."""
        while self._state != LOCUST_STATE_STOPPING:
            delay = due - time.time()
            if delay <= 0:
                return True
            gevent.sleep(min(delay, TICK_S))
        return False

    def _drain(self, state, dispatcher: Dispatcher, group: Group) -> None:
        dispatcher.close()
        timeout = max(self.environment.stop_timeout - DRAIN_MARGIN_S, 0.0)
        if not group.join(timeout=timeout):
            self._cut_off(state, dispatcher, group)

    def _cut_off(self, state, dispatcher: Dispatcher, group: Group) -> None:
        """Record every request still in flight as cut off, then stop them."""
        cut = dispatcher.close()
        now = time.time()
        for dep in cut:
            _, context = replay.recommend_request(state, dep.lease, dep.request, dep.intended)
            self._record(state, unsent_record(dep.intended, now, "cut off when the run ended",
                                              context["replay"]))
        group.kill(block=True, timeout=1.0)

    def _send(self, state, dep: Departure) -> None:
        body, context = replay.recommend_request(state, dep.lease, dep.request, dep.intended)
        replay.send_recommend(self.client, body, context)

    @staticmethod
    def _record(state, record: dict) -> None:
        if state.writer is not None:
            state.writer.write(record)
