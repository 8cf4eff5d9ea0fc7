"""Shared fixtures: a tiny untrained checkpoint, real Redis servers (the shared one behind a unique key
prefix per test, or a private redis-server a test may stop), the state store on the shared one, and an
in-process client of the service."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import redis
import torch
from kvrec.models.checkpoint import save_checkpoint
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model

# Tests use tiny tensors: one intra-op thread, so that a busy 2-core machine does not spin idle workers.
torch.set_num_threads(1)

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"
TINY_ITEMS = 50


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """`make_checkpoint("sasrec")`: the path of an untrained model of 50 items (ids "0".."49"), made once
    per kind, with randomised relative biases so that position and time matter as in a trained model."""
    made: dict[str, Path] = {}

    def make(kind: str = "hstu") -> Path:
        if kind not in made:
            torch.manual_seed(0)
            model = build_model(ModelConfig(kind=kind, num_items=TINY_ITEMS, dim=16, heads=2, d_k=8, d_v=8,
                                            dropout=0.0)).eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("_bias"):
                        p.normal_(0, 0.5)
            made[kind] = tmp_path_factory.mktemp("model") / f"tiny-{kind}.ckpt"
            save_checkpoint(made[kind], model, [str(i) for i in range(TINY_ITEMS)], "test")
        return made[kind]

    return make


SWEEP_DATASET = "synth-short:users=12,mean_len=40"


@pytest.fixture(scope="session")
def sweep_model(tmp_path_factory) -> Path:
    """An untrained tiny HSTU over SWEEP_DATASET's catalogue, for sweeps that replay that dataset."""
    from kvrec.models.data import load_dataset

    ds = load_dataset(SWEEP_DATASET)
    model = build_model(ModelConfig(kind="hstu", num_items=ds.num_items, dim=16, heads=2, d_k=8, d_v=8,
                                    dropout=0.0)).eval()
    path = tmp_path_factory.mktemp("model") / "sweep-tiny.ckpt"
    save_checkpoint(path, model, ds.item_ids, ds.fingerprint())
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> Path:
    return make_checkpoint("hstu")


@pytest.fixture
def key_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are removed afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def shared_redis(key_prefix) -> Iterator[redis.Redis]:
    """A synchronous client of the shared Redis (127.0.0.1:6379), to look at what the service wrote."""
    client = redis.Redis.from_url(SHARED_REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {SHARED_REDIS_URL}")
    yield client
    client.close()


@pytest_asyncio.fixture
async def redis_store(shared_redis, key_prefix) -> AsyncIterator:
    """The service's RedisStore on the shared Redis under this test's prefix (a log of 100 events at most,
    states expire after 60 s, events never), to check what the service stored through the interface."""
    from kvrec.server.settings import Settings
    from kvrec.server.store import RedisStore

    store = RedisStore.connect(Settings(redis_url=SHARED_REDIS_URL, key_prefix=key_prefix, max_log_events=100,
                                        state_ttl_s=60, events_ttl_s=None))
    yield store
    await store.close()


@pytest.fixture
def private_redis() -> Iterator:
    """A redis-server of this test's own on a free port, which the test may stop and start again."""
    from kvrec.server.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def make_settings(tiny_checkpoint, key_prefix) -> Callable:
    """Settings for the tiny model on the shared Redis under this test's prefix; keywords override."""
    from kvrec.server.settings import Settings

    def make(**overrides) -> Settings:
        values = dict(model=tiny_checkpoint, policy="full", redis_url=SHARED_REDIS_URL, key_prefix=key_prefix)
        values.update(overrides)
        return Settings(**values)

    return make


@asynccontextmanager
async def running_client(settings) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client of the app in this process, with its lifespan run as uvicorn would (startup,
    lifespan state handed to each request, shutdown)."""
    from kvrec.server.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope, receive, send):
            scope["state"] = dict(state or {})
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://kvrec.test") as client:
            yield client


@pytest.fixture
def client_for(make_settings) -> Callable:
    """`async with client_for(policy="int8") as client:` an in-process client of a fresh app."""
    return lambda **overrides: running_client(make_settings(**overrides))
