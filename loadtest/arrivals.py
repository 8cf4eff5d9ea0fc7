"""Open-loop arrivals: requests leave on a schedule, whatever the service's answers do.

A closed loop (loadtest.locustfile's ReplayUser) sends a virtual user's next request only after the
previous answer. When the service slows down the load drops with it, and the requests that would have
queued behind a slow one are never sent, so never measured (coordinated omission): a slow policy shows a
lower rate at a good latency instead of a bad latency at the rate it was asked for. Here departure times
are fixed in advance, R per second in total, evenly spaced (`constant`) or as a Poisson process
(`poisson`: independent exponential gaps, the bursts of many independent users), and each request's
latency counts from the time it was *meant* to leave.

Replaying real users keeps one rule of the closed loop: a user's requests go in order and never two at
once (the service refuses events older than the user's last one). Each departure therefore takes the
replayed user idle longest; when every user has a request in flight, or `max_in_flight` requests are in
flight, the departure waits in order for the first free one and is charged for the wait. A departure
still waiting when the run ends, or due after every user's stream was sent to the end, is reported as
not sent. Nothing here imports Locust or gevent: `spawn` and `clock` are handed in, so this is tested
as plain code (tests/test_openloop.py) and driven by loadtest/openloop.py.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvrec.loadtest.streams import Lease, PlannedRequest, StreamPool

ARRIVALS = ("constant", "poisson")
LATE_S = 0.010  # a request that leaves more than this after its intended time was not sent on time


def arrival_offsets(rate: float, arrivals: str, *, seed: object = 0, phase: float = 0.0) -> Iterator[float]:
    """Seconds from the start at which requests are due, forever: `rate` per second on average.

    constant: phase, phase + 1/rate, ...; poisson: gaps drawn from Exp(rate) by an RNG seeded with `seed`,
    so a run's schedule is reproducible. `phase` lets n processes that each send rate/n interleave their
    constant schedules into one even schedule of the total rate.
    """
    if rate <= 0:
        raise ValueError(f"an open-loop rate must be positive, got {rate}")
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {', '.join(ARRIVALS)}, got {arrivals!r}")
    rng = random.Random(f"arrivals:{seed}")
    t, i = phase, 0
    while True:
        if arrivals == "constant":
            yield phase + i / rate
            i += 1
        else:
            t += rng.expovariate(rate)
            yield t


@dataclass(frozen=True)
class Departure:
    """One request as sent: which user's which request, when it was meant to leave and when it did."""

    lease: Lease
    request: PlannedRequest
    intended: float  # unix seconds
    sent: float  # unix seconds the dispatcher let it go

    @property
    def lag_s(self) -> float:
        return self.sent - self.intended


@dataclass
class DispatchCounts:
    """What a dispatcher did: due (arrivals), sent, sent late (more than LATE_S after their time),
    waited (found no free user or slot when due), unsent (never sent: reported through `on_unsent`)."""

    due: int = 0
    sent: int = 0
    late: int = 0
    waited: int = 0
    unsent: int = 0


NO_STREAM_LEFT = "every replayed user's stream was sent to the end (raise --replay-users or shorten the run)"
RUN_ENDED = "still waiting for a free replayed user or in-flight slot when the run ended"


class Dispatcher:
    """Sends each due request with the user idle longest, at most `max_in_flight` at once.

    `send(departure)` performs one request (it blocks its own greenlet) and `spawn(fn, *args)` runs it
    concurrently; `on_unsent(intended, reason)` is told of each due request that will never be sent.
    Every method runs to completion without yielding (Locust's greenlets share one thread), so no lock.
    """

    def __init__(self, pool: StreamPool, send: Callable[[Departure], None], spawn: Callable,
                 on_unsent: Callable[[float, str], None], *, max_in_flight: int,
                 clock: Callable[[], float] = time.time):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.pool, self.send, self.spawn, self.on_unsent = pool, send, spawn, on_unsent
        self.max_in_flight, self.clock = max_in_flight, clock
        self.backlog: deque[float] = deque()  # intended times of due requests not sent yet, oldest first
        self.in_flight: dict[int, Departure] = {}
        self.counts = DispatchCounts()
        self.closed = False

    def arrive(self, intended: float) -> None:
        """A request is due at `intended` (unix seconds, normally now): send it, or queue it."""
        if self.closed:
            raise RuntimeError("arrive() after close()")
        self.counts.due += 1
        self.backlog.append(intended)
        self._dispatch()
        if self.backlog:  # FIFO: if this one had left, every earlier one had too
            self.counts.waited += 1

    def _dispatch(self) -> None:
        while self.backlog and not self.closed:
            if self.pool.exhausted:
                self._drop_backlog(NO_STREAM_LEFT)
                return
            if len(self.in_flight) >= self.max_in_flight:
                return
            lease = self.pool.take()
            if lease is None:  # every user left has a request in flight
                return
            intended = self.backlog.popleft()
            dep = Departure(lease, lease.next_request(), intended, self.clock())
            self.counts.sent += 1
            self.counts.late += dep.lag_s > LATE_S
            self.in_flight[id(dep)] = dep
            self.spawn(self._run, dep)

    def _run(self, dep: Departure) -> None:
        try:
            self.send(dep)
        finally:  # answered, failed or killed: its user is free again (a killed run reports it itself)
            del self.in_flight[id(dep)]
            self.pool.release(dep.lease, last=True)
            self._dispatch()

    def _drop_backlog(self, reason: str) -> None:
        while self.backlog:
            self.counts.unsent += 1
            self.on_unsent(self.backlog.popleft(), reason)

    def close(self) -> list[Departure]:
        """End of the run: nothing more is sent; every request still waiting is reported unsent. Returns
        the requests still in flight (the caller waits for them or reports them as cut off)."""
        self.closed = True
        self._drop_backlog(RUN_ENDED)
        return list(self.in_flight.values())
