"""The state invariants through the service: exactness of incremental serving, no lost events under
concurrency, compare-and-set, and a state that is only ever a cache of the event log."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis
from kvrec.server.store import UserStore, unpack_event

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]

ALL_ITEMS = [str(i) for i in range(50)]


def history(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    ts = 1_600_000_000
    out = []
    for _ in range(n):
        ts += rng.choice([0, 1, 7, 60, 3600, 86_400])
        out.append({"item_id": rng.choice(ALL_ITEMS + ["unknown"]), "ts": ts, "action": rng.randrange(5)})
    return out


def scores(response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    return {i["item_id"]: i["score"] for i in response.json()["items"]}


def rank_all(user: str, events: list[dict]) -> dict:
    return {"user_id": user, "events": events, "candidates": ALL_ITEMS, "k": 50}


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
async def test_incremental_equals_one_request_equals_recompute(client_for, make_checkpoint, kind):
    events = history(60)
    model = make_checkpoint(kind)
    async with client_for(policy="full", model=model) as client:
        whole = scores(await client.post("/recommend", json=rank_all("whole", events)))
        i, sizes = 0, [1, 2, 5, 1, 13, 3, 20, 15]
        while i < len(events):
            r = await client.post("/recommend", json=rank_all("pieces", events[i:i + sizes[0]]))
            i, sizes = i + sizes[0], sizes[1:] + sizes[:1]
        assert r.json()["state"]["source"] == "hit"
        pieces = scores(r)
    async with client_for(policy="recompute", model=model) as client:
        r = await client.post("/recommend", json=rank_all("pieces", []))  # the same log, computed anew
        assert r.json()["state"] == {"events_seen": 60, "tokens_kept": 120, "bytes": 0, "source": "recompute"}
        recomputed = scores(r)
    assert pieces.keys() == whole.keys() == recomputed.keys()
    for item in whole:
        assert pieces[item] == pytest.approx(whole[item], abs=1e-5)
        assert recomputed[item] == pytest.approx(whole[item], abs=1e-5)


@pytest.mark.parametrize("policy", ["full", "int8", "h2o:budget=8,recent=4", "kivi:bits=2"])
async def test_concurrent_requests_lose_no_event(client_for, shared_redis, key_prefix, policy):
    n = 60
    async with client_for(policy=policy, compute_concurrency=4) as client:
        await client.put("/users/u/history", json={"events": history(5)})
        base_ts = history(5)[-1]["ts"]
        bodies = [{"user_id": "u", "events": [{"item_id": f"c{i}", "ts": base_ts + 1}], "k": 5} for i in range(n)]
        responses = await asyncio.gather(*(client.post("/recommend", json=b) for b in bodies))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        # each response's state holds at least its own event and the history before it
        assert all(r.json()["state"]["events_seen"] >= 6 for r in responses)
        final = await client.post("/recommend", json={"user_id": "u", "k": 5})
        assert final.json()["state"]["events_seen"] == 5 + n
        assert final.json()["state"]["source"] == "hit"
        served = scores(await client.post("/recommend", json=rank_all("u", [])))
    log = [unpack_event(e)[0] for e in shared_redis.lrange(f"{key_prefix}:{{u}}:events", 0, -1)]
    assert sorted(log[5:]) == sorted(f"c{i}" for i in range(n))  # every event exactly once
    assert int(shared_redis.hget(f"{key_prefix}:{{u}}:meta", "n")) == 5 + n
    assert int(shared_redis.hget(f"{key_prefix}:{{u}}:state", "seq")) == 5 + n
    if policy == "full":  # the stored state is "the log's events, in the log's order"
        async with client_for(policy="recompute") as client:
            recomputed = scores(await client.post("/recommend", json=rank_all("u", [])))
        assert served == pytest.approx(recomputed, abs=1e-5)


async def test_compare_and_set_never_goes_backwards(shared_redis, key_prefix):
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    store = UserStore(client, key_prefix, max_log_events=100, state_ttl_s=60, events_ttl_s=None)
    appended = await store.append("u", [("1", 1, 0), ("2", 2, 0), ("3", 3, 0)])
    assert appended.events_total == 3 and appended.epoch
    assert await store.store("u", appended.epoch, 2, b"two", b"") == 1
    assert await store.store("u", appended.epoch, 1, b"one", b"") == 0  # older: refused
    assert await store.store("u", appended.epoch, 2, b"two again", b"") == 0  # not newer: refused
    assert await store.store("u", appended.epoch, 4, b"four", b"") == -1  # more events than logged
    assert await store.store("u", "another-epoch", 3, b"three", b"") == -1  # a replaced user
    loaded = await store.load("u", want_state=True, want_all=False)
    assert (loaded.state_seq, loaded.blob, loaded.entries_from) == (2, b"two", 2)
    assert [unpack_event(e) for e in loaded.entries] == [("3", 3, 0)]
    assert 0 < shared_redis.ttl(store.keys("u")[2]) <= 60
    assert shared_redis.ttl(store.keys("u")[0]) == -1  # events do not expire unless configured to
    assert await store.delete("u") == 3
    await client.aclose()


async def test_trimmed_log_keeps_absolute_positions(client_for, shared_redis, key_prefix):
    events = history(12)
    async with client_for(policy="full", max_log_events=5) as client:
        r = await client.post("/recommend", json=rank_all("u", events[:8]))
        assert r.json()["state"]["events_seen"] == 8
        assert shared_redis.llen(f"{key_prefix}:{{u}}:events") == 5
        shared_redis.delete(f"{key_prefix}:{{u}}:state")  # the cache is lost: rebuilt from the 5 kept
        r = await client.post("/recommend", json=rank_all("u", events[8:]))
        assert r.json()["state"] == {**r.json()["state"], "events_seen": 12, "tokens_kept": 2 * 5,
                                     "source": "miss"}
        r = await client.post("/recommend", json=rank_all("u", []))
        assert r.json()["state"]["source"] == "hit"
