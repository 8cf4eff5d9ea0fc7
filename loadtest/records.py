"""Per-request records of a replay, one JSON object a line.

Locust's own statistics give latency percentiles per endpoint; the sweep needs more per request: which
user and request of the replay it was (to compare one policy's answer with `full`'s for the same
request), what the service said about the state (bytes, source) and how good the answer was against
the user's true next events. The replay's request hook turns each response into one record here.

A record (keys; absent values are null):
  t            unix seconds when the request started
  user_id      dataset user id;  request: index of the request within that user's replay
  events       events the request sent;  targets: distinct items of the next request's events
  latency_ms   client side: as Locust measured it in a closed loop; in an open loop from the request's
               intended send time (send_lag_ms + response_ms), so a queue in front of the service counts
  intended_t   open loop: unix seconds the request was due (null in a closed loop)
  send_lag_ms  open loop: how late it left (waiting for a free user or slot, or a busy load generator)
  response_ms  from the moment it left to the answer, as Locust measured it;  server_ms: timing_ms.total
  status       HTTP status (0: no response);  ok: 2xx;  error: the failure, when there is one
  unsent       open loop: due but never sent (or never answered) before the run ended; an error
  policy, mode, source, state_bytes, tokens_kept, events_seen: from the response (mode: ranking or
               retrieval, how the service ranked)
  top10        the answer's first 10 item ids, best first
  hit@10, ndcg@10   top10 against the targets (null when there are none: a stream's last request)
"""

from __future__ import annotations

import json
from pathlib import Path

from kvrec.models.metrics import ndcg_of_list

K = 10


def ranking_metrics(top: list[str], targets: list[str], k: int = K) -> tuple[float, float]:
    """(hit@k, ndcg@k) of a ranked list against the true next items, with binary relevance.

    With one event per request this is the usual next-item HR and NDCG; with several, NDCG is
    normalised by the ideal ranking of min(k, targets) relevant items (`models.metrics.ndcg_of_list`,
    the definition the offline metrics use).
    """
    relevant = set(targets)
    hit = float(any(item in relevant for item in top[:k]))
    return hit, ndcg_of_list(top, relevant, k)


def record_of(context: dict, response, latency_ms: float, start_time: float, exception) -> dict:
    """The record of one `POST /recommend` from Locust's request event arguments."""
    status = int(getattr(response, "status_code", 0) or 0)
    intended = context.get("intended_t")
    lag_ms = None if intended is None else (start_time - intended) * 1000
    rec = {
        "t": start_time,
        "user_id": context["user_id"],
        "request": context["request"],
        "events": context["events"],
        "targets": len(context["targets"]),
        "latency_ms": latency_ms + max(lag_ms or 0.0, 0.0),
        "intended_t": intended,
        "send_lag_ms": lag_ms,
        "response_ms": latency_ms,
        "status": status,
        "ok": exception is None and 200 <= status < 300,
        "error": None if exception is None else str(exception)[:300],
        "unsent": False,
        "policy": None, "source": None, "state_bytes": None, "tokens_kept": None, "events_seen": None,
        "server_ms": None, "top10": None, "hit@10": None, "ndcg@10": None, "mode": None,
    }
    if not rec["ok"]:
        return rec
    try:
        body = response.json()
        state = body.get("state") or {}
        top = [str(item["item_id"]) for item in body["items"][:K]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        rec.update(ok=False, error=f"unreadable response body: {exc}")
        return rec
    rec.update(policy=body.get("policy"), mode=body.get("mode"), source=state.get("source"),
               state_bytes=state.get("bytes"), tokens_kept=state.get("tokens_kept"),
               events_seen=state.get("events_seen"),
               server_ms=(body.get("timing_ms") or {}).get("total"), top10=top)
    if context["targets"]:
        rec["hit@10"], rec["ndcg@10"] = ranking_metrics(top, context["targets"])
    return rec


def unsent_record(intended: float, ended: float, reason: str, context: dict | None = None) -> dict:
    """The record of an open-loop request that was due at `intended` and had no answer when the run
    ended at `ended`: never sent (no `context`), or sent and cut off (its replay `context`). Its latency
    is a lower bound, the time it had waited; it counts as an error, so a rate that leaves requests
    behind is never reported as sustained."""
    context = context or {"user_id": None, "request": None, "events": 0, "targets": []}
    rec = record_of(context, None, 0.0, intended, RuntimeError(f"not answered: {reason}"))
    rec.update(t=intended, intended_t=intended, send_lag_ms=None, response_ms=None, unsent=True,
               latency_ms=max(ended - intended, 0.0) * 1000)
    return rec


def worker_path(path: str | Path, index: int) -> Path:
    """Where Locust worker `index` writes in a distributed run: `recs.jsonl` -> `recs.worker3.jsonl`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.worker{index}{path.suffix}")


class RecordWriter:
    """Appends records to a file as JSON lines, one write per record, flushed as it goes (a run
    that is killed keeps everything written so far)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        self.count = 0

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.count += 1

    def close(self) -> None:
        self._file.close()


def record_files(path: str | Path) -> list[Path]:
    """The files of one run's records: `path` itself and those its distributed workers wrote beside it."""
    path = Path(path)
    return ([path] if path.exists() else []) + sorted(path.parent.glob(f"{path.stem}.worker*{path.suffix}"))


def read_records(path: str | Path) -> list[dict]:
    """All records of a run: `path` itself and the files its distributed workers wrote beside it."""
    out = []
    for f in record_files(path):
        with open(f, encoding="utf-8") as fh:
            out.extend(json.loads(line) for line in fh if line.strip())
    return out
