"""Every error is one Problem body (validation errors, unknown paths and methods, the body limit, auth
included) and is documented in the OpenAPI; ids that are not valid Unicode are 422; the optional bearer
token guards the endpoints that write or delete, and only them."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]

ONE = {"user_id": "u", "events": [{"item_id": "1", "ts": 1}]}


def assert_problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert set(body) <= {"detail", "errors", "written", "idempotency_key", "user_id"}
    return body


async def test_every_error_is_a_problem(client_for):
    async with client_for(max_body_bytes=4096) as client:
        body = assert_problem(await client.post("/recommend", json={"user_id": "u", "k": "10"}), 422)
        assert body["detail"] == "body.k: Input should be a valid integer"
        assert body["errors"] == [{"loc": ["body", "k"], "msg": "Input should be a valid integer", "type": "int_type"}]
        body = assert_problem(await client.post("/recommend", json={"user_id": "u", "exclude_seen": 0}), 422)
        assert body["errors"][0]["loc"] == ["body", "exclude_seen"]  # strict: 0 is not a boolean
        body = assert_problem(await client.post("/recommend", content=b"not json"), 422)
        assert body["errors"][0]["type"] == "json_invalid"
        assert_problem(await client.post("/recommend", content=b""), 422)
        assert_problem(await client.get("/nowhere"), 404)
        r = await client.patch("/recommend", json=ONE)
        assert_problem(r, 405)
        assert r.headers["allow"] == "POST"
        r = await client.post("/recommend", content=b"x" * 5000)
        assert "over the limit of 4096 bytes" in assert_problem(r, 413)["detail"]
        r = await client.put("/users/u/history", json={"events": [{"item_id": "1", "ts": i} for i in range(200)]})
        assert "(max_body_bytes)" in assert_problem(r, 413)["detail"]
        m = (await client.get("/metrics")).json()
    assert m["requests"]["by_status"] == {"405": 1, "413": 2, "422": 4}  # /nowhere is not a serving path


async def test_a_streamed_body_is_cut_at_the_limit(client_for, redis_store):
    async def chunks():
        for _ in range(100):
            yield b"x" * 1024

    async with client_for(max_body_bytes=8192) as client:
        r = await client.post("/recommend", content=chunks())  # no Content-Length: chunked
        assert "more than 8192 bytes" in assert_problem(r, 413)["detail"]
        assert (await client.post("/recommend", json=ONE)).status_code == 200  # served as before


@pytest.mark.parametrize("where", ["user_id", "item_id", "candidate"])
async def test_lone_surrogates_are_422_and_write_nothing(client_for, redis_store, where):
    body = {"user_id": "u", "events": [{"item_id": "1", "ts": 1}], "candidates": ["1"]}
    bad = "\\ud800"
    text = json.dumps(body)
    text = {"user_id": text.replace('"u"', f'"{bad}"'),
            "item_id": text.replace('"item_id": "1"', f'"item_id": "{bad}"'),
            "candidate": text.replace('["1"]', f'["{bad}"]')}[where]
    async with client_for() as client:
        r = await client.post("/recommend", content=text.encode(), headers={"content-type": "application/json"})
        assert "surrogate" in assert_problem(r, 422)["detail"] or "hex escape" in r.json()["detail"]
    assert (await redis_store.load("u", False, True)).events == ()


async def test_the_pipeline_refuses_unencodable_ids(make_settings):
    """Ids that reach the pipeline other than as JSON (which refuses lone surrogates itself), e.g. from
    `kvrec bench serve`, are checked too."""
    from kvrec.server.app import create_app
    from kvrec.server.pipeline import InputError

    app = create_app(make_settings())
    async with app.router.lifespan_context(app) as state:
        with pytest.raises(InputError, match="user_id is not valid Unicode: surrogates not allowed at character 1"):
            await state["pipeline"].forget("u\ud800")


async def test_openapi_documents_one_error_schema_and_every_body(client_for):
    async with client_for() as client:
        schema = (await client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components  # FastAPI's list-valued detail is gone
    assert components["Problem"]["properties"]["detail"] == {
        "type": "string", "title": "Detail", "description": "what is wrong, in one message"}
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            responses = op["responses"]
            assert "default" in responses, (method, path)
            for status, response in responses.items():
                content = response.get("content", {}).get("application/json", {})
                if status != "200":
                    assert content["schema"] == {"$ref": "#/components/schemas/Problem"}, (method, path, status)
                else:
                    assert "$ref" in content["schema"], (method, path)  # a response model, not a bare dict
    recommend = schema["paths"]["/recommend"]["post"]
    assert recommend["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RecommendRequest"}
    assert [p["name"] for p in recommend["parameters"]] == ["Idempotency-Key"]
    assert set(recommend["responses"]) == {"200", "409", "413", "422", "503", "default"}
    for name in ("RecommendRequest", "RecommendResponse", "HistoryRequest", "HistoryResponse", "DeleteResponse",
                 "Problem", "Health", "Ready", "ResetResponse", "MetricsReport", "ScoredItem", "StateInfo"):
        assert components[name].get("examples"), f"{name} has no example"
    assert components["RecommendResponse"]["properties"]["mode"]["enum"] == ["ranking", "retrieval"]
    assert "securitySchemes" not in schema["components"]  # no token configured: nothing to document


async def test_bearer_token_guards_writes_only(client_for, redis_store):
    async with client_for(api_token="s3cret") as client:
        for method, path, body in [("POST", "/recommend", ONE), ("PUT", "/users/u/history", {"events": []}),
                                   ("DELETE", "/users/u", None), ("POST", "/metrics/reset", None)]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                r = await client.request(method, path, json=body, headers=headers)
                assert "KVREC_API_TOKEN" in assert_problem(r, 401)["detail"], (method, path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
        assert await redis_store.load("u", False, True) == await redis_store.load("nobody", False, True)
        ok = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/recommend", json=ONE, headers=ok)).status_code == 200
        assert (await client.delete("/users/u", headers=ok)).status_code == 200
        for path in ("/metrics", "/healthz", "/readyz", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path
        schema = (await client.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"] == {"HTTPBearer": {
        "type": "http", "scheme": "bearer", "description": "KVREC_API_TOKEN, when the service has one"}}
    assert schema["paths"]["/recommend"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "401" in schema["paths"]["/recommend"]["post"]["responses"]
    assert "security" not in schema["paths"]["/metrics"]["get"]


async def test_an_unexpected_error_is_a_counted_500_problem(make_settings, monkeypatch):
    import httpx
    from kvrec.server.app import create_app
    from kvrec.server.pipeline import RankingPipeline

    async def broken(self, request, request_id=None):
        raise RuntimeError("a bug, not the user's input")

    monkeypatch.setattr(RankingPipeline, "recommend", broken)
    app = create_app(make_settings())
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope, receive, send):
            scope["state"] = dict(state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state, raise_app_exceptions=False)  # as a server answers
        async with httpx.AsyncClient(transport=transport, base_url="http://kvrec.test") as client:
            r = await client.post("/recommend", json=ONE)
            assert assert_problem(r, 500) == {"detail": "internal error (RuntimeError); it is logged"}
            assert (await client.get("/metrics")).json()["requests"]["by_status"] == {"500": 1}
