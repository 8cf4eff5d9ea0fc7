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

from pydantic import AliasChoices, Field
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
        description="redis://, rediss:// or unix:// URL")
    redis_max_connections: int = Field(64, ge=1)
    redis_timeout_s: float = Field(2.0, gt=0, description="socket and connect timeout of one Redis call")
    key_prefix: str = Field("kvrec", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    state_ttl_s: int | None = Field(7 * 24 * 3600, ge=1, description="states are a cache: they may expire")
    events_ttl_s: int | None = Field(None, ge=1, description="the event log is the truth: no expiry by default")
    max_log_events: int = Field(10_000, ge=1, description="events kept per user; older ones are trimmed")

    max_events_per_request: int = Field(1_000, ge=0)
    max_history_events: int = Field(100_000, ge=1, description="events in one PUT /users/{id}/history")
    max_candidates: int = Field(10_000, ge=1)
    max_k: int = Field(1_000, ge=1)
    max_id_length: int = Field(128, ge=1, description="longest user or item id, in UTF-8 bytes")
    prefill_chunk: int = Field(1_024, ge=1, description="events per extend when a state is built from the log")

    metrics_samples: int = Field(20_000, ge=100, description="latency samples kept for percentiles")
    metrics_window_s: int = Field(10, ge=1, description="window of the throughput figure")

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
