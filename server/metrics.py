"""Service metrics, kept in a shared `MetricsSink` (Redis) so that every worker process reports the same
totals.

Each request to a serving endpoint is recorded with one round trip to the sink, before its response
leaves the worker: its status, and when it was served, its cache outcome, events, online accuracy, one
latency sample (one figure per stage) and the census of the user's stored state. `POST /metrics/reset`
starts a new phase but keeps the census, which describes what the store holds rather than a phase.
Counts that could not be written while the store was down are kept in the process and added on the next
successful write, so 503s are counted too.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from kvrec.models.metrics import percentile
from kvrec.server.engine import Engine
from kvrec.server.pipeline import RequestSample
from kvrec.server.settings import Settings
from kvrec.server.store import Census, MetricsSink, StoreUnavailable

STAGES = ("append", "load", "decode", "extend", "compress", "encode", "store", "score")
SAMPLE_FIELDS = ("total", *STAGES)  # the order of a sample's figures in the sink
SOURCES = {"hit": "hits", "miss": "misses", "rebuild": "rebuilds", "recompute": "recomputes"}

log = logging.getLogger("kvrec.metrics")


class MetricsRecorder:
    def __init__(self, sink: MetricsSink, settings: Settings):
        self.sink = sink
        self.settings = settings
        self._pending: Counter[str] = Counter()

    async def record(self, status: int, sample: RequestSample | None) -> None:
        """Count one request (and, when it was served, its sample). Never raises: metrics must not turn
        a served request into an error."""
        counts = self._pending
        counts["requests"] += 1
        counts[f"status:{status}"] += 1
        figures, census = None, None
        if sample is not None:
            counts[SOURCES[sample.source]] += 1
            counts["cas_retries"] += int(sample.cas_lost)
            counts["oov_events"] += sample.oov_events
            if sample.accuracy is not None:
                counts["accuracy_evaluated"] += 1
                counts["accuracy_hits"] += int(sample.accuracy[0])
                counts["accuracy_ndcg_micro"] += round(sample.accuracy[1] * 1e6)  # counters are integers
            figures = [sample.timing_ms.get(f, 0.0) for f in SAMPLE_FIELDS]
            if sample.state_bytes is not None:
                census = sample.user_id, Census(sample.state_bytes, sample.tokens_kept, sample.events_seen)
        try:
            await self.sink.add(time.time(), dict(counts), figures, census)
        except StoreUnavailable as exc:
            log.warning("metrics not recorded (counts kept for later): %s", exc)
            return
        self._pending = Counter()

    async def forget_user(self, user_id: str) -> None:
        await self.sink.forget_user(user_id)

    async def reset(self) -> None:
        self._pending = Counter()
        await self.sink.reset()

    async def report(self, engine: Engine) -> dict:
        """The /metrics document."""
        now = time.time()
        window = self.settings.metrics_window_s
        data = await self.sink.read(drop_seconds_before=now - 10 * window)
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
        return {
            "since": since,
            "requests": {
                "total": c.get("requests", 0),
                "by_status": {k.split(":", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("status:")},
            },
            "latency_ms": latency,
            "throughput_rps": recent / span,
            "state": {
                "users": len(census),
                "bytes_total": total_bytes,
                "bytes_per_user_mean": total_bytes / len(census) if census else 0.0,
                "bytes_per_user_p99": percentile([u.bytes for u in census], 99) if census else 0.0,
                "tokens_kept_mean": sum(u.tokens for u in census) / len(census) if census else 0.0,
                "compression_ratio": raw_bytes / total_bytes if total_bytes else None,
            },
            "cache": {name: c.get(name, 0) for name in ("hits", "misses", "rebuilds", "recomputes", "cas_retries")},
            "events": {"oov": c.get("oov_events", 0)},
            "accuracy": {
                "hr@10": c.get("accuracy_hits", 0) / evaluated if evaluated else None,
                "ndcg@10": c.get("accuracy_ndcg_micro", 0) / 1e6 / evaluated if evaluated else None,
                "evaluated": evaluated,
            },
            "redis": {"used_memory": data.memory_bytes, "keys": data.keys,
                      "url": self.settings.redis_url_redacted()},
            "policy": engine.spec,
            "model": {"path": str(model.path), "fingerprint": model.fingerprint, **model.config.to_dict()},
        }


def _summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None}
    return {"count": len(values), "mean": sum(values) / len(values), "p50": percentile(values, 50),
            "p95": percentile(values, 95), "p99": percentile(values, 99)}
