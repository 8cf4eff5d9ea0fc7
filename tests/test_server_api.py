"""The HTTP contract of the ranking service, against the real Redis at 127.0.0.1:6379."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]


def events(items, start_ts=1_000, action=1):
    return [{"item_id": item, "ts": start_ts + i, "action": action} for i, item in enumerate(items)]


def user_keys(shared_redis, key_prefix) -> list[bytes]:
    return sorted(k for k in shared_redis.scan_iter(match=f"{key_prefix}:*") if b":metrics:" not in k)


async def test_recommend_contract(client_for, shared_redis, key_prefix):
    async with client_for(policy="full") as client:
        r = await client.post("/recommend", json={
            "user_id": "u42",
            "events": [{"item_id": "7", "ts": 978300760, "action": 4}, {"item_id": 3, "ts": 978300761}],
            "candidates": ["1", 2, "3"], "k": 2, "exclude_seen": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user_id"] == "u42"
        assert body["policy"] == "full"
        assert [set(i) for i in body["items"]] == [{"item_id", "score"}] * 2
        assert {i["item_id"] for i in body["items"]} <= {"1", "2", "3"}
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)
        assert body["state"]["events_seen"] == 2
        assert body["state"]["source"] == "miss"
        assert body["state"]["tokens_kept"] == 2 * 2  # two events, two layers
        assert body["state"]["bytes"] > 0
        for stage in ("total", "append", "load", "extend", "compress", "encode", "store", "score"):
            assert body["timing_ms"][stage] >= 0

        r = await client.post("/recommend", json={"user_id": "u42", "events": events(["9"], 978300762), "k": 5})
        body = r.json()
        assert body["state"]["source"] == "hit"
        assert body["state"]["events_seen"] == 3
        assert len(body["items"]) == 5  # whole catalogue

        r = await client.post("/recommend", json={"user_id": "u42", "k": 50, "exclude_seen": True})
        ids = [i["item_id"] for i in r.json()["items"]]
        assert len(ids) == 50 - 3 and not {"7", "3", "9"} & set(ids)  # catalogue minus the seen items
    keys = user_keys(shared_redis, key_prefix)
    assert all(b"{u42}" in k for k in keys) and len(keys) == 5  # events, meta, state, request ids and digests


async def test_user_ids_cannot_reach_other_users_keys(client_for, shared_redis, key_prefix):
    async with client_for() as client:
        for uid in ["a", "a}:events", "a:b", "{a}", "ä", 17]:
            r = await client.post("/recommend", json={"user_id": uid, "events": events(["1"])})
            assert r.status_code == 200, r.text
            assert r.json()["state"]["source"] == "miss"  # nobody else's state was found
            assert r.json()["state"]["events_seen"] == 1
    keys = user_keys(shared_redis, key_prefix)
    assert len(keys) == 6 * 5
    for key in keys:  # exactly one hash tag, and the encoded id has no key syntax in it
        tail = key.decode()[len(key_prefix) + 1:]
        assert tail.count("{") == 1 and tail.count("}") == 1 and tail.index("}") > tail.index("{")


async def test_history_put_and_delete(client_for, shared_redis, key_prefix):
    async with client_for(policy="full") as client:
        r = await client.put("/users/u1/history", json={"events": events([str(i % 50) for i in range(30)])})
        assert r.status_code == 200, r.text
        assert r.json()["state"]["events_seen"] == 30
        # replacing the history starts over
        r = await client.put("/users/u1/history", json={"events": events(["1", "2"], 10)})
        assert r.json()["state"]["events_seen"] == 2
        r = await client.post("/recommend", json={"user_id": "u1", "events": events(["3"], 20)})
        assert r.json()["state"] == {**r.json()["state"], "events_seen": 3, "source": "hit"}
        assert user_keys(shared_redis, key_prefix)

        r = await client.delete("/users/u1")
        assert r.status_code == 200
        assert r.json() == {"user_id": "u1", "keys_deleted": 5}
        assert user_keys(shared_redis, key_prefix) == []
        r = await client.get("/metrics")
        assert r.json()["state"]["users"] == 0
        # an earlier timestamp is fine now: the user is gone
        r = await client.post("/recommend", json={"user_id": "u1", "events": events(["3"], 1)})
        assert r.json()["state"] == {**r.json()["state"], "events_seen": 1, "source": "miss"}


BAD_REQUESTS = [
    ("malformed JSON", b'{"user_id": "u", "events": [', 422, "json"),
    ("missing user", {"events": []}, 422, "user_id"),
    ("user of wrong type", {"user_id": ["u"]}, 422, "user_id"),
    ("empty user", {"user_id": ""}, 422, "user_id is empty"),
    ("user too long", {"user_id": "u" * 129}, 422, "user_id is too long"),
    ("k of 0", {"user_id": "u", "k": 0}, 422, "k=0"),
    ("k above the limit", {"user_id": "u", "k": 1001}, 422, "k=1001"),
    ("k of wrong type", {"user_id": "u", "k": "10"}, 422, "k"),
    ("event without item", {"user_id": "u", "events": [{"ts": 1}]}, 422, "item_id"),
    ("event without ts", {"user_id": "u", "events": [{"item_id": "1"}]}, 422, "ts"),
    ("ts of wrong type", {"user_id": "u", "events": [{"item_id": "1", "ts": "yesterday"}]}, 422, "ts"),
    ("item of wrong type", {"user_id": "u", "events": [{"item_id": 1.5, "ts": 1}]}, 422, "item_id"),
    ("item too long", {"user_id": "u", "events": [{"item_id": "i" * 200, "ts": 1}]}, 422, "events[0].item_id"),
    ("negative action", {"user_id": "u", "events": [{"item_id": "1", "ts": 1, "action": -1}]}, 422, "action"),
    ("unknown field", {"user_id": "u", "kk": 3}, 422, "kk"),
    ("events out of order", {"user_id": "u", "events": events(["1", "2"], 5)[::-1]}, 422, "events[1].ts"),
    ("too many events", {"user_id": "u", "events": events(["1"] * 1001)}, 413, "too many events"),
    ("too many candidates", {"user_id": "u", "candidates": ["1"] * 10_001}, 413, "too many candidates"),
    ("unknown candidates", {"user_id": "u", "candidates": ["1", "nope", "404"]}, 422, "'nope', '404'"),
    ("empty candidates", {"user_id": "u", "candidates": []}, 422, "candidates is empty"),
]


@pytest.mark.parametrize("name,body,status,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
async def test_bad_input_is_rejected_and_writes_nothing(client_for, shared_redis, key_prefix, name, body,
                                                        status, needle):
    async with client_for() as client:
        if isinstance(body, bytes):
            r = await client.post("/recommend", content=body, headers={"content-type": "application/json"})
        else:
            r = await client.post("/recommend", json={**body, "events": body.get("events", events(["1"]))})
        assert r.status_code == status, r.text
        assert needle.lower() in r.text.lower()
    assert user_keys(shared_redis, key_prefix) == []


async def test_timestamp_before_last_event_is_rejected_and_writes_nothing(client_for, shared_redis, key_prefix):
    async with client_for() as client:
        await client.post("/recommend", json={"user_id": "u", "events": events(["1", "2"], 100)})
        before = {k: shared_redis.dump(k) for k in user_keys(shared_redis, key_prefix)}
        r = await client.post("/recommend", json={"user_id": "u", "events": events(["3", "4"], 100)})
        assert r.status_code == 422
        assert "events[0].ts=100 is earlier than the user's last event (ts=101)" in r.json()["detail"]
        assert {k: shared_redis.dump(k) for k in user_keys(shared_redis, key_prefix)} == before
        # an equal timestamp is not earlier
        r = await client.post("/recommend", json={"user_id": "u", "events": events(["3"], 101)})
        assert r.status_code == 200


async def test_unknown_event_items_enter_as_out_of_vocabulary(client_for):
    async with client_for() as client:
        await client.post("/metrics/reset")
        r = await client.post("/recommend", json={"user_id": "u", "events": events(["1", "new-item", "2"])})
        assert r.status_code == 200
        assert r.json()["state"]["events_seen"] == 3
        assert (await client.get("/metrics")).json()["events"]["oov"] == 1


async def test_cold_user_without_events(client_for, shared_redis, key_prefix):
    async with client_for() as client:
        r = await client.post("/recommend", json={"user_id": "nobody", "k": 3})
        assert r.status_code == 200
        assert len(r.json()["items"]) == 3
        assert r.json()["state"]["events_seen"] == 0
    assert user_keys(shared_redis, key_prefix) == []


async def test_metrics_document(client_for):
    async with client_for(policy="int8") as client:
        await client.post("/metrics/reset")
        # user u: answers, then the next request's first item grades that answer
        first = (await client.post("/recommend", json={"user_id": "u", "events": events(["1"]), "k": 10})).json()
        top = first["items"][0]["item_id"]
        await client.post("/recommend", json={"user_id": "u", "events": events([top], 2_000), "k": 10})
        await client.post("/recommend", json={"user_id": "v", "events": events(["2"]), "k": 0})
        m = (await client.get("/metrics")).json()
    assert m["requests"] == {"total": 3, "by_status": {"200": 2, "422": 1}}
    assert m["latency_ms"]["total"]["count"] == 2
    assert set(m["latency_ms"]) >= {"total", "load", "decode", "extend", "compress", "encode", "store", "score"}
    assert set(m["latency_ms"]["extend"]) == {"count", "mean", "p50", "p95", "p99"}
    assert m["throughput_rps"] > 0
    assert m["state"]["users"] == 1
    # the stored state is the first request's (a state Redis lacks is written at once); the second one's is
    # held in the hot tier, due for write-back after hot_writeback_events
    raw = 1 * 2 * 2 * (8 + 8) * 4  # one event x layers x heads x (d_k + d_v) x fp32
    assert m["state"]["compression_ratio"] == pytest.approx(raw / m["state"]["bytes_total"])
    assert m["cache"] == {"hits": 1, "misses": 1, "rebuilds": 0, "recomputes": 0, "cas_retries": 0, "store_failures": 0}
    hot = m["hot"]
    assert (hot["hits"], hot["misses"], hot["stale"], hot["hit_rate"]) == (1, 1, 0, 0.5)
    assert hot["enabled"] and hot["workers"] == 1 and hot["entries"] == 1 and 0 < hot["bytes"] <= 256 * 2**20
    assert m["accuracy"] == {"hr@10": 1.0, "ndcg@10": 1.0, "evaluated": 1}
    assert m["redis"]["used_memory"] > 0 and m["redis"]["keys"] > 0
    assert m["policy"] == "int8"
    assert m["model"]["num_items"] == 50 and m["model"]["fingerprint"]


async def test_probes_and_docs(client_for):
    async with client_for() as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = (await client.get("/readyz")).json()
        assert ready["status"] == "ready" and ready["policy"] == "full"
        schema = (await client.get("/openapi.json")).json()
        assert {"/recommend", "/metrics", "/metrics/reset", "/healthz", "/readyz", "/users/{user_id}/history",
                "/users/{user_id}"} <= set(schema["paths"])
        assert schema["paths"]["/recommend"]["post"]["description"]
        assert "source" in schema["components"]["schemas"]["StateInfo"]["properties"]
        assert (await client.get("/docs")).status_code == 200


async def test_history_bad_input_writes_nothing(client_for, shared_redis, key_prefix):
    async with client_for(max_history_events=10) as client:
        r = await client.put("/users/u/history", json={"events": events(["1"] * 11)})
        assert r.status_code == 413 and "max_history_events" in r.json()["detail"]
        r = await client.put(f"/users/{'u' * 200}/history", json={"events": events(["1"])})
        assert r.status_code == 422 and "user_id is too long" in r.json()["detail"]
        r = await client.put("/users/u/history", json={"events": events(["1", "2"], 5)[::-1]})
        assert r.status_code == 422 and "events[1].ts" in r.json()["detail"]
        r = await client.delete("/users/never-seen")
        assert r.json() == {"user_id": "never-seen", "keys_deleted": 0}
    assert user_keys(shared_redis, key_prefix) == []
