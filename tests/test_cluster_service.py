"""The service on a real local Redis Cluster (server.embedded_redis.EmbeddedRedisCluster) through the
store's `redis+cluster://` URL: every user's keys on one slot, users spread over the masters, the
store's scripts run where each user's slot lives, the service carries on through a master's failover,
and `kvrec sweep --redis-cluster 3` measures the same bytes per user as a sweep on one Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from urllib.parse import quote

import pytest
from kvrec.loadtest.options import ReplayOptions
from kvrec.loadtest.sweep import SweepConfig, cluster_client, run_sweep
from kvrec.server.embedded_redis import EmbeddedRedisCluster

pytestmark = pytest.mark.redis
USERS = [f"user-{i}" for i in range(60)] + ["ü{odd}:id", "{x}"]  # ids with key syntax stay data


def events(start: int, n: int) -> list[dict]:
    return [{"item_id": str((start + i) % 50), "ts": 1000 + start + i} for i in range(n)]


@pytest.fixture(scope="module")
def cluster():
    with EmbeddedRedisCluster(masters=3) as c:
        yield c


@pytest.mark.asyncio
async def test_users_keys_share_a_slot_users_spread_and_the_scripts_run(cluster, make_settings, client_for):
    from kvrec.server.store import RedisStore

    settings = make_settings(redis_url=cluster.url)
    store = RedisStore.connect(settings)
    sync = cluster_client(cluster.url)
    try:
        async with client_for(redis_url=cluster.url) as client:
            for n, user in enumerate(USERS):
                path = f"/users/{quote(user, safe='')}/history"
                put = await client.put(path, json={"events": events(n, 5)})
                assert put.status_code == 200, (user, put.text)
                resp = await client.post("/recommend", json={"user_id": user, "events": events(n + 5, 1), "k": 10})
                assert resp.status_code == 200, resp.text
                body = resp.json()
                assert body["state"]["events_seen"] == 6 and body["state"]["source"] == "hit"
                assert len(body["items"]) == 10
            masters = Counter()
            for user in USERS:
                keys = list(store.keys(user))
                slots = {sync.keyslot(k) for k in keys}
                assert len(slots) == 1, (user, keys)  # one slot: the scripts may touch them together
                masters[cluster.node_of_key(keys[0]).port] += 1
            assert len(masters) == 3 and min(masters.values()) >= len(USERS) // 6  # ~1/3 each
            snapshot = await store.load(USERS[0], with_state=False, whole_log=True)
            assert [e.item_id for e in snapshot.events] == [e["item_id"] for e in events(0, 5) + events(5, 1)]
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200 and metrics.json()["state"]["users"] == len(USERS)
            gone = await client.delete(f"/users/{quote(USERS[1], safe='')}")
            assert gone.status_code == 200
            assert (await store.load(USERS[1], with_state=False, whole_log=True)).events == ()
    finally:
        sync.close()
        await store.close()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_the_service_serves_again_after_a_master_fails_over(make_settings, client_for):
    """Kill the master of a user's slot mid-stream: requests fail (503, never 500) until its replica
    takes over, then succeed again, and the events acknowledged before the kill (replicated: each
    request's WAIT-free append reached the replica while the link was up) are all in the log."""
    from kvrec.server.store import RedisStore

    with EmbeddedRedisCluster(masters=3, replicas=1) as c:
        settings = make_settings(redis_url=c.url, redis_timeout_s=0.5)
        store = RedisStore.connect(settings)
        user = "fails-over"
        try:
            async with client_for(redis_url=c.url, redis_timeout_s=0.5) as client:
                acked = []
                for i in range(10):
                    resp = await client.post("/recommend", json={"user_id": user, "events": events(i, 1), "k": 10})
                    assert resp.status_code == 200
                    acked += events(i, 1)
                master = c.node_of_key(store.keys(user)[0])
                c.wait_healthy()  # every replica's link is up: what was acknowledged has been sent
                c.kill(master)
                statuses, i, deadline = [], 10, time.monotonic() + 30
                while statuses.count(200) < 3 and time.monotonic() < deadline:
                    resp = await client.post("/recommend", json={"user_id": user, "events": events(i, 1), "k": 10},
                                             headers={"Idempotency-Key": f"{user}-{i}"})  # a retry appends once
                    statuses.append(resp.status_code)
                    if resp.status_code == 200:
                        acked += events(i, 1)
                        i += 1  # a 503 wrote nothing that counts: its event is sent again
                    else:
                        await asyncio.sleep(0.05)
                assert set(statuses) <= {200, 503}, statuses
                assert statuses.count(200) >= 3, statuses  # it serves again once the replica took over
                promoted = c.wait_promoted(master)
                assert promoted is not master
                logged = await store.load(user, with_state=False, whole_log=True)
                assert [e.item_id for e in logged.events][: len(acked)] == [e["item_id"] for e in acked]
        finally:
            await store.close()


@pytest.mark.slow
def test_a_cluster_sweep_stores_the_same_bytes_per_user_as_one_redis(tmp_path):
    """The states do not depend on where they are stored: with every replayed stream sent to its end
    (a long enough run), bytes per user on a 3-master cluster equal those on one Redis. The hot tier is
    off: with it, Redis holds a user's state as of its last write-back, which depends on timing."""
    from kvrec.models.checkpoint import save_checkpoint
    from kvrec.models.data import load_dataset
    from kvrec.models.recommender import ModelConfig
    from kvrec.models.registry import build_model

    dataset = "synth-short:users=8,mean_len=24"
    ds = load_dataset(dataset)
    model = build_model(ModelConfig(kind="hstu", num_items=ds.num_items, dim=16, heads=2, d_k=8, d_v=8,
                                    dropout=0.0)).eval()
    ckpt = tmp_path / "tiny.ckpt"
    save_checkpoint(ckpt, model, ds.item_ids, ds.fingerprint())
    rows = {}
    for name, masters in (("single", 0), ("cluster", 3)):
        cfg = SweepConfig(model=ckpt, policies=["int8"], out=tmp_path / name, users=4, spawn_rate=4, duration_s=8,
                          redis_cluster=masters, hot_tier_bytes=0, replay=ReplayOptions(dataset=dataset))
        (rows[name],) = run_sweep(cfg, echo=lambda line: None)
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert run["redis"]["cluster_masters"] == (masters or 1)
    assert rows["cluster"]["bytes_per_user_mean"] == rows["single"]["bytes_per_user_mean"] > 0
    assert rows["cluster"]["redis_used_memory"] > 0 and rows["cluster"]["rps"] > 0
