"""Writes apply at most once per request id: in the store (a script run twice, a reused id) and through
the API (the Idempotency-Key header, echoed or made by the service, and a retry that answers without
appending again)."""

from __future__ import annotations

import pytest
from kvrec.server.store import IdempotencyConflict, LoggedEvent

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]

EVENTS = [("1", 1, 0), ("2", 2, 0)]


async def logged(store, user: str) -> list[str]:
    return [e.item_id for e in (await store.load(user, with_state=False, whole_log=True)).events]


async def test_an_append_runs_once_per_request_id(redis_store):
    first = await redis_store.append("u", EVENTS, request_id="r1")
    again = await redis_store.append("u", EVENTS, request_id="r1")  # a retried script, a retried request
    assert (first.events_total, first.replayed) == (2, False)
    assert (again.events_total, again.epoch, again.replayed, again.previous_answer) == (2, first.epoch, True, None)
    await redis_store.append("u", [("3", 3, 0)], request_id="r2")
    assert (await redis_store.append("u", EVENTS, request_id="r1")).replayed  # still known after later appends
    assert await logged(redis_store, "u") == ["1", "2", "3"]
    # a replayed request is not checked against the user's last timestamp: it was applied before it
    assert (await redis_store.append("u", [("3", 3, 0)], request_id="r2")).events_total == 3


async def test_a_reused_id_with_other_events_is_refused_and_writes_nothing(redis_store, shared_redis):
    await redis_store.append("u", EVENTS, request_id="r1")
    before = [shared_redis.dump(k) for k in redis_store.keys("u")[:3]]
    with pytest.raises(IdempotencyConflict, match="'r1' was already used"):
        await redis_store.append("u", [("9", 9, 0)], request_id="r1")
    with pytest.raises(IdempotencyConflict):  # the same events as a replace are another request
        await redis_store.append("u", EVENTS, replace=True, request_id="r1")
    assert [shared_redis.dump(k) for k in redis_store.keys("u")[:3]] == before


async def test_a_replayed_replace_keeps_what_came_after(redis_store):
    replaced = await redis_store.append("u", EVENTS, replace=True, request_id="put")
    await redis_store.append("u", [("3", 3, 0)], request_id="next")
    again = await redis_store.append("u", EVENTS, replace=True, request_id="put")
    assert (again.replayed, again.epoch, again.events_total) == (True, replaced.epoch, 3)
    assert await logged(redis_store, "u") == ["1", "2", "3"]


async def test_request_ids_are_bounded_per_user(key_prefix, shared_redis):
    from kvrec.server.settings import Settings
    from kvrec.server.store import RedisStore

    store = RedisStore.connect(Settings(redis_url="redis://127.0.0.1:6379/0", key_prefix=key_prefix,
                                        idempotency_keys_per_user=3, idempotency_ttl_s=100))
    for i in range(5):
        await store.append("u", [(str(i), i, 0)], request_id=f"r{i}")
    keys = store.keys("u")
    assert shared_redis.zrange(keys.requests, 0, -1) == [b"r2", b"r3", b"r4"]  # the newest kept
    assert sorted(shared_redis.hkeys(keys.digests)) == [b"r2", b"r3", b"r4"]
    assert 0 < shared_redis.ttl(keys.requests) <= 100 and 0 < shared_redis.ttl(keys.digests) <= 100
    assert (await store.append("u", [("4", 4, 0)], request_id="r4")).replayed
    assert not (await store.append("u", [("0", 5, 0)], request_id="r0")).replayed  # forgotten: applied anew
    await store.close()


async def test_requests_without_events_record_no_id(redis_store, shared_redis):
    await redis_store.append("u", [], request_id="read-only")
    assert not shared_redis.exists(*redis_store.keys("u"))


async def test_idempotency_key_through_the_api(client_for, redis_store):
    body = {"user_id": "u", "events": [{"item_id": "1", "ts": 10}], "k": 3}
    async with client_for() as client:
        r = await client.post("/recommend", json=body, headers={"Idempotency-Key": "order-17"})
        assert r.status_code == 200 and r.headers["Idempotency-Key"] == "order-17"
        assert (r.json()["replayed"], r.json()["state"]["events_seen"]) == (False, 1)
        again = await client.post("/recommend", json=body, headers={"Idempotency-Key": "order-17"})
        assert again.status_code == 200, again.text
        assert (again.json()["replayed"], again.json()["state"]["events_seen"]) == (True, 1)
        assert again.json()["items"] == r.json()["items"]

        other = {**body, "events": [{"item_id": "2", "ts": 11}]}
        r = await client.post("/recommend", json=other, headers={"Idempotency-Key": "order-17"})
        assert r.status_code == 422 and "'order-17' was already used" in r.json()["detail"]

        r = await client.post("/recommend", json=other)  # no key: the service makes one and says it
        made = r.headers["Idempotency-Key"]
        assert r.status_code == 200 and len(made) == 32
        assert (await client.post("/recommend", json=other, headers={"Idempotency-Key": made})).json()["replayed"]

        history = {"events": [{"item_id": "5", "ts": 1}]}
        r = await client.put("/users/v/history", json=history, headers={"Idempotency-Key": "load-v"})
        assert (r.status_code, r.json()["replayed"]) == (200, False)
        await client.post("/recommend", json={"user_id": "v", "events": [{"item_id": "6", "ts": 2}]})
        r = await client.put("/users/v/history", json=history, headers={"Idempotency-Key": "load-v"})
        assert (r.json()["replayed"], r.json()["state"]["events_seen"]) == (True, 2)  # the later event kept
    assert await logged(redis_store, "u") == ["1", "2"]
    assert (await redis_store.load("v", False, True)).events == (LoggedEvent("5", 1, 0), LoggedEvent("6", 2, 0))


@pytest.mark.parametrize("key", ["", "x" * 129, "naïve", "two words"])
async def test_a_malformed_idempotency_key_is_refused(client_for, redis_store, key):
    async with client_for() as client:
        r = await client.post("/recommend", json={"user_id": "u", "events": [{"item_id": "1", "ts": 1}]},
                              headers={"Idempotency-Key": key.encode()})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert await logged(redis_store, "u") == []
