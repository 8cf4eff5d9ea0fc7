"""Warm-up: load each replayed user's prefix into the service before the measured phase.

Without it the measured phase would start with cold users whose states grow from nothing, and the
numbers would describe short histories. Each prefix is bulk-loaded with `PUT /users/{id}/history`,
which replaces whatever the service held for that user (so a warm-up can be repeated against the same
service) and builds the state under the server's policy. Then `POST /metrics/reset` starts the
measurement from zero; against several service workers, `settle_s` after the last PUT, once every
worker has added the warm-up's counts to the shared metrics (each does so every `metrics_flush_s`; a
reset before would leave other workers' warm-up requests in the measured phase).

Like the replay's requests, each PUT carries an Idempotency-Key and, when KVREC_API_TOKEN is set, the
bearer token (the reset too), and a 503 is sent once more with the same key.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

from kvrec.loadtest.streams import UserStream

METRICS_SETTLE_S = 0.5  # twice the service's default metrics_flush_s: every worker has added its counts
API_TOKEN_VARIABLE = "KVREC_API_TOKEN"
RETRIED_STATUS = 503  # Redis unavailable: the one answer a client retries (once, with the same key)
RETRY_AFTER_S = 0.2  # short against the service's Retry-After: 1, so that a retry measures the outage


def request_headers(key: str | None = None) -> dict[str, str]:
    """The headers of a request that writes: its Idempotency-Key (when given), and the bearer token when
    KVREC_API_TOKEN is set (the service then refuses writes without it). Shared with the replay's
    requests (loadtest/locustfile.py)."""
    headers = {"Idempotency-Key": key} if key else {}
    token = os.environ.get(API_TOKEN_VARIABLE)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


class WarmupError(RuntimeError):
    """The service refused a warm-up request; the message has the user, status and body."""


@dataclass
class WarmupResult:
    users: int
    events: int
    seconds: float


def warm_up(base_url: str, streams: list[UserStream], *, concurrency: int = 2, timeout_s: float = 300.0,
            reset_metrics: bool = True, settle_s: float = 0.0) -> WarmupResult:
    """Load every stream's prefix, `concurrency` requests at a time (the server's prefill is
    CPU-bound: more than its worker processes only queues); `settle_s`: the wait before the reset
    (METRICS_SETTLE_S for a service of several workers)."""
    import httpx

    started = time.perf_counter()
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:

        def load(stream: UserStream) -> None:
            path = f"/users/{quote(stream.user_id, safe='')}/history"
            headers = request_headers(uuid.uuid4().hex)
            resp = client.put(path, json={"events": stream.prefix}, headers=headers)
            if resp.status_code == RETRIED_STATUS:
                time.sleep(RETRY_AFTER_S)
                resp = client.put(path, json={"events": stream.prefix}, headers=headers)
            if resp.status_code >= 300:
                raise WarmupError(f"PUT {path} ({len(stream.prefix)} events): "
                                  f"{resp.status_code} {resp.text[:300]}")

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            list(pool.map(load, streams))  # list() re-raises the first failure
        if reset_metrics:
            time.sleep(settle_s)
            client.post("/metrics/reset", headers=request_headers()).raise_for_status()
    return WarmupResult(len(streams), sum(len(s.prefix) for s in streams), time.perf_counter() - started)
