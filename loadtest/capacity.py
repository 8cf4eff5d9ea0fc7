"""The capacity search: the highest open-loop rate a service sustains with p99 under a target.

"Requests per second at p99 under X ms" is the figure a fleet is sized by, and only an open loop can
measure it (a closed loop slows down with the service and reports a good latency at whatever rate it
managed). A rate is *sustained* when a step at that rate had p99 (from intended send times) at most the
target, no error and no request left unsent. The search doubles from a start rate while steps are
sustained (halves while they are not), then bisects the bracket geometrically (rates are a scale: the
middle of 100 and 400 is 200, not 250) until it is narrower than `tolerance` or `max_steps` steps were
run. The probe, one short load step, is handed in, so the search itself is plain code (tests drive it
with a service of known capacity); loadtest.sweep's probe runs Locust against `kvrec serve`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Step:
    """One load step: its rate and what it showed."""

    rate: float
    requests: int
    errors: int  # unsent included
    unsent: int
    late: int
    p99_ms: float | None
    sustained: bool
    why: str  # what failed, '' when sustained


def judge(rate: float, stats: dict, p99_target_ms: float) -> Step:
    """The verdict on one step from its client stats (loadtest.report.client_stats of its records)."""
    p99 = stats["p99_ms"]
    why = []
    if stats["requests"] == 0:
        why.append("no request was due")
    if stats["errors"]:
        why.append(f"{stats['errors']} errors ({stats['unsent']} unsent)")
    if p99 is None or p99 > p99_target_ms:
        why.append(f"p99 {'-' if p99 is None else f'{p99:.1f}'} ms > {p99_target_ms:g} ms")
    return Step(rate, stats["requests"], stats["errors"], stats["unsent"], stats["late"], p99, not why,
                "; ".join(why))


@dataclass
class Capacity:
    """The search's answer. `rate` is the highest sustained rate; `bound` says when it is only a bound:
    '>=' (even the highest rate allowed was sustained), '<' (not even the lowest was: `rate` is then
    that lowest rate), '' (a bracket was found)."""

    rate: float
    bound: str
    steps: list[Step]

    def as_dict(self) -> dict:
        return {"rate": self.rate, "bound": self.bound, "steps": [asdict(s) for s in self.steps]}


def find_capacity(probe: Callable[[float], Step], *, start: float, min_rate: float, max_rate: float,
                  max_steps: int, tolerance: float = 0.1) -> Capacity:
    """Search [min_rate, max_rate] from `start` with at most `max_steps` probes (see the module)."""
    if not 0 < min_rate <= start <= max_rate:
        raise ValueError(f"need 0 < min_rate <= start <= max_rate, got {min_rate}, {start}, {max_rate}")
    if max_steps < 1 or tolerance <= 0:
        raise ValueError("max_steps must be at least 1 and tolerance positive")
    steps: list[Step] = []
    lo: float | None = None  # highest sustained
    hi: float | None = None  # lowest not sustained
    rate = start
    while len(steps) < max_steps:
        step = probe(rate)
        steps.append(step)
        if step.sustained:
            lo = rate if lo is None else max(lo, rate)
        else:
            hi = rate if hi is None else min(hi, rate)
        if hi is None:  # all sustained so far: go up
            if rate >= max_rate:
                return Capacity(rate, ">=", steps)
            rate = min(rate * 2, max_rate)
        elif lo is None:  # none sustained so far: go down
            if rate <= min_rate:
                return Capacity(rate, "<", steps)
            rate = max(rate / 2, min_rate)
        elif hi / lo <= 1 + tolerance:
            break
        else:
            rate = math.sqrt(lo * hi)
    if lo is None:
        return Capacity(min(s.rate for s in steps), "<", steps)
    return Capacity(lo, ">=" if hi is None else "", steps)
