"""Warm-up: load each replayed user's prefix into the service before the measured phase.

Without it the measured phase would start with cold users whose states grow from nothing, and the
numbers would describe short histories. Each prefix is bulk-loaded with `PUT /users/{id}/history`,
which replaces whatever the service held for that user (so a warm-up can be repeated against the same
service) and builds the state under the server's policy. Then `POST /metrics/reset` starts the
measurement from zero.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

from kvrec.loadtest.streams import UserStream


class WarmupError(RuntimeError):
    """The service refused a warm-up request; the message has the user, status and body."""


@dataclass
class WarmupResult:
    users: int
    events: int
    seconds: float


def warm_up(base_url: str, streams: list[UserStream], *, concurrency: int = 2, timeout_s: float = 300.0,
            reset_metrics: bool = True) -> WarmupResult:
    """Load every stream's prefix, `concurrency` requests at a time (the server's prefill is
    CPU-bound: more than its worker processes only queues)."""
    import httpx

    started = time.perf_counter()
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:

        def load(stream: UserStream) -> None:
            path = f"/users/{quote(stream.user_id, safe='')}/history"
            resp = client.put(path, json={"events": stream.prefix})
            if resp.status_code >= 300:
                raise WarmupError(f"PUT {path} ({len(stream.prefix)} events): "
                                  f"{resp.status_code} {resp.text[:300]}")

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            list(pool.map(load, streams))  # list() re-raises the first failure
        if reset_metrics:
            client.post("/metrics/reset").raise_for_status()
    return WarmupResult(len(streams), sum(len(s.prefix) for s in streams), time.perf_counter() - started)
