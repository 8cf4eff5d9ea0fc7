"""A local Redis Cluster from real redis-server processes (server.embedded_redis.EmbeddedRedisCluster):
formed, serving every slot, and what a master's failover keeps.

The durability test is deterministic, not a race: the replica is cut off from its master (stopped, and
its replication link killed on the master), writes go on, then the master dies and the cut-off replica
is promoted. A write acknowledged only by the master's reply is lost; a write acknowledged by
`WAIT 1 <ms>` on the same connection was never acknowledged while the replica was cut off, so every
acknowledged write survives. That is the durability the service needs for "no acknowledged event lost"
across a failover: its append followed by WAIT on the connection that made it (see the report of
issue 13 for the store's side); AOF alone only covers a restart of the same node.
"""

from __future__ import annotations

import signal
import time

import pytest
import redis
from kvrec.loadtest.sweep import cluster_client
from kvrec.server.embedded_redis import SLOTS, EmbeddedRedisCluster, EmbeddedRedisError, slot_ranges

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def cluster():
    with EmbeddedRedisCluster(masters=3) as c:
        yield c


def test_slot_ranges_cover_every_slot_once():
    for n in (1, 3, 5, 7):
        ranges = slot_ranges(n)
        assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1 and len(ranges) == n
        assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [end - start + 1 for start, end in ranges]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least 3 masters"):
        EmbeddedRedisCluster(masters=2, replicas=1)


def test_three_masters_share_the_slots_and_a_cluster_client_reaches_them_all(cluster):
    assert cluster.url.startswith("redis+cluster://127.0.0.1:")
    info = cluster.nodes[0].client().execute_command("CLUSTER", "INFO").decode()
    assert "cluster_state:ok" in info and f"cluster_slots_assigned:{SLOTS}" in info
    assert "cluster_known_nodes:3" in info and "cluster_size:3" in info
    served = sorted((int(s), int(e)) for s, e, *_ in cluster.nodes[0].client().execute_command("CLUSTER", "SLOTS"))
    assert served == slot_ranges(3)
    client = cluster_client(cluster.url)  # one node's address is enough: the client discovers the others
    try:
        for i in range(300):
            client.set(f"spread:{i}", i)
        assert [int(client.get(f"spread:{i}")) for i in range(300)] == list(range(300))
        per_master = [m.client().dbsize() for m in cluster.masters]
        assert len(per_master) == 3 and sum(per_master) >= 300 and min(per_master) >= 60  # ~100 each
    finally:
        client.delete(*[f"spread:{i}" for i in range(300)])
        client.close()


def kill_replication_link(master, replica) -> None:
    """Stop the replica, then drop its link on the master: from here on the master's writes reach no
    replica (what was already sent still arrives when the replica resumes)."""
    replica.process.send_signal(signal.SIGSTOP)
    master.client().execute_command("CLIENT", "KILL", "TYPE", "replica")


