"""Request and response bodies of the HTTP API (they are also its OpenAPI documentation).

Types are strict: `"k": "10"`, `"ts": true` or `"exclude_seen": 0` is an error that names the field
rather than a guess. Limits that depend on the settings (k, list lengths, id lengths) are checked by the
pipeline. Every error, whatever its status, is one `Problem`. Every body has an example.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_TS = 2**53  # timestamps are compared in Redis Lua, whose numbers are doubles

Id = Annotated[StrictStr | StrictInt, Field(description="the dataset's own id, a string or an integer")]


class Event(BaseModel):
    """One interaction of the user with an item."""

    model_config = ConfigDict(extra="forbid")

    item_id: Id
    ts: StrictInt = Field(ge=-MAX_TS, le=MAX_TS,
                          description="unix seconds (or the event index); not earlier than the user's last event")
    action: StrictInt = Field(0, ge=0, le=65535, description="action id, e.g. a rating; 0 means none")


class RecommendRequest(BaseModel):
    """Fold the user's new events into their state and rank items for them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "user_id": "u42", "events": [{"item_id": "1193", "ts": 978300760, "action": 4}],
        "candidates": ["1", "2"], "k": 10, "exclude_seen": True}]})

    user_id: Id
    events: list[Event] = Field(default_factory=list, description="new events, oldest first; may be empty")
    candidates: list[Id] | None = Field(
        None, description="items to rank; null or absent ranks the whole catalogue")
    k: StrictInt = Field(10, description="how many items to return (1 to the server's max_k)")
    exclude_seen: StrictBool = Field(
        False, description="leave the items of the user's event log out of a whole-catalogue ranking "
                           "(explicit candidates are always all ranked)")


class ScoredItem(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"item_id": "2", "score": 0.42}]})

    item_id: str
    score: float = Field(description="cosine of the user's state and the item's embedding")


class StateInfo(BaseModel):
    """The user's state after this request."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"events_seen": 12, "tokens_kept": 24, "bytes": 6400, "source": "hit", "hot": True}]})

    events_seen: int = Field(description="events folded into the state (the user's whole log)")
    tokens_kept: int = Field(description="tokens the policy kept, summed over layers")
    bytes: int = Field(description="size of the state's blob as last encoded: the stored one, or, when the hot "
                                   "tier holds a newer state, the blob of up to hot_writeback_events - 1 events "
                                   "ago; 0 when the policy keeps no state")
    source: Literal["hit", "miss", "rebuild", "recompute"] = Field(
        description="hit: a cached state was extended (the stored one, or the hot tier's: see `hot`); miss: "
                    "none was stored, built from the event log; rebuild: the stored one was unusable (corrupt, "
                    "another model or policy); recompute: the policy keeps no state")
    hot: bool = Field(False, description="the state extended was this worker's in-memory copy (hot tier), current "
                                         "in Redis: no blob was loaded or decoded")


TIMING_EXAMPLE = {"append": 0.4, "load": 0.5, "decode": 0.1, "extend": 2.1, "compress": 0.2, "encode": 0.1,
                  "store": 0.4, "score": 0.3, "total": 4.3}
REPLAYED = Field(False, description="the Idempotency-Key was applied by an earlier request: this one appended "
                                    "nothing, and answers from the log as it is now")


class RecommendResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "user_id": "u42", "items": [{"item_id": "2", "score": 0.42}, {"item_id": "1", "score": 0.17}],
        "policy": "full", "mode": "retrieval", "replayed": False,
        "state": {"events_seen": 12, "tokens_kept": 24, "bytes": 6400, "source": "hit"},
        "timing_ms": TIMING_EXAMPLE}]})

    user_id: str
    items: list[ScoredItem] = Field(description="best first, min(k, candidates) long")
    policy: str = Field(description="canonical spec of the compression policy")
    mode: Literal["ranking", "retrieval"] = Field(
        "retrieval", description="retrieval: the user's vector against item embeddings; ranking: the candidates "
                                 "as target tokens attending to the cached state (a model with a ranking head)")
    replayed: bool = REPLAYED
    state: StateInfo
    timing_ms: dict[str, float] = Field(
        description="milliseconds per stage: append, load, decode, extend, compress, encode, store, score, "
                    "and total")


class HistoryRequest(BaseModel):
    """A user's whole history, replacing whatever was stored for them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"events": [
        {"item_id": "1193", "ts": 978300760, "action": 5}, {"item_id": "661", "ts": 978302109, "action": 3}]}]})

    events: list[Event] = Field(description="events, oldest first")


class HistoryResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "user_id": "u42", "policy": "full", "replayed": False,
        "state": {"events_seen": 2, "tokens_kept": 4, "bytes": 1200, "source": "miss"},
        "timing_ms": {"append": 0.4, "load": 0.3, "extend": 1.2, "compress": 0.1, "encode": 0.1, "store": 0.3,
                      "total": 2.5}}]})

    user_id: str
    policy: str
    replayed: bool = REPLAYED
    state: StateInfo
    timing_ms: dict[str, float]


class DeleteResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"user_id": "u42", "keys_deleted": 5}]})

    user_id: str
    keys_deleted: int = Field(description="Redis keys removed (event log, metadata, state, request ids)")


class FieldError(BaseModel):
    """One reason a request failed validation."""

    loc: list[str | int] = Field(description="where: `body`, `path`, `header` or `query`, then the field path")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. `missing`, `int_type`, `extra_forbidden`")


class Problem(BaseModel):
    """Every error, whatever its status: `detail` says what is wrong and what to do; the other fields are
    present where they apply."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"detail": "body.k: Input should be a valid integer", "errors": [
            {"loc": ["body", "k"], "msg": "Input should be a valid integer", "type": "int_type"}]},
        {"detail": "Redis at redis://127.0.0.1:6379/0 is unavailable (TimeoutError: Timeout reading from "
                   "socket); the events may have been appended: retry with the same Idempotency-Key, which "
                   "appends them at most once", "written": "unknown", "idempotency_key": "5f0c8e4b2a7d4e1f"}]})

    detail: str = Field(description="what is wrong, in one message")
    errors: list[FieldError] | None = Field(None, description="422 from validation: every problem found")
    written: Literal["nothing", "unknown", "events"] | None = Field(
        None, description="503: what the failed request left behind. nothing: no change; unknown: its write was "
                          "sent and not answered, so it may have been applied; events: its events were appended "
                          "and what failed came after. A retry with the same Idempotency-Key is always safe")
    idempotency_key: str | None = Field(None, description="the request's id: send it again with a retry")
    user_id: str | None = Field(None, description="409: the user whose stored data is damaged")


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: Literal["ok"] = Field(description="the process is alive")


class Ready(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"status": "ready", "policy": "full", "model": "a3f9c1d2e4b5"}]})

    status: Literal["ready"]
    policy: str = Field(description="canonical spec of the compression policy")
    model: str = Field(description="fingerprint of the served checkpoint")


class ResetResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"reset": True}]})

    reset: bool


class LatencySummary(BaseModel):
    count: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None


class RequestCounts(BaseModel):
    total: int = Field(description="requests to /recommend and /users/..., every status")
    by_status: dict[str, int] = Field(description="HTTP status -> requests")


class StateSummary(BaseModel):
    users: int = Field(description="users with a stored state, as counted by the census")
    census_full: bool = Field(description="the census reached metrics_census_users: later users are not in it, "
                                          "and the per-user figures are over the ones that are")
    bytes_total: int
    bytes_per_user_mean: float
    bytes_per_user_p99: float
    tokens_kept_mean: float
    compression_ratio: float | None = Field(description="uncompressed fp32 bytes over stored bytes")


class CacheCounts(BaseModel):
    hits: int = Field(description="a cached state was extended: the blob in Redis, or the hot tier's copy (`hot.hits`)")
    misses: int
    rebuilds: int
    recomputes: int
    cas_retries: int = Field(description="state writes refused because a fresher state was stored first")
    store_failures: int = Field(description="states not stored because Redis refused or did not answer (the "
                                            "request was still served: the events were logged)")


class HotTierReport(BaseModel):
    enabled: bool = Field(description="the answering worker has a hot tier (hot_tier_bytes > 0, a policy that "
                                      "keeps state)")
    max_bytes_per_worker: int = Field(description="hot_tier_bytes")
    writeback_events: int = Field(description="hot_writeback_events")
    hits: int = Field(description="requests that extended the worker's copy, current in Redis")
    misses: int = Field(description="requests whose user the worker did not hold")
    stale: int = Field(description="requests whose held copy was not current (another worker stored a newer "
                                   "state, the user was replaced or deleted): the stored state was loaded")
    hit_rate: float | None = Field(description="hits / (hits + misses + stale)")
    evictions: int = Field(description="copies dropped for room")
    writebacks: int = Field(description="states written to Redis on eviction or shutdown (the due ones go "
                                        "with their request)")
    writeback_failures: int = Field(description="write-backs Redis refused or did not answer (costs a rebuild of "
                                                "a few events, never an event)")
    workers: int = Field(description="workers whose tier reported within the last 3 redis_watch_s")
    bytes: int = Field(description="bytes held, summed over those workers")
    entries: int = Field(description="users held, summed over those workers (one user may be held by several)")


class EventCounts(BaseModel):
    oov: int = Field(description="events whose item the model does not know")
    unreadable: int = Field(description="log entries damaged in Redis, served as unknown items")


class OnlineAccuracy(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    hr_at_10: float | None = Field(alias="hr@10")
    ndcg_at_10: float | None = Field(alias="ndcg@10")
    evaluated: int


class RedisStatus(BaseModel):
    url: str = Field(description="without its password")
    used_memory: int
    maxmemory: int = Field(description="0: no limit")
    keys: int
    run_id: str = Field(description="changes when Redis restarts")
    persistent: bool | None = Field(description="Redis keeps data over a restart (AOF or RDB); null: cannot tell")
    restarts: int = Field(description="restarts this worker saw")
    data_lost: int = Field(description="of those, restarts without persistence: every log was lost (logged as "
                                       "an error)")
    lost_at: float | None = Field(description="unix time of the last loss")


class MetricsReport(BaseModel):
    """Totals over every worker process since the last reset; `redis.restarts` and `data_lost` are the
    answering worker's own observations."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "since": 1700000000.0, "requests": {"total": 3, "by_status": {"200": 2, "422": 1}},
        "latency_ms": {"total": {"count": 2, "mean": 4.1, "p50": 4.1, "p95": 4.3, "p99": 4.3}},
        "throughput_rps": 0.3,
        "state": {"users": 1, "census_full": False, "bytes_total": 6400, "bytes_per_user_mean": 6400.0,
                  "bytes_per_user_p99": 6400.0, "tokens_kept_mean": 24.0, "compression_ratio": 2.0},
        "cache": {"hits": 1, "misses": 1, "rebuilds": 0, "recomputes": 0, "cas_retries": 0, "store_failures": 0},
        "hot": {"enabled": True, "max_bytes_per_worker": 268435456, "writeback_events": 8, "hits": 1, "misses": 1,
                "stale": 0, "hit_rate": 0.5, "evictions": 0, "writebacks": 0, "writeback_failures": 0,
                "workers": 1, "bytes": 7200, "entries": 1},
        "events": {"oov": 0, "unreadable": 0}, "accuracy": {"hr@10": 1.0, "ndcg@10": 1.0, "evaluated": 1},
        "redis": {"url": "redis://127.0.0.1:6379/0", "used_memory": 1048576, "maxmemory": 0, "keys": 9,
                  "run_id": "b5699d2ff8cf8cb18f3f4f172d43e9fb9a9d5f30", "persistent": False, "restarts": 0,
                  "data_lost": 0, "lost_at": None},
        "policy": "full", "model": {"path": "artifacts/model.ckpt", "fingerprint": "a3f9c1d2e4b5"}}]})

    since: float = Field(description="unix time of the first request counted")
    requests: RequestCounts
    latency_ms: dict[str, LatencySummary] = Field(description="per stage, and total")
    throughput_rps: float = Field(description="requests per second over the last metrics_window_s")
    state: StateSummary
    cache: CacheCounts
    hot: HotTierReport = Field(description="the per-worker in-memory tier of decoded states in front of Redis")
    events: EventCounts
    accuracy: OnlineAccuracy = Field(description="each user's previous top-10 graded by their next event")
    redis: RedisStatus
    policy: str
    model: dict[str, Any] = Field(description="the checkpoint: path, fingerprint and its configuration")
