"""Service settings, read from the environment (pydantic-settings).

Every setting has a `KVREC_` variable (`KVREC_MODEL`, `KVREC_POLICY`, ...), except the Redis URL, which
also answers to the conventional `REDIS_URL` (`KVREC_REDIS_URL` first: see `resolve_redis_url`, the one
place every command resolves it). `kvrec serve` passes its flags to the worker processes
through these variables, because uvicorn starts each worker from an import string, not from an object.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REDIS_URL_VARIABLES = ("KVREC_REDIS_URL", "REDIS_URL")  # in order of precedence


def resolve_redis_url(flag: str | None = None) -> str | None:
    """The Redis a command should use: its `--redis-url` flag, else `KVREC_REDIS_URL`, else `REDIS_URL`;
    None when none is set (the commands then start an embedded redis-server). One resolution, so that
    `serve`, `bench serve`, `sweep` and the service's Settings never disagree."""
    return flag or next((os.environ[v] for v in REDIS_URL_VARIABLES if os.environ.get(v)), None)


class Settings(BaseSettings):
    """Configuration of one ranking-service process."""

    model_config = SettingsConfigDict(env_prefix="KVREC_", extra="ignore", populate_by_name=True)

    model: Path = Field(Path("artifacts/model.ckpt"), description="checkpoint written by `kvrec train`")
    policy: str = Field("full", description="compression policy spec, e.g. `h2o:budget=256+kivi:bits=2`")
    device: str = Field("auto", description="torch device; `auto` picks CUDA when there is one")
    torch_threads: int = Field(
        1, ge=1, description="intra-op threads per worker. One request's tensors are small, so more threads "
                             "cost more in synchronisation than they save (ten times more on a busy machine, "
                             "measured); scale out with workers instead")
    compute_concurrency: int = Field(
        1, ge=1, description="requests whose torch work may run at once per worker; more only adds "
                             "contention for the same cores")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=AliasChoices(*REDIS_URL_VARIABLES),
        description="redis://, rediss:// or unix:// URL; redis+cluster://host:port for a Redis Cluster")
    redis_cluster: bool = Field(False, description="the URL names one node of a Redis Cluster")
    redis_max_connections: int = Field(64, ge=1)
    redis_timeout_s: float = Field(
        1.0, gt=0, description="socket and connect timeout of one Redis call: a stalled Redis costs a request "
                               "at most (redis_retries + 1) times this before it answers 503")
    redis_retries: int = Field(
        1, ge=0, le=5, description="retries of a Redis call after a timeout or a dropped connection; safe, "
                                   "since every write is idempotent (the append is applied once per request id)")
    redis_watch_s: float = Field(5.0, gt=0, description="how often Redis is checked for a restart that lost data")
    redis_wait_replicas: int = Field(
        0, ge=0, description="> 0: an append is acknowledged only once this many replicas have it (WAIT on the "
                             "append's connection), so a failover that promotes one of them loses no acknowledged "
                             "event; fewer within redis_wait_timeout_ms is a 503 saying the events were written. "
                             "0: acknowledged when the primary has it (a failover can lose the last writes)")
    redis_wait_timeout_ms: int = Field(
        100, ge=1, description="how long an append waits for redis_wait_replicas confirmations; below "
                               "redis_timeout_s, so that the wait ends before the socket gives up")
    key_prefix: str = Field("kvrec", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    state_ttl_s: int | None = Field(7 * 24 * 3600, ge=1, description="states are a cache: they may expire")
    events_ttl_s: int | None = Field(None, ge=1, description="the event log is the truth: no expiry by default")
    max_log_events: int = Field(10_000, ge=1, description="events kept per user; older ones are trimmed")
    idempotency_ttl_s: int = Field(
        3600, ge=1, description="how long a request id is remembered: a retry with the same Idempotency-Key "
                                "within this time appends nothing again")
    idempotency_keys_per_user: int = Field(64, ge=1, description="request ids remembered per user, newest kept")

    max_events_per_request: int = Field(1_000, ge=0)
    max_history_events: int = Field(100_000, ge=1, description="events in one PUT /users/{id}/history")
    max_candidates: int = Field(10_000, ge=1)
    max_k: int = Field(1_000, ge=1)
    max_id_length: int = Field(128, ge=1, description="longest user or item id, in UTF-8 bytes")
    max_body_bytes: int = Field(
        4 * 2**20, ge=1024, description="largest request body; larger ones get 413 before they are parsed. Decoding "
                                        "JSON holds the event loop's GIL, about 0.1 s per MiB at worst: this bounds "
                                        "the stall one request can cause (4 MiB: about 80,000 events)")
    prefill_chunk: int = Field(1_024, ge=1, description="events per extend when a state is built from the log")

    hot_tier_bytes: int = Field(
        256 * 2**20, ge=0, description="per worker, the most bytes of decoded states kept in memory on the model's "
                                       "device (least recently used go first), in front of Redis: a request "
                                       "whose user is held, and current in Redis, skips the blob's load and "
                                       "decode. 0: off")
    hot_writeback_events: int = Field(
        8, ge=1, description="a held state is written back to Redis once it has folded in this many events more "
                             "than the stored one (and when it is evicted, and at shutdown); a state Redis lacks "
                             "is written at once. 1: every request writes its state, as without the tier")

    metrics_samples: int = Field(20_000, ge=100, description="latency samples kept for percentiles")
    metrics_window_s: int = Field(10, ge=1, description="window of the throughput figure")
    metrics_flush_s: float = Field(
        0.25, gt=0, description="how often a worker adds what it counted to the shared metrics (off the "
                                "request path; a worker's own /metrics read flushes first)")
    metrics_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="metrics keys expire after this long unused")
    metrics_census_users: int = Field(
        100_000, ge=1, description="users whose state sizes the census keeps; past that, /metrics' per-user "
                                   "state figures are over the first ones counted")

    api_token: SecretStr | None = Field(
        None, description="when set, POST /recommend, PUT and DELETE /users/... and POST /metrics/reset need "
                          "`Authorization: Bearer <token>`")

    @model_validator(mode="after")
    def _wait_within_timeout(self) -> Settings:
        if self.redis_wait_replicas and self.redis_wait_timeout_ms >= self.redis_timeout_s * 1000:
            raise ValueError(f"redis_wait_timeout_ms ({self.redis_wait_timeout_ms}) must be below redis_timeout_s "
                             f"({self.redis_timeout_s} s): the socket would give up before the WAIT ends")
        return self

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def redis_url_redacted(self) -> str:
        """The Redis URL without its password, for messages and /metrics."""
        parts = urlsplit(self.redis_url)
        if parts.password is None:
            return self.redis_url
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
