"""The FastAPI application: endpoints, lifespan, error mapping, the body limit and the metrics middleware.

`create_app()` is the factory that uvicorn imports in every worker process (`kvrec.server.app:create_app`,
`factory=True`), so all configuration comes from the environment through `Settings`. The lifespan loads
the model, opens the store (one Redis connection pool, shared by the state store and the metrics sink)
and starts the metrics task, and at shutdown writes back the hot tier's states that Redis lacks; handlers
receive the pipeline, the metrics recorder and the store as dependencies, from the lifespan state.
Nothing here talks to Redis itself.

Every error is one `Problem` body, validation errors included: StoreUnavailable is a 503 that says what
the request may have written and the id to retry it with, DamagedLog a 409 that names the user and the
damage, a body over `max_body_bytes` a 413 before it is parsed. Request bodies are parsed and validated
here rather than by FastAPI, in a worker thread when they are large, so that a big body never holds the
event loop that every other request needs.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import cache
from typing import Annotated, TypeVar, get_args, get_origin

import anyio
from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kvrec.server.engine import Engine
from kvrec.server.metrics import MetricsRecorder
from kvrec.server.pipeline import InputError, RankingPipeline, Served, new_request_id
from kvrec.server.schemas import (
    DeleteResponse,
    Health,
    HistoryRequest,
    HistoryResponse,
    MetricsReport,
    Problem,
    Ready,
    RecommendRequest,
    RecommendResponse,
    ResetResponse,
    ScoredItem,
    StateInfo,
)
from kvrec.server.settings import Settings
from kvrec.server.store import DamagedLog, RedisStore, StateStore, StoreUnavailable, Written
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException

log = logging.getLogger("kvrec.server")

COUNTED_PATHS = ("/recommend", "/users/")  # the serving endpoints; probes and /metrics are not counted
THREAD_PARSE_BYTES = 64 * 1024  # bodies larger than this are parsed in a worker thread
VALIDATION_SLICE = 2_000  # list items validated in one step (a few ms holding the GIL)
IDEMPOTENCY_KEY = "Idempotency-Key"
Model = TypeVar("Model", bound=BaseModel)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    engine = await anyio.to_thread.run_sync(Engine.from_settings, settings)
    store = RedisStore.connect(settings)
    pipeline = RankingPipeline(store, engine, settings)
    metrics = MetricsRecorder(store.metrics_sink(settings), store, settings, pipeline.tier)
    log.info("serving %s (fingerprint %s) with policy %s, Redis %s, hot tier %s", settings.model,
             engine.fingerprint, engine.spec, settings.redis_url_redacted(),
             f"{settings.hot_tier_bytes} bytes, written back every {settings.hot_writeback_events} events"
             if pipeline.tier is not None else "off")
    metrics.start()
    try:
        yield {"pipeline": pipeline, "store": store, "metrics": metrics}
    finally:
        await pipeline.close()  # held states the store lacks, before the connections go
        await metrics.close()
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


async def request_id(
        request: Request, response: Response,
        key: Annotated[str | None, Header(
            alias=IDEMPOTENCY_KEY, min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$",
            description="your id for this request (1 to 128 visible ASCII characters): its events are appended "
                        "at most once per key, so a retry with the same key is always safe. Without one, the "
                        "service makes one and returns it in this header")] = None) -> str:
    """The request's id, echoed in the response header (errors included) so that a client can retry."""
    request.state.request_id = key or new_request_id()
    response.headers[IDEMPOTENCY_KEY] = request.state.request_id
    return request.state.request_id


RequestId = Annotated[str, Depends(request_id)]


def json_body(model: type[Model]) -> Callable:
    """A dependency that parses the body as `model` (`parse_in_steps`), in a worker thread above
    THREAD_PARSE_BYTES. Its errors are FastAPI's validation errors, under `body`."""

    async def parse(request: Request) -> Model:
        raw = await request.body()
        if len(raw) > THREAD_PARSE_BYTES:
            return await anyio.to_thread.run_sync(parse_in_steps, model, raw)
        return parse_in_steps(model, raw)

    return parse


