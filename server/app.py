"""The FastAPI application: endpoints, lifespan, error mapping and the metrics middleware.

`create_app()` is the factory that uvicorn imports in every worker process (`kvrec.server.app:create_app`,
`factory=True`), so all configuration comes from the environment through `Settings`. The lifespan loads
the model and opens the store (one Redis connection pool, shared by the state store and the metrics
sink); handlers receive the pipeline, the metrics recorder and the store as dependencies, from the
lifespan state. Nothing here talks to Redis itself: the store's StoreUnavailable becomes a 503.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from kvrec.server.engine import Engine
from kvrec.server.metrics import MetricsRecorder
from kvrec.server.pipeline import InputError, RankingPipeline, Served
from kvrec.server.schemas import (
    DeleteResponse,
    HistoryRequest,
    HistoryResponse,
    Problem,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
    StateInfo,
)
from kvrec.server.settings import Settings
from kvrec.server.store import (
    RedisStore,
    StateStore,
    StoreUnavailable,
)

log = logging.getLogger("kvrec.server")

COUNTED_PATHS = ("/recommend", "/users/")  # the serving endpoints; probes and /metrics are not counted


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    engine = await anyio.to_thread.run_sync(Engine.from_settings, settings)
    store = RedisStore.connect(settings)
    log.info("serving %s (fingerprint %s) with policy %s, Redis %s", settings.model,
             engine.fingerprint, engine.spec, settings.redis_url_redacted())
    try:
        yield {"pipeline": RankingPipeline(store, engine, settings), "store": store,
               "metrics": MetricsRecorder(store.metrics_sink(settings.metrics_samples), settings)}
    finally:
        await store.close()


def get_pipeline(request: Request) -> RankingPipeline:
    return request.state.pipeline


def get_metrics(request: Request) -> MetricsRecorder:
    return request.state.metrics


def get_store(request: Request) -> StateStore:
    return request.state.store


Pipeline = Annotated[RankingPipeline, Depends(get_pipeline)]
Metrics = Annotated[MetricsRecorder, Depends(get_metrics)]
Store = Annotated[StateStore, Depends(get_store)]


class MetricsMiddleware:
    """Records every request to a serving endpoint, with its status and (when served) its sample, just
    before the response starts: a client that reads /metrics after its answer sees it counted."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(COUNTED_PATHS):
            return await self.app(scope, receive, send)

        async def send_recorded(message):
            if message["type"] == "http.response.start":
                state = scope.get("state", {})
                await state["metrics"].record(message["status"], state.get("sample"))
            await send(message)

        await self.app(scope, receive, send_recorded)


def _state(served: Served) -> StateInfo:
    c = served.computed
    return StateInfo(events_seen=c.events_seen, tokens_kept=c.tokens_kept, bytes=served.state_bytes,
                     source=c.source)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    errors = {413: {"model": Problem, "description": "too many events or candidates"},
              422: {"model": Problem, "description": "a malformed request; `detail` names the problem"},
              503: {"model": Problem, "description": "Redis is unreachable; retry later"}}
    app = FastAPI(
        title="kvrec ranking service",
        summary="Sequential recommendations from per-user compressed attention states kept in Redis.",
        description=(
            "Each request appends the user's new events to their log in Redis, extends the user's cached "
            "key/value attention state with only those events, compresses it with the configured policy, "
            "stores it back (compare-and-set), and ranks items against it. `/metrics` reports latency per "
            "stage, state bytes, cache outcomes and online accuracy, summed over all worker processes."),
        version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(MetricsMiddleware)

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, exc: StoreUnavailable):
        return JSONResponse(
            {"detail": f"Redis at {settings.redis_url_redacted()} is unavailable ({exc}); nothing was served, "
                       "retry later"}, status_code=503)

    @app.post("/recommend", response_model=RecommendResponse, responses=errors, tags=["serving"])
    async def recommend(body: RecommendRequest, request: Request, pipeline: Pipeline) -> RecommendResponse:
        """Append the user's new events, bring their state up to date and return the top-k items.

        The events are appended to the user's log before anything else and the state is extended with
        every logged event it has not folded in yet, so concurrent requests for one user lose nothing.
        A rejected request (4xx) writes nothing."""
        served = await pipeline.recommend(body)
        request.state.sample = served.sample
        return RecommendResponse(
            user_id=served.user_id, items=[ScoredItem(item_id=i, score=s) for i, s in served.items],
            policy=pipeline.engine.spec, state=_state(served), timing_ms=served.timing_ms)

    @app.put("/users/{user_id}/history", response_model=HistoryResponse, responses=errors, tags=["users"])
    async def put_history(user_id: str, body: HistoryRequest, request: Request,
                          pipeline: Pipeline) -> HistoryResponse:
        """Replace the user's whole history and build their state: warms states before a measured replay."""
        served = await pipeline.put_history(user_id, body.events)
        request.state.sample = served.sample
        return HistoryResponse(user_id=served.user_id, policy=pipeline.engine.spec, state=_state(served),
                               timing_ms=served.timing_ms)

    @app.delete("/users/{user_id}", response_model=DeleteResponse, responses=errors, tags=["users"])
    async def delete_user(user_id: str, pipeline: Pipeline, metrics: Metrics) -> DeleteResponse:
        """Forget the user entirely: event log, state and last answer."""
        user_id, deleted = await pipeline.forget(user_id)
        await metrics.forget_user(user_id)
        return DeleteResponse(user_id=user_id, keys_deleted=deleted)

    @app.get("/metrics", tags=["observability"], responses={503: errors[503]})
    async def metrics_report(pipeline: Pipeline, metrics: Metrics) -> dict:
        """One JSON document: requests by status, latency percentiles per stage, throughput, state bytes,
        cache outcomes, online accuracy (each user's previous top-10 graded by their next event), Redis
        memory, policy and model. The same totals whichever worker answers."""
        return await metrics.report(pipeline.engine)

    @app.post("/metrics/reset", tags=["observability"], responses={503: errors[503]})
    async def metrics_reset(metrics: Metrics) -> dict:
        """Start a fresh measurement phase: zero the counters, latency samples and throughput window."""
        await metrics.reset()
        return {"reset": True}

    @app.get("/healthz", tags=["observability"])
    async def healthz() -> dict:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["observability"], responses={503: errors[503]})
    async def readyz(pipeline: Pipeline, store: Store):
        """The model is loaded and Redis answers."""
        await store.ping()
        return {"status": "ready", "policy": pipeline.engine.spec, "model": pipeline.engine.fingerprint}

    return app
