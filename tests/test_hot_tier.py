"""The hot tier (server.hot_tier) through the service: a hit that Redis never sends the blob for, copies
that are not current (another worker, a replaced or deleted user, a log rolled back by a failover),
eviction that writes back within the byte bound, and restarts that lose nothing acknowledged.

Two apps on one key prefix stand for two worker processes: each has its own tier, and they share Redis."""

from __future__ import annotations

import random

import httpx
import pytest
import redis
from test_server_processes import serving

pytestmark = pytest.mark.redis

ALL_ITEMS = [str(i) for i in range(50)]


def events(n: int, start: int = 0, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"item_id": rng.choice(ALL_ITEMS), "ts": 1_000 + start + i, "action": rng.randrange(3)}
            for i in range(n)]


def rank(user: str, new: list[dict]) -> dict:
    return {"user_id": user, "events": new, "candidates": ALL_ITEMS, "k": 50}


def served(response) -> tuple[dict, dict[str, float]]:
    assert response.status_code == 200, response.text
    body = response.json()
    return body["state"], {i["item_id"]: i["score"] for i in body["items"]}


def net_output(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_output_bytes"])


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["full", "int8"])
async def test_a_hot_hit_skips_the_blob_load_and_decode(client_for, private_redis, key_prefix, policy):
    """A worker that holds the user gets from Redis a fraction of the blob's bytes for the whole request
    (its copy is checked in the load's small read), decodes nothing (under int8 its new copy is what the
    blob it encodes restores, taken from the encoding), and answers what a worker without the tier
    answers from the stored blob."""
    quiet = dict(redis_url=private_redis.url, policy=policy, redis_watch_s=3600, metrics_flush_s=3600)
    history, new = events(1000), events(1, start=1000, seed=1)
    raw = redis.Redis.from_url(private_redis.url)
    try:
        async with client_for(**quiet) as hot, client_for(hot_tier_bytes=0, **quiet) as cold:
            for user in ("held", "stored"):
                assert (await hot.put(f"/users/{user}/history", json={"events": history})).status_code == 200
            blob = len(raw.hget(f"{key_prefix}:{{stored}}:state", "blob"))
            before = net_output(raw)
            response = await hot.post("/recommend", json=rank("held", new))
            hot_sent = net_output(raw) - before
            hot_state, hot_scores = served(response)
            before = net_output(raw)
            cold_state, cold_scores = served(await cold.post("/recommend", json=rank("stored", new)))
            cold_sent = net_output(raw) - before
    finally:
        raw.close()
    assert hot_state["hot"] and hot_state["source"] == "hit" and hot_state["events_seen"] == 1001
    assert not cold_state["hot"] and cold_state["source"] == "hit"
    assert hot_sent < blob / 10 < blob < cold_sent
    timing = response.json()["timing_ms"]
    assert "decode" not in timing and "load" in timing
    assert hot_scores == pytest.approx(cold_scores, abs=1e-6)


@pytest.mark.asyncio
async def test_a_copy_that_is_not_current_is_not_used(client_for):
    """Worker a holds the user; worker b serves it next and stores a newer state (write-back every event):
    a's copy is older than Redis's and a loads the stored one. A user replaced or deleted through b
    starts a new epoch, which a's copy is not of. The shared metrics count each case."""
    each = dict(hot_writeback_events=1)
    async with client_for(**each) as a, client_for(**each) as b:
        state, _ = served(await a.post("/recommend", json=rank("u", events(5))))
        assert state["source"] == "miss"
        state, _ = served(await a.post("/recommend", json=rank("u", events(1, start=5))))
        assert state["hot"] and state["events_seen"] == 6
        state, _ = served(await b.post("/recommend", json=rank("u", events(1, start=6))))
        assert not state["hot"] and state["source"] == "hit" and state["events_seen"] == 7
        state, at_a = served(await a.post("/recommend", json=rank("u", events(1, start=7))))
        assert not state["hot"] and state["source"] == "hit" and state["events_seen"] == 8

        assert (await b.put("/users/u/history", json={"events": events(3, seed=2)})).status_code == 200
        state, _ = served(await a.post("/recommend", json=rank("u", events(1, start=100))))
        assert not state["hot"] and state["events_seen"] == 4
        assert (await b.delete("/users/u")).status_code == 200
        state, _ = served(await a.post("/recommend", json=rank("u", events(1, start=200))))
        assert state["source"] == "miss" and state["events_seen"] == 1
        await b.get("/metrics")  # a worker's read adds its own counts first: b's, then a's
        hot = (await a.get("/metrics")).json()["hot"]
    # a: miss, hit, stale (b stored a newer state), stale (replaced), stale (deleted, then a new log);
    # b: miss, then stale for its own copy when it replaced the user
    assert (hot["hits"], hot["misses"], hot["stale"]) == (1, 2, 4)
    async with client_for(policy="full", hot_tier_bytes=0) as reference:  # the same 8 events in one request
        _, whole = served(await reference.post("/recommend", json=rank(
            "ref", events(5) + events(1, start=5) + events(1, start=6) + events(1, start=7))))
    assert at_a == pytest.approx(whole, abs=1e-5)