def parse_in_steps(model: type[Model], raw: bytes) -> Model:
    """`raw` as `model`, validated a slice of each long list at a time. Decoding and validation hold the
    GIL, so a worker thread alone would still stall the event loop (0.5 s for 150,000 events); between
    slices the loop's thread gets the GIL back, which leaves one stall, the JSON decoding: measured on a
    busy 2-core machine, 0.12 s for 7 MiB of events, and 0.5 s for the worst body, 4 MiB of one object
    with 350,000 keys (BodyLimit caps the MiB: max_body_bytes trades the largest history one PUT can
    carry against this stall). Unknown top-level fields are refused before validation, so that a body
    of a million of them costs one error, not a million."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        invalid = {"loc": ("body",), "msg": f"Invalid JSON: {exc}", "type": "json_invalid"}
        raise RequestValidationError([invalid]) from None
    validated = {}
    if isinstance(data, dict):
        unknown = [name for name in data if name not in model.model_fields]
        if unknown:
            raise RequestValidationError([{"loc": ("body", name), "msg": "Extra inputs are not permitted",
                                           "type": "extra_forbidden"} for name in unknown[:20]])
        for name, items in _long_lists(model).items():
            value = data.get(name)
            if isinstance(value, list) and len(value) > VALIDATION_SLICE:
                validated[name] = [x for start in range(0, len(value), VALIDATION_SLICE)
                                   for x in _validate_slice(items, value, start, name)]
                data[name] = []  # validated already: the model does not go over them again
    try:
        return model.model_validate(data).model_copy(update=validated)
    except ValidationError as exc:
        raise _validation_error(exc, ()) from None


def _validate_slice(items: TypeAdapter, values: list, start: int, name: str) -> list:
    try:
        out = items.validate_python(values[start:start + VALIDATION_SLICE])
    except ValidationError as exc:
        raise _validation_error(exc, (name,), shift=start) from None
    time.sleep(0)  # hand the GIL to the event loop's thread
    return out


@cache
def _long_lists(model: type[BaseModel]) -> dict[str, TypeAdapter]:
    """The model's list fields, each with an adapter that validates its items."""
    return {name: TypeAdapter(list[get_args(f.annotation)[0]]) for name, f in model.model_fields.items()
            if get_origin(f.annotation) is list}


def _validation_error(exc: ValidationError, prefix: tuple, shift: int = 0) -> RequestValidationError:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    located = []
    for e in errors[:100]:
        loc = list(e["loc"])
        if prefix and loc:
            loc[0] += shift
        located.append({**e, "loc": ("body", *prefix, *loc)})
    return RequestValidationError(located)