@pytest.mark.slow
def test_a_failover_keeps_every_write_acknowledged_by_wait():
    with EmbeddedRedisCluster(masters=3, replicas=1, appendonly=True, appendfsync="always") as c:
        key = "log:{user-1}:events"
        master = c.node_of_key(key)
        (replica,) = c.replicas_of(master)
        conn = master.client(single_connection_client=True)  # WAIT counts this connection's writes
        acked_by_wait, acked_by_reply = [], []
        for i in range(20):
            conn.rpush(key, f"e{i}")
            if conn.execute_command("WAIT", 1, 1000) >= 1:
                acked_by_wait.append(f"e{i}")
        assert len(acked_by_wait) == 20  # a healthy replica acknowledges at once

        kill_replication_link(master, replica)
        try:
            for i in range(20, 30):
                conn.rpush(key, f"e{i}")  # the master answers: acknowledged by its reply alone
                acked_by_reply.append(f"e{i}")
                if conn.execute_command("WAIT", 1, 50) >= 1:
                    acked_by_wait.append(f"e{i}")
            conn.close()
            c.kill(master)
        finally:
            replica.process.send_signal(signal.SIGCONT)
        started = time.monotonic()
        promoted = c.wait_promoted(master, timeout=30)
        took = time.monotonic() - started

        assert promoted is replica and took < 20
        survived = [v.decode() for v in promoted.client().lrange(key, 0, -1)]
        assert set(acked_by_wait) <= set(survived) and len(acked_by_wait) == 20  # nothing WAIT-acked lost
        assert set(acked_by_reply).isdisjoint(survived)  # without WAIT, acknowledged events are lost
        client = cluster_client(c.url)  # and the cluster serves the key again, from the new master
        try:
            assert client.llen(key) == 20 and client.rpush(key, "after") == 21
        finally:
            client.close()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_appends_acknowledged_with_wait_replicas_survive_a_failover():
    """The store's side of the test above: with redis_wait_replicas=1 every append it acknowledged is on
    the replica that takes over; while the replica is cut off it acknowledges none (StoreUnavailable,
    the events written on the master only), and those are what the failover loses. After it, the
    promoted replica runs the append script (EVAL: it has no script cache) and, with no replica of its
    own, confirms nothing."""
    from kvrec.server.settings import Settings
    from kvrec.server.store import RedisStore, StoreUnavailable, Written

    with EmbeddedRedisCluster(masters=3, replicas=1, appendonly=True, appendfsync="always") as c:
        settings = dict(key_prefix="durable", redis_timeout_s=0.5, redis_retries=0)
        store = RedisStore.connect(Settings(redis_url=c.url, redis_wait_replicas=1, redis_wait_timeout_ms=200,
                                            **settings))
        user = next(u for u in (f"user-{i}" for i in range(100))  # not on the node of the URL, which dies
                    if c.node_of_key(store.keys(u).events) is not c.nodes[0])
        master = c.node_of_key(store.keys(user).events)
        (replica,) = c.replicas_of(master)
        acknowledged, refused = [], []
        try:
            for i in range(10):
                await store.append(user, [(f"e{i}", i, 0)], request_id=f"r{i}")
                acknowledged.append(f"e{i}")
            kill_replication_link(master, replica)
            try:
                for i in range(10, 15):
                    with pytest.raises(StoreUnavailable) as caught:
                        await store.append(user, [(f"e{i}", i, 0)], request_id=f"r{i}")
                    assert caught.value.written is Written.EVENTS
                    refused.append(f"e{i}")
                c.kill(master)
            finally:
                replica.process.send_signal(signal.SIGCONT)
            assert c.wait_promoted(master, timeout=30) is replica
        finally:
            await store.close()

        reader = RedisStore.connect(Settings(redis_url=c.url, **settings))
        writer = RedisStore.connect(Settings(redis_url=c.url, redis_wait_replicas=1, redis_wait_timeout_ms=200,
                                             **settings))
        try:
            logged = [e.item_id for e in (await reader.load(user, with_state=False, whole_log=True)).events]
            assert logged == acknowledged and len(acknowledged) == 10  # every acknowledged event, no other
            with pytest.raises(StoreUnavailable, match="reached 0 of the 1 replica") as caught:
                await writer.append(user, [("after", 100, 0)], request_id="after")
            assert caught.value.written is Written.EVENTS
            logged = [e.item_id for e in (await reader.load(user, with_state=False, whole_log=True)).events]
            assert logged == [*acknowledged, "after"]
        finally:
            await reader.close()
            await writer.close()


def test_a_node_that_does_not_start_is_reported_with_its_log(tmp_path):
    """A node that exits at start (here: an unknown option) fails `start` with its own log, and no
    process of the cluster is left behind."""
    c = EmbeddedRedisCluster(masters=3, workdir=tmp_path)
    c.appendfsync = "sometimes"  # not a value redis-server accepts
    with pytest.raises(EmbeddedRedisError, match="redis-server on port .* exited"):
        c.start(timeout=10)
    assert all(n.process is None for n in c.nodes)
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=c.nodes[0].port, socket_connect_timeout=0.5).ping()


def test_the_sweep_on_a_cluster_it_does_not_own_clears_only_its_prefix_on_every_master(cluster, tmp_path):
    """`kvrec sweep --redis-url redis+cluster://...`: memory is summed over the masters and clearing a
    namespace deletes its keys wherever their slots live, and nothing else (no FLUSHALL)."""
    from kvrec.loadtest.sweep import Redis

    client = cluster_client(cluster.url)
    store = Redis(cluster.url, tmp_path)
    try:
        assert not store.private and store.masters == 3 and store.version()
        for i in range(90):
            client.set(f"sweep-x:{{u{i}}}:state", "x" * 100)
            client.set(f"other:{{u{i}}}", 1)
        assert {cluster.node_of_key(f"sweep-x:{{u{i}}}:state").port for i in range(90)} == {
            m.port for m in cluster.masters}
        assert store.used_memory() >= sum(int(m.client().info("memory")["used_memory"]) for m in cluster.masters) - 1e6
        store.clear("sweep-x")
        assert not any(client.exists(f"sweep-x:{{u{i}}}:state") for i in range(90))
        assert all(client.exists(f"other:{{u{i}}}") for i in range(90))
    finally:
        client.delete(*[f"other:{{u{i}}}" for i in range(90)])
        client.close()
        store.close()