@pytest.mark.asyncio
async def test_a_rolled_back_log_is_not_extended_from_the_held_copy(client_for, shared_redis, key_prefix):
    """A failover that lost the last append, then a new event at its place: the log has as many events as
    the held copy folded in, but not the same ones. The copy's last event tells them apart, so the
    request extends the state the replica kept, and the answer is that of the log as it is."""
    meta, log = f"{key_prefix}:{{u}}:meta", f"{key_prefix}:{{u}}:events"
    first, lost, instead = events(5), events(1, start=5, seed=1), events(1, start=5, seed=2)
    assert lost[0]["item_id"] != instead[0]["item_id"]
    async with client_for(hot_writeback_events=100) as client:
        served(await client.post("/recommend", json=rank("u", first)))  # stored at once: Redis lacked it
        state, _ = served(await client.post("/recommend", json=rank("u", lost)))
        assert state["hot"] and state["events_seen"] == 6  # held, not yet written back
        shared_redis.rpop(log)  # what the promoted replica has: the first 5 events and their state
        shared_redis.hset(meta, mapping={"n": 5, "last_ts": first[-1]["ts"]})
        state, scores = served(await client.post("/recommend", json=rank("u", instead)))
    assert not state["hot"] and state["source"] == "hit" and state["events_seen"] == 6
    async with client_for(policy="recompute") as reference:
        _, whole = served(await reference.post("/recommend", json=rank("u", [])))
    assert scores == pytest.approx(whole, abs=1e-5)


@pytest.mark.asyncio
async def test_eviction_writes_back_within_the_byte_bound(client_for, redis_store):
    """A tier of about three users' states, and states never due by count: each user's first request is
    stored at once (Redis lacked a state), the second is held dirty; holding a fourth user evicts the
    least recently used one, which is written back. The bytes held never pass the bound, and a state
    larger than the whole tier is written at once instead of held."""
    bound = 20_000  # a 20-event state of the tiny model is about 6 KB in memory
    async with client_for(hot_tier_bytes=bound, hot_writeback_events=1000) as client:
        for i in range(6):
            served(await client.post("/recommend", json=rank(f"u{i}", events(19, seed=i))))
            served(await client.post("/recommend", json=rank(f"u{i}", events(1, start=19, seed=i))))
            hot = (await client.get("/metrics")).json()["hot"]
            assert 0 < hot["bytes"] <= bound and hot["entries"] <= 3
        stored = [(await redis_store.load(f"u{i}", with_state=True, whole_log=False)).state_seq for i in range(6)]
    assert hot["evictions"] == hot["writebacks"] == 6 - hot["entries"] >= 3
    assert stored == [20] * (6 - hot["entries"]) + [19] * hot["entries"]  # evicted: written back; held: dirty
    after = [(await redis_store.load(f"u{i}", with_state=True, whole_log=False)).state_seq for i in range(6)]
    assert after == [20] * 6  # shutdown wrote back the rest

    async with client_for(hot_tier_bytes=1_000, hot_writeback_events=1000) as client:
        await client.post("/metrics/reset")
        served(await client.post("/recommend", json=rank("big", events(19))))
        state, _ = served(await client.post("/recommend", json=rank("big", events(1, start=19))))
        assert not state["hot"] and (await redis_store.load("big", True, False)).state_seq == 20
        hot = (await client.get("/metrics")).json()["hot"]
    assert (hot["entries"], hot["bytes"], hot["hits"]) == (0, 0, 0)


@pytest.mark.slow
def test_a_restart_loses_nothing_acknowledged(tiny_checkpoint, private_redis):
    """`kvrec serve` killed (-9) with held states Redis lacks: the next process serves every acknowledged
    event, re-extending the stored state, with the answer of one request over the whole log; stopped
    gracefully (SIGTERM), it writes its held states back."""
    args = ["--model", str(tiny_checkpoint), "--redis-url", private_redis.url, "--hot-writeback-events", "1000"]
    raw = redis.Redis.from_url(private_redis.url)
    new = events(15)
    try:
        with serving(args) as (base, proc):
            served(httpx.post(f"{base}/recommend", json=rank("u", new[:10])))
            for event in new[10:]:
                state, _ = served(httpx.post(f"{base}/recommend", json=rank("u", [event])))
                assert state["hot"]
            proc.kill()
            proc.wait()
        assert int(raw.hget("kvrec:{u}:state", "seq")) == 10 and int(raw.hget("kvrec:{u}:meta", "n")) == 15
        with serving(args) as (base, proc):
            state, scores = served(httpx.post(f"{base}/recommend", json=rank("u", [])))
            assert (state["source"], state["hot"], state["events_seen"]) == ("hit", False, 15)
            _, whole = served(httpx.post(f"{base}/recommend", json=rank("whole", new)))
            assert scores == pytest.approx(whole, abs=1e-5)
            state, _ = served(httpx.post(f"{base}/recommend", json=rank("u", events(3, start=15))))
            assert state["hot"] and state["events_seen"] == 18
        assert int(raw.hget("kvrec:{u}:state", "seq")) == 18
    finally:
        raw.close()
