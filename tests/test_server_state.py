"""The state invariants through the service: exactness of incremental serving, no lost events under
concurrency, compare-and-set, and a state that is only ever a cache of the event log."""

from __future__ import annotations

import asyncio
import random

import pytest

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


@pytest.mark.parametrize("hot_tier_bytes", [0, 2**20], ids=["redis", "hot tier"])
@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
async def test_incremental_equals_one_request_equals_recompute(client_for, make_checkpoint, kind, hot_tier_bytes):
    """Pieces extended from the stored blob each time, or from the worker's hot copy (written back every 4
    events), give the scores of one request and of a recompute."""
    events = history(60)
    model = make_checkpoint(kind)
    async with client_for(policy="full", model=model, hot_tier_bytes=hot_tier_bytes,
                          hot_writeback_events=4) as client:
        whole = scores(await client.post("/recommend", json=rank_all("whole", events)))
        i, sizes = 0, [1, 2, 5, 1, 13, 3, 20, 15]
        while i < len(events):
            r = await client.post("/recommend", json=rank_all("pieces", events[i:i + sizes[0]]))
            i, sizes = i + sizes[0], sizes[1:] + sizes[:1]
        assert r.json()["state"]["source"] == "hit" and r.json()["state"]["hot"] == bool(hot_tier_bytes)
        pieces = scores(r)
    async with client_for(policy="recompute", model=model) as client:
        r = await client.post("/recommend", json=rank_all("pieces", []))  # the same log, computed anew
        assert r.json()["state"] == {"events_seen": 60, "tokens_kept": 120, "bytes": 0, "source": "recompute",
                                     "hot": False}
        recomputed = scores(r)
    assert pieces.keys() == whole.keys() == recomputed.keys()
    for item in whole:
        assert pieces[item] == pytest.approx(whole[item], abs=1e-5)
        assert recomputed[item] == pytest.approx(whole[item], abs=1e-5)


@pytest.mark.parametrize("hot_tier_bytes", [0, 2**20], ids=["redis", "hot tier"])
@pytest.mark.parametrize("policy", ["full", "int8", "h2o:budget=8,recent=4", "kivi:bits=2"])
async def test_concurrent_requests_lose_no_event(client_for, redis_store, policy, hot_tier_bytes):
    """Concurrent requests of one user, in one worker: with the hot tier they extend the same held copy at
    once, and the copy kept (and the state stored at shutdown) holds every event."""
    n = 60
    async with client_for(policy=policy, compute_concurrency=4, hot_tier_bytes=hot_tier_bytes) as client:
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
    snapshot = await redis_store.load("u", with_state=True, whole_log=True)
    assert sorted(e.item_id for e in snapshot.events[5:]) == sorted(f"c{i}" for i in range(n))  # each once
    assert snapshot.events_total == 5 + n
    assert snapshot.state_seq == 5 + n
    if policy == "full":  # the stored state is "the log's events, in the log's order"
        async with client_for(policy="recompute") as client:
            recomputed = scores(await client.post("/recommend", json=rank_all("u", [])))
        assert served == pytest.approx(recomputed, abs=1e-5)


async def test_trimmed_log_keeps_absolute_positions(client_for, redis_store, shared_redis):
    events = history(12)
    async with client_for(policy="full", max_log_events=5, hot_tier_bytes=0) as client:  # a miss: no held copy
        r = await client.post("/recommend", json=rank_all("u", events[:8]))
        assert r.json()["state"]["events_seen"] == 8
        snapshot = await redis_store.load("u", with_state=False, whole_log=True)
        assert (snapshot.log_start, len(snapshot.events)) == (3, 5)
        shared_redis.delete(redis_store.keys("u")[2])  # the cache is lost: rebuilt from the 5 kept
        r = await client.post("/recommend", json=rank_all("u", events[8:]))
        assert r.json()["state"] == {**r.json()["state"], "events_seen": 12, "tokens_kept": 2 * 5,
                                     "source": "miss"}
        r = await client.post("/recommend", json=rank_all("u", []))
        assert r.json()["state"]["source"] == "hit"
