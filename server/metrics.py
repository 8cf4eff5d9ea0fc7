"""Service metrics, kept in Redis so that every worker process reports the same totals.

Each served request is recorded with one pipelined round trip, before its response leaves the worker:

    {prefix}:metrics:counters   hash  requests by status, cache outcomes, events, accuracy sums
    {prefix}:metrics:latency    list  one sample per request, "unix_ts total load decode ...", newest
                                      first, trimmed to `metrics_samples`
    {prefix}:metrics:seconds    hash  requests per unix second, for the throughput window
    {prefix}:metrics:users      hash  user id -> "bytes tokens events" of the user's stored state

`POST /metrics/reset` clears the first three (a fresh measurement phase) but keeps the census of stored
states, which describes what Redis holds rather than a phase. Counts that could not be written while
Redis was down are kept in the process and added on the next successful write, so 503s are counted too.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import redis.asyncio as redis
from kvrec.server.engine import Engine
from kvrec.server.pipeline import RequestSample
from kvrec.server.settings import Settings

STAGES = ("append", "load", "decode", "extend", "compress", "encode", "store", "score")
SAMPLE_FIELDS = ("total", *STAGES)
SOURCES = {"hit": "hits", "miss": "misses", "rebuild": "rebuilds", "recompute": "recomputes"}

log = logging.getLogger("kvrec.metrics")


class MetricsRecorder:
    def __init__(self, client: redis.Redis, settings: Settings):
        self.redis = client
        self.settings = settings
        base = f"{settings.key_prefix}:metrics"
        self.counters, self.latency = f"{base}:counters", f"{base}:latency"
        self.seconds, self.users = f"{base}:seconds", f"{base}:users"
        self._pending: Counter[str] = Counter()

    async def record(self, status: int, sample: RequestSample | None) -> None:
        """Count one request (and, when it was served, its sample). Never raises: metrics must not turn
        a served request into an error."""
        now = time.time()
        counts = self._pending
        counts["requests"] += 1
        counts[f"status:{status}"] += 1
        pipe = self.redis.pipeline(transaction=False)
        if sample is not None:
            counts[SOURCES[sample.source]] += 1
            counts["cas_retries"] += int(sample.cas_lost)
            counts["oov_events"] += sample.oov_events
            if sample.accuracy is not None:
                counts["accuracy_evaluated"] += 1
                counts["accuracy_hits"] += int(sample.accuracy[0])
                counts["accuracy_ndcg_micro"] += round(sample.accuracy[1] * 1e6)  # HINCRBY needs integers
            fields = " ".join(f"{sample.timing_ms.get(f, 0.0):.4f}" for f in SAMPLE_FIELDS)
            pipe.lpush(self.latency, f"{now:.3f} {fields}")
            pipe.ltrim(self.latency, 0, self.settings.metrics_samples - 1)
            if sample.state_bytes is not None:
                pipe.hset(self.users, sample.user_id,
                          f"{sample.state_bytes} {sample.tokens_kept} {sample.events_seen}")
        pending = dict(counts)
        for name, value in pending.items():
            pipe.hincrby(self.counters, name, value)
        pipe.hsetnx(self.counters, "since", f"{now:.3f}")
        pipe.hincrby(self.seconds, str(int(now)), 1)
        try:
            await pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics not recorded (kept for later): %s", exc)
            return
        self._pending = Counter()

    async def forget_user(self, user_id: str) -> None:
        await self.redis.hdel(self.users, user_id)

    async def reset(self) -> None:
        self._pending = Counter()
        await self.redis.delete(self.counters, self.latency, self.seconds)

    async def report(self, engine: Engine) -> dict:
        """The /metrics document."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.counters)
        pipe.lrange(self.latency, 0, -1)
        pipe.hgetall(self.seconds)
        pipe.hgetall(self.users)
        pipe.info("memory")
        pipe.dbsize()
        raw_counters, raw_samples, raw_seconds, raw_users, memory, keys = await pipe.execute()
        now = time.time()
        c = {k.decode(): float(v) for k, v in raw_counters.items()}
        since = c.pop("since", now)

        samples = [[float(x) for x in s.split()] for s in raw_samples]
        latency = {name: _summary([s[i + 1] for s in samples]) for i, name in enumerate(SAMPLE_FIELDS)}

        window = self.settings.metrics_window_s
        stale = [s for s in raw_seconds if int(s) < now - 10 * window]
        if stale:
            await self.redis.hdel(self.seconds, *stale)
        recent = sum(int(n) for s, n in raw_seconds.items() if int(s) >= now - window)
        span = max(1.0, min(float(window), now - since))

        census = [tuple(int(x) for x in v.split()) for v in raw_users.values()]
        total_bytes = sum(b for b, _, _ in census)
        raw_bytes = sum(e for _, _, e in census) * engine.raw_bytes_per_event
        sizes = sorted(b for b, _, _ in census)
        evaluated = c.get("accuracy_evaluated", 0)
        model = engine.checkpoint
        return {
            "since": since,
            "requests": {
                "total": int(c.get("requests", 0)),
                "by_status": {k.split(":", 1)[1]: int(v) for k, v in sorted(c.items()) if k.startswith("status:")},
            },
            "latency_ms": latency,
            "throughput_rps": recent / span,
            "state": {
                "users": len(census),
                "bytes_total": total_bytes,
                "bytes_per_user_mean": total_bytes / len(census) if census else 0.0,
                "bytes_per_user_p99": _percentile(sizes, 99) if sizes else 0.0,
                "tokens_kept_mean": sum(t for _, t, _ in census) / len(census) if census else 0.0,
                "compression_ratio": raw_bytes / total_bytes if total_bytes else None,
            },
            "cache": {name: int(c.get(name, 0)) for name in ("hits", "misses", "rebuilds", "recomputes",
                                                              "cas_retries")},
            "events": {"oov": int(c.get("oov_events", 0))},
            "accuracy": {
                "hr@10": c.get("accuracy_hits", 0) / evaluated if evaluated else None,
                "ndcg@10": c.get("accuracy_ndcg_micro", 0) / 1e6 / evaluated if evaluated else None,
                "evaluated": int(evaluated),
            },
            "redis": {"used_memory": int(memory["used_memory"]), "keys": int(keys),
                      "url": self.settings.redis_url_redacted()},
            "policy": engine.spec,
            "model": {"path": str(model.path), "fingerprint": model.fingerprint, **model.config.to_dict()},
        }


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def _summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None}
    ordered = sorted(values)
    return {"count": len(values), "mean": sum(values) / len(values), "p50": _percentile(ordered, 50),
            "p95": _percentile(ordered, 95), "p99": _percentile(ordered, 99)}
