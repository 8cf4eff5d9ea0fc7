"""Service metrics, kept in a shared `MetricsSink` (Redis) so that every worker process reports the same
totals, and recorded off the request path.

A request to a serving endpoint is counted in this process as its response starts (`record`, which never
waits and never fails): its status, whatever it is (413 from the body limit, 503s, 500s), and when it
was served, its cache outcome, events, online accuracy, one latency sample (one figure per stage) and
the census of the user's stored state. A background task adds what was counted to the sink every
`metrics_flush_s` in one round trip; while the store refuses, the counts stay here (bounded: counters,
the newest `metrics_samples` samples, `metrics_census_users` users) and are added once it takes them, so
503s are counted too. A worker's own /metrics read flushes first, so a client that asks the worker that
answered it sees its request counted; other workers' counts arrive within `metrics_flush_s`.

The hot tier's counts (hits, misses, stale copies, evictions, write-backs) are added the same way, and
each worker reports its tier's bytes and entries as a gauge (when they change, and every
`redis_watch_s`): /metrics sums the gauges of the workers heard from within the last three
`redis_watch_s`, so a worker that stopped drops out.

The same task watches the backend: a Redis whose run id changed restarted, and one that keeps no data
over a restart (no AOF, no RDB snapshots) lost every log it held. That is logged as an error and shown
in /metrics (`redis.data_lost`), as seen by this worker. `POST /metrics/reset` starts a new phase but
keeps the census, which describes what the store holds rather than a phase.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from contextlib import suppress

from kvrec.models.metrics import percentile
from kvrec.server.engine import Engine
from kvrec.server.hot_tier import HotTier
from kvrec.server.pipeline import RequestSample
from kvrec.server.schemas import MetricsReport
from kvrec.server.settings import Settings
from kvrec.server.store import (
    BackendInfo,
    Census,
    MetricsBatch,
    MetricsSink,
    StateStore,
    StoreUnavailable,
    WorkerGauge,
)

STAGES = ("append", "load", "decode", "extend", "compress", "encode", "store", "score")
SAMPLE_FIELDS = ("total", *STAGES)  # the order of a sample's figures in the sink
SOURCES = {"hit": "hits", "miss": "misses", "rebuild": "rebuilds", "recompute": "recomputes"}
CACHE_COUNTERS = ("hits", "misses", "rebuilds", "recomputes", "cas_retries", "store_failures")

log = logging.getLogger("kvrec.metrics")


class MetricsRecorder:
    def __init__(self, sink: MetricsSink, store: StateStore, settings: Settings, tier: HotTier | None = None):
        self.sink = sink
        self.store = store
        self.settings = settings
        self.tier = tier
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._tier_counted: Counter = Counter()  # the tier's counts already added to a batch
        self._gauge_sent: tuple[WorkerGauge | None, float] = (None, 0.0)  # the last gauge reported, and when
        self._pending = MetricsBatch()
        self._flushing = asyncio.Lock()
        self._failing = False
        self._run_ids: dict[str, str] = {}
        self.restarts = 0  # run id changes seen
        self.data_lost = 0  # of those, restarts of a Redis that keeps nothing over one
        self.lost_at: float | None = None

    def record(self, status: int, sample: RequestSample | None) -> None:
        """Count one request (and, when it was served, its sample) in this process; the background task
        adds it to the sink. No I/O: metrics never delay or fail a response."""
        now = time.time()
        batch = self._pending
        counts = Counter({"requests": 1, f"status:{status}": 1})
        if sample is not None:
            counts[SOURCES[sample.source]] += 1
            counts["cas_retries"] += int(sample.cas_lost)
            counts["store_failures"] += int(sample.store_failed)
            counts["oov_events"] += sample.oov_events
            counts["unreadable_events"] += sample.unreadable_events
            if sample.accuracy is not None:
                counts["accuracy_evaluated"] += 1
                counts["accuracy_hits"] += int(sample.accuracy[0])
                counts["accuracy_ndcg_micro"] += round(sample.accuracy[1] * 1e6)  # counters are integers
            batch.samples.append((now, [sample.timing_ms.get(f, 0.0) for f in SAMPLE_FIELDS]))
            del batch.samples[:-self.settings.metrics_samples]
            census = batch.census
            if sample.state_bytes is not None and (
                    sample.user_id in census or len(census) < self.settings.metrics_census_users):
                census[sample.user_id] = Census(sample.state_bytes, sample.tokens_kept, sample.events_seen)
        for name, value in counts.items():
            if value:
                batch.counters[name] = batch.counters.get(name, 0) + value
        batch.seconds[int(now)] = batch.seconds.get(int(now), 0) + 1
        batch.since = batch.since or now

    async def flush(self) -> bool:
        """Add what this process counted to the sink; kept for the next flush when the sink refuses."""
        async with self._flushing:
            self._count_tier()
            batch, self._pending = self._pending, MetricsBatch()
            if not batch:
                return True
            try:
                await self.sink.add(batch, time.time())
            except StoreUnavailable as exc:
                self._pending = batch.merge_newer(self._pending, self.settings.metrics_samples,
                                                  self.settings.metrics_census_users)
                if not self._failing:
                    log.warning("metrics not recorded, kept in this process until Redis takes them: %s", exc)
                self._failing = True
                return False
            if self._failing:
                log.info("metrics recorded again")
            self._failing = False
            return True

    def _count_tier(self) -> None:
        """Add the hot tier's counts since the last flush, and its gauge when it changed or has not been
        reported for `redis_watch_s`, to the pending batch."""
        if self.tier is None:
            return
        batch = self._pending
        for name, value in self.tier.counts.items():
            if value > self._tier_counted[name]:
                batch.counters[name] = batch.counters.get(name, 0) + value - self._tier_counted[name]
                self._tier_counted[name] = value
        now = time.time()
        last, sent_at = self._gauge_sent
        figures = (self.tier.bytes, len(self.tier), self.tier.max_bytes)
        changed = last is None or (last.bytes, last.entries, last.max_bytes) != figures
        if changed or now - sent_at >= self.settings.redis_watch_s:
            gauge = WorkerGauge(now, *figures)
            batch.workers[self.worker_id] = gauge
            self._gauge_sent = (gauge, now)

    async def watch(self) -> BackendInfo:
        """The backend's figures. A node whose run id changed restarted, and one without persistence lost
        what it held; a cluster's replica promoted in a failover is a new primary, not a restart."""
        info = await self.store.info()
        for node, run_id in info.run_ids.items():
            before = self._run_ids.get(node)
            if before is None or before == run_id:
                continue
            self.restarts += 1
            if info.persistent is False:
                self.data_lost += 1
                self.lost_at = time.time()
                log.error("Redis %s at %s restarted (run id %s -> %s) and keeps no data over a restart (no AOF, "
                          "no RDB snapshots): the event logs, states and shared metrics it held are lost", node,
                          self.settings.redis_url_redacted(), before, run_id)
            else:
                log.warning("Redis %s at %s restarted (run id %s -> %s); persistence %s", node,
                            self.settings.redis_url_redacted(), before, run_id,
                            "on" if info.persistent else "unknown")
        self._run_ids = info.run_ids
        return info

    def start(self) -> None:
        """Start the background task: flush every `metrics_flush_s`, watch Redis every `redis_watch_s`."""
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop the task and flush what is left, waiting at most one Redis call's budget for it. The task
        is asked to stop rather than cancelled: a cancellation can land inside the Redis client, which
        does not always pass it on."""
        self._stop.set()
        budget = self.settings.redis_timeout_s * (self.settings.redis_retries + 1) + 1
        with suppress(asyncio.TimeoutError, StoreUnavailable):
            await asyncio.wait_for(self._task, budget)
            await asyncio.wait_for(self.flush(), budget)

    async def _run(self) -> None:
        next_watch = 0.0
        while not self._stop.is_set():
            await self.flush()
            if time.monotonic() >= next_watch:
                next_watch = time.monotonic() + self.settings.redis_watch_s
                with suppress(StoreUnavailable):  # the requests say so; the next watch compares run ids again
                    await self.watch()
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.metrics_flush_s)

    async def forget_user(self, user_id: str) -> None:
        self._pending.census.pop(user_id, None)
        await self.sink.forget_user(user_id)

    async def reset(self) -> None:
        self._pending = MetricsBatch()
        self._gauge_sent = (None, 0.0)  # the pending gauge went with the batch: send it again
        await self.sink.reset()

    async def report(self, engine: Engine) -> MetricsReport:
        """The /metrics document (this worker's counts flushed first)."""
        await self.flush()
        info = await self.watch()
        data = await self.sink.read()
        now = time.time()
        window = self.settings.metrics_window_s
        c = data.counters
        since = data.since if data.since is not None else now

        latency = {name: _summary([s[i] for s in data.samples]) for i, name in enumerate(SAMPLE_FIELDS)}
        recent = sum(n for s, n in data.per_second.items() if s >= now - window)
        span = max(1.0, min(float(window), now - since))

        census = list(data.census.values())
        total_bytes = sum(u.bytes for u in census)
        raw_bytes = engine.dense_bytes(sum(u.events for u in census), users=len(census))
        evaluated = c.get("accuracy_evaluated", 0)
        model = engine.checkpoint
        return MetricsReport.model_validate({
            "since": since,
            "requests": {
                "total": c.get("requests", 0),
                "by_status": {k.split(":", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("status:")},
            },
            "latency_ms": latency,
            "throughput_rps": recent / span,
            "state": {
                "users": len(census),
                "census_full": len(census) >= self.settings.metrics_census_users,
                "bytes_total": total_bytes,
                "bytes_per_user_mean": total_bytes / len(census) if census else 0.0,
                "bytes_per_user_p99": percentile([u.bytes for u in census], 99) if census else 0.0,
                "tokens_kept_mean": sum(u.tokens for u in census) / len(census) if census else 0.0,
                "compression_ratio": raw_bytes / total_bytes if total_bytes else None,
            },
            "cache": {name: c.get(name, 0) for name in CACHE_COUNTERS},
            "hot": self._hot_report(c, data.workers, now),
            "events": {"oov": c.get("oov_events", 0), "unreadable": c.get("unreadable_events", 0)},
            "accuracy": {
                "hr@10": c.get("accuracy_hits", 0) / evaluated if evaluated else None,
                "ndcg@10": c.get("accuracy_ndcg_micro", 0) / 1e6 / evaluated if evaluated else None,
                "evaluated": evaluated,
            },
            "redis": {"url": self.settings.redis_url_redacted(), "used_memory": info.used_memory,
                      "maxmemory": info.maxmemory, "keys": info.keys, "run_id": info.run_id,
                      "persistent": info.persistent, "restarts": self.restarts, "data_lost": self.data_lost,
                      "lost_at": self.lost_at},
            "policy": engine.spec,
            "model": {"path": str(model.path), "fingerprint": model.fingerprint, **model.config.to_dict()},
        })


    def _hot_report(self, c: dict[str, int], workers: dict[str, WorkerGauge], now: float) -> dict:
        """The hot tier's figures: counts over every worker since the reset, bytes over the workers heard
        from lately."""
        live = [g for g in workers.values() if g.at >= now - 3 * self.settings.redis_watch_s]
        lookups = sum(c.get(name, 0) for name in ("hot_hits", "hot_misses", "hot_stale"))
        return {
            "enabled": self.tier is not None, "max_bytes_per_worker": self.settings.hot_tier_bytes,
            "writeback_events": self.settings.hot_writeback_events,
            "hits": c.get("hot_hits", 0), "misses": c.get("hot_misses", 0), "stale": c.get("hot_stale", 0),
            "hit_rate": c.get("hot_hits", 0) / lookups if lookups else None,
            "evictions": c.get("hot_evictions", 0), "writebacks": c.get("hot_writebacks", 0),
            "writeback_failures": c.get("hot_writeback_failures", 0),
            "workers": len(live), "bytes": sum(g.bytes for g in live), "entries": sum(g.entries for g in live),
        }


def _summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None}
    return {"count": len(values), "mean": sum(values) / len(values), "p50": percentile(values, 50),
            "p95": percentile(values, 95), "p99": percentile(values, 99)}