def body_doc(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route whose body `json_body` parses (FastAPI does not see it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


class BodyLimit:
    """413 for a body over `max_bytes`, before anything parses it: at once from its Content-Length, or as
    soon as a streamed (chunked) body passes the limit. The body read here is handed on to the app."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(int(declared), scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(size, scope, receive, send, streamed=True)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)

        async def replay():
            nonlocal body
            if body is None:
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        await self.app(scope, replay, send)

    async def _too_large(self, size: int, scope, receive, send, streamed: bool = False) -> None:
        what = f"more than {self.max_bytes}" if streamed else str(size)
        response = problem(413, f"request body of {what} bytes is over the limit of {self.max_bytes} bytes "
                                "(max_body_bytes)", headers={"Connection": "close"})
        await response(scope, receive, send)


class MetricsMiddleware:
    """Counts every request to a serving endpoint, with its status and (when served) its sample, as its
    response starts; an exception that escapes the app is counted as the 500 it becomes. Counting is
    in-process (MetricsRecorder.record), so it never delays or fails the response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(COUNTED_PATHS):
            return await self.app(scope, receive, send)
        started = False

        async def send_recorded(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                state = scope.get("state", {})
                state["metrics"].record(message["status"], state.get("sample"))
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        except Exception:
            if not started:
                scope["state"]["metrics"].record(500, None)
            raise


def problem(status: int, detail: str, headers: dict[str, str] | None = None, **fields) -> JSONResponse:
    body = Problem(detail=detail, **fields).model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


def _state(served: Served) -> StateInfo:
    c = served.computed
    return StateInfo(events_seen=c.events_seen, tokens_kept=c.tokens_kept, bytes=served.state_bytes,
                     source=c.source, hot=served.hot)


Credentials = Annotated[HTTPAuthorizationCredentials | None,
                        Depends(HTTPBearer(auto_error=False, description="KVREC_API_TOKEN, when the service has one"))]


def _bearer(token: str) -> Callable:
    """A dependency that refuses a request without `Authorization: Bearer <token>` (compared in constant time)."""

    async def check(credentials: Credentials) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "this endpoint needs `Authorization: Bearer <token>` with the service's "
                                     "KVREC_API_TOKEN", headers={"WWW-Authenticate": "Bearer"})

    return check


def _written_detail(exc: StoreUnavailable, url: str) -> str:
    if exc.out_of_memory:
        return f"Redis at {url} is out of memory (maxmemory): nothing was written; retry later"
    said = {Written.NOTHING: "nothing was written; retry later",
            Written.UNKNOWN: "the request's write may have been applied: retry with the same Idempotency-Key, "
                             "which applies it at most once",
            Written.EVENTS: "the request's events were appended but it was not answered: retry with the same "
                            "Idempotency-Key, which answers without appending them again"}[exc.written]
    return f"Redis at {url} is unavailable ({exc}); {said}"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    errors = {
        409: {"model": Problem, "description": "the user's stored log is damaged; `detail` names the damage, "
                                               "and replacing or deleting the user repairs it"},
        413: {"model": Problem, "description": "a body over max_body_bytes, or too many events or candidates"},
        422: {"model": Problem, "description": "a malformed request; `detail` names the problem, `errors` "
                                               "lists every one"},
        503: {"model": Problem, "description": "Redis is unreachable, stalled or out of memory; `written` says "
                                               "what the request left behind; retry later"},
        "default": {"model": Problem, "description": "any other error (401, 404, 405, 500), as a Problem"},
    }
    reads = {503: errors[503], "default": errors["default"]}
    if settings.api_token is not None:
        errors[401] = {"model": Problem, "description": "a missing or wrong bearer token"}
    guarded = [Depends(_bearer(settings.api_token.get_secret_value()))] if settings.api_token else []

    app = FastAPI(
        title="kvrec ranking service",
        summary="Sequential recommendations from per-user compressed attention states kept in Redis.",
        description=(
            "Each request appends the user's new events to their log in Redis, extends the user's cached "
            "key/value attention state with only those events, compresses it with the configured policy, "
            "stores it back (compare-and-set), and ranks items against it. `/metrics` reports latency per "
            "stage, state bytes, cache outcomes and online accuracy, summed over all worker processes. "
            "Writes are idempotent per `Idempotency-Key`; every error is a `Problem`."),
        version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)  # outermost: it counts the body limit's 413s too

    def key_of(request: Request) -> dict[str, str]:
        key = getattr(request.state, "request_id", None)
        return {IDEMPOTENCY_KEY: key} if key else {}

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return problem(exc.status, str(exc), headers=key_of(request))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        found = [{"loc": [str(p) if not isinstance(p, int) else p for p in e["loc"]], "msg": e["msg"],
                  "type": e["type"]} for e in exc.errors()]
        shown = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in found[:5])
        more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
        return problem(422, shown + more, headers=key_of(request), errors=found[:100])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return problem(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, exc: StoreUnavailable):
        key = key_of(request)
        return problem(503, _written_detail(exc, settings.redis_url_redacted()), headers={**key, "Retry-After": "1"},
                       written=exc.written.value, idempotency_key=key.get(IDEMPOTENCY_KEY))

    @app.exception_handler(DamagedLog)
    async def damaged(request: Request, exc: DamagedLog):
        log.error("%s", exc)
        return problem(409, f"{exc}; PUT /users/{{user_id}}/history replaces it, DELETE /users/{{user_id}} "
                            "removes it", headers=key_of(request), user_id=exc.user_id)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return problem(500, f"internal error ({type(exc).__name__}); it is logged")

    @app.post("/recommend", response_model=RecommendResponse, responses=errors, tags=["serving"],
              dependencies=guarded, openapi_extra=body_doc(RecommendRequest))
    async def recommend(body: Annotated[RecommendRequest, Depends(json_body(RecommendRequest))], request: Request,
                        pipeline: Pipeline, key: RequestId) -> RecommendResponse:
        """Append the user's new events, bring their state up to date and return the top-k items.

        The events are appended to the user's log before anything else, at most once per Idempotency-Key,
        and the state is extended with every logged event it has not folded in yet, so concurrent requests
        for one user lose nothing and a retried one duplicates nothing. A rejected request (4xx) writes
        nothing."""
        served = await pipeline.recommend(body, key)
        request.state.sample = served.sample
        return RecommendResponse(
            user_id=served.user_id, items=[ScoredItem(item_id=i, score=s) for i, s in served.items],
            policy=pipeline.engine.spec, mode=getattr(served.computed, "mode", "retrieval"),
            replayed=served.replayed, state=_state(served), timing_ms=served.timing_ms)

    @app.put("/users/{user_id}/history", response_model=HistoryResponse, responses=errors, tags=["users"],
             dependencies=guarded, openapi_extra=body_doc(HistoryRequest))
    async def put_history(user_id: str, body: Annotated[HistoryRequest, Depends(json_body(HistoryRequest))],
                          request: Request, pipeline: Pipeline, key: RequestId) -> HistoryResponse:
        """Replace the user's whole history and build their state: warms states before a measured replay.

        The new log is written before the old one is dropped, in one step: a Redis out of memory
        refuses it with the old log intact (503, `written: nothing`)."""
        served = await pipeline.put_history(user_id, body.events, key)
        request.state.sample = served.sample
        return HistoryResponse(user_id=served.user_id, policy=pipeline.engine.spec, replayed=served.replayed,
                               state=_state(served), timing_ms=served.timing_ms)

    @app.delete("/users/{user_id}", response_model=DeleteResponse, responses=errors, tags=["users"],
                dependencies=guarded)
    async def delete_user(user_id: str, pipeline: Pipeline, metrics: Metrics) -> DeleteResponse:
        """Forget the user entirely: event log, state, last answer and request ids. Repairs a damaged user."""
        user_id, deleted = await pipeline.forget(user_id)
        await metrics.forget_user(user_id)
        return DeleteResponse(user_id=user_id, keys_deleted=deleted)

    @app.get("/metrics", response_model=MetricsReport, tags=["observability"], responses=reads)
    async def metrics_report(pipeline: Pipeline, metrics: Metrics) -> MetricsReport:
        """One JSON document: requests by status, latency percentiles per stage, throughput, state bytes,
        cache outcomes, online accuracy (each user's previous top-10 graded by their next event), Redis
        memory and restarts, policy and model. The same totals whichever worker answers."""
        return await metrics.report(pipeline.engine)

    @app.post("/metrics/reset", response_model=ResetResponse, tags=["observability"], responses=reads,
              dependencies=guarded)
    async def metrics_reset(metrics: Metrics) -> ResetResponse:
        """Start a fresh measurement phase: zero the counters, latency samples and throughput window."""
        await metrics.reset()
        return ResetResponse(reset=True)

    @app.get("/healthz", response_model=Health, tags=["observability"], responses={"default": errors["default"]})
    async def healthz() -> Health:
        """The process is alive (Redis is not asked)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Ready, tags=["observability"], responses=reads)
    async def readyz(pipeline: Pipeline, store: Store) -> Ready:
        """The model is loaded and Redis answers within redis_timeout_s (never longer)."""
        with anyio.move_on_after(settings.redis_timeout_s) as waited:
            await store.ping()
        if waited.cancelled_caught:
            raise StoreUnavailable(f"no answer within {settings.redis_timeout_s} s", Written.NOTHING)
        return Ready(status="ready", policy=pipeline.engine.spec, model=pipeline.engine.fingerprint)

    def openapi() -> dict:
        """FastAPI's schema, plus the request bodies that `json_body` parses."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (RecommendRequest, HistoryRequest):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
