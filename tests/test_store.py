"""The store interfaces through their Redis implementation (the shared Redis, or a private one to stop):
decoded events, explicit statuses, compare-and-set, user ids that are data, and errors without Redis types."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from kvrec.server.embedded_redis import EmbeddedRedis
from kvrec.server.settings import Settings
from kvrec.server.store import (
    Census,
    Held,
    LoggedEvent,
    MetricsBatch,
    RedisMetricsSink,
    RedisStore,
    StateStatus,
    Stored,
    StoreUnavailable,
    TimestampError,
    WorkerGauge,
    Written,
)
from redis.crc import key_slot

pytestmark = [pytest.mark.asyncio, pytest.mark.redis]

EVENTS = [("1", 1, 0), ("2", 2, 3), ("3", 3, 0)]


async def test_load_returns_decoded_events_after_the_state(redis_store):
    appended = await redis_store.append("u", EVENTS)
    assert (appended.events_total, appended.previous_answer) == (3, None) and appended.epoch
    snapshot = await redis_store.load("u", with_state=True, whole_log=False)
    assert snapshot.state is StateStatus.MISSING and snapshot.blob == b""
    assert snapshot.events == tuple(LoggedEvent(*e) for e in EVENTS)
    assert snapshot.events[1].item_id == "2" and snapshot.events[1].action == 3

    assert await redis_store.store("u", appended.epoch, 2, b"two") is Stored.STORED
    snapshot = await redis_store.load("u", with_state=True, whole_log=False)
    assert (snapshot.state, snapshot.blob, snapshot.state_seq) == (StateStatus.FOUND, b"two", 2)
    assert (snapshot.events_from, snapshot.events) == (2, (LoggedEvent("3", 3, 0),))  # only what it lacks
    whole = await redis_store.load("u", with_state=True, whole_log=True)
    assert (whole.state_seq, whole.events_from, len(whole.events)) == (2, 0, 3)
    without = await redis_store.load("u", with_state=False, whole_log=False)
    assert (without.state, without.blob, without.events_from, len(without.events)) == (
        StateStatus.MISSING, b"", 0, 3)


async def test_store_is_compare_and_set(redis_store, shared_redis):
    epoch = (await redis_store.append("u", EVENTS)).epoch
    assert await redis_store.store("u", epoch, 2, b"two") is Stored.STORED
    assert await redis_store.store("u", epoch, 1, b"one") is Stored.STALE  # older: refused
    assert await redis_store.store("u", epoch, 2, b"two again") is Stored.STALE  # not newer: refused
    assert await redis_store.store("u", epoch, 4, b"four") is Stored.GONE  # more events than logged
    assert await redis_store.store("u", "another-epoch", 3, b"three") is Stored.GONE  # a replaced user
    assert (await redis_store.load("u", with_state=True, whole_log=False)).blob == b"two"
    assert await redis_store.store("u", epoch, 3, b"three") is Stored.STORED
    assert 0 < shared_redis.ttl(redis_store.keys("u")[2]) <= 60  # states are a cache that expires
    assert shared_redis.ttl(redis_store.keys("u")[0]) == -1  # events do not, unless configured to
    assert await redis_store.delete("u") == 5  # events, meta, state, request ids and their digests
    assert await redis_store.delete("u") == 0


async def test_a_held_copy_is_checked_by_the_load_which_then_skips_the_blob(redis_store):
    epoch = (await redis_store.append("u", EVENTS)).epoch
    await redis_store.store("u", epoch, 2, b"two")
    held = await redis_store.load("u", True, False, held=Held(epoch, 3, LoggedEvent("3", 3, 0)))
    assert (held.state, held.blob, held.state_seq, held.stored_seq, held.events) == (StateStatus.HELD, b"", 3, 2, ())
    assert held.state_last == LoggedEvent("3", 3, 0)
    as_old = await redis_store.load("u", True, False, held=Held(epoch, 2, LoggedEvent("2", 2, 3)))
    assert (as_old.state, as_old.events_from, as_old.events) == (StateStatus.HELD, 2, (LoggedEvent("3", 3, 0),))
    not_current = {"older than the stored state": Held(epoch, 1, LoggedEvent("1", 1, 0)),
                   "another epoch": Held("other", 3, LoggedEvent("3", 3, 0)),
                   "ahead of the log": Held(epoch, 4, LoggedEvent("4", 4, 0)),
                   "another last event": Held(epoch, 3, LoggedEvent("x", 3, 0))}
    for why, copy in not_current.items():
        snapshot = await redis_store.load("u", True, False, held=copy)
        assert (snapshot.state, snapshot.blob, snapshot.state_seq, snapshot.events_from) == (
            StateStatus.FOUND, b"two", 2, 2), why
        assert snapshot.state_last == LoggedEvent("2", 2, 3) and snapshot.stored_seq == 2, why


async def test_a_state_whose_last_event_the_log_does_not_hold_is_refused(redis_store):
    """A state folded in an event that a failover lost (and another took its place) is not stored."""
    epoch = (await redis_store.append("u", EVENTS)).epoch
    assert await redis_store.store("u", epoch, 3, b"x", last_event=LoggedEvent("lost", 3, 0)) is Stored.GONE
    assert await redis_store.store("u", epoch, 3, b"x", last_event=LoggedEvent("3", 3, 0)) is Stored.STORED


async def test_wait_replicas_acknowledges_an_append_once_a_replica_has_it(key_prefix, tmp_path):
    """With redis_wait_replicas=1 an append answers once a replica has it; with the replica stopped it is
    a 503-to-be that says the events were written, within the WAIT timeout, and the retry with the same
    id, once the replica is back, appends nothing twice and is acknowledged."""
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()  # a full sync writes an RDB file on both sides
    with EmbeddedRedis(workdir=tmp_path / "primary") as primary, EmbeddedRedis(workdir=tmp_path / "replica") as replica:
        mirror = redis.Redis.from_url(replica.url)
        mirror.replicaof("127.0.0.1", primary.port)
        deadline = time.monotonic() + 10
        while mirror.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not connect"
            time.sleep(0.05)
        store = RedisStore.connect(Settings(redis_url=primary.url, key_prefix=key_prefix, redis_wait_replicas=1,
                                            redis_wait_timeout_ms=300))
        log = store.keys("u").events
        try:
            await store.append("u", [("1", 1, 0)], request_id="first")
            assert mirror.llen(log) == 1  # on the replica when it was acknowledged
            os.kill(replica.process.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="reached 0 of the 1 replica") as caught:
                    await store.append("u", [("2", 2, 0)], request_id="second")
                assert caught.value.written is Written.EVENTS and time.monotonic() - started < 0.9
            finally:
                os.kill(replica.process.pid, signal.SIGCONT)
            again = await store.append("u", [("2", 2, 0)], request_id="second")
            assert again.replayed and again.events_total == 2
            assert [e.item_id for e in (await store.load("u", False, True)).events] == ["1", "2"]
            assert mirror.llen(log) == 2
        finally:
            await store.close()
            mirror.close()


async def test_answer_is_handed_back_by_the_next_append(redis_store):
    epoch = (await redis_store.append("u", EVENTS)).epoch
    assert await redis_store.store("u", epoch, 3, None, ["7", "8"]) is Stored.STORED  # the answer alone
    assert (await redis_store.load("u", with_state=True, whole_log=False)).state is StateStatus.MISSING
    assert (await redis_store.append("u", [])).previous_answer is None  # no new events: nothing to grade
    assert (await redis_store.append("u", [("9", 4, 0)])).previous_answer == ["7", "8"]


async def test_replace_starts_a_new_epoch_and_the_old_one_cannot_write(redis_store):
    old = (await redis_store.append("u", EVENTS)).epoch
    await redis_store.store("u", old, 3, b"three", ["1"])
    new = await redis_store.append("u", [("5", 0, 0)], replace=True)  # earlier ts: fine, the log is new
    assert new.epoch != old and (new.events_total, new.previous_answer) == (1, None)
    assert await redis_store.store("u", old, 1, b"late") is Stored.GONE
    snapshot = await redis_store.load("u", with_state=True, whole_log=False)
    assert (snapshot.state, snapshot.events) == (StateStatus.MISSING, (LoggedEvent("5", 0, 0),))


async def test_earlier_timestamp_writes_nothing(redis_store, shared_redis):
    await redis_store.append("u", EVENTS)
    before = [shared_redis.dump(k) for k in redis_store.keys("u")]
    with pytest.raises(TimestampError, match=r"events\[0\].ts=2 is earlier than the user's last event \(ts=3\)"):
        await redis_store.append("u", [("4", 2, 0), ("5", 9, 0)])
    assert [shared_redis.dump(k) for k in redis_store.keys("u")] == before


async def test_trimmed_log_numbers_events_absolutely_and_outdates_older_states(key_prefix, shared_redis):
    store = RedisStore.connect(Settings(key_prefix=key_prefix, redis_url="redis://127.0.0.1:6379/0",
                                        max_log_events=3))
    epoch = (await store.append("u", EVENTS)).epoch
    await store.store("u", epoch, 1, b"one")
    await store.append("u", [("4", 4, 0), ("5", 5, 0)])
    snapshot = await store.load("u", with_state=True, whole_log=False)
    # the state ends before the oldest kept event: unusable, and the whole kept log comes with it
    assert (snapshot.state, snapshot.blob, snapshot.events_total, snapshot.log_start) == (
        StateStatus.UNUSABLE, b"", 5, 2)
    assert (snapshot.events_from, [e.item_id for e in snapshot.events]) == (2, ["3", "4", "5"])
    await store.close()


@pytest.mark.parametrize("other", ["a}:events", "{a}", "a:b", "a%7D", "a}", "ä", "a\x00"])
async def test_user_ids_are_data_not_key_syntax(redis_store, other):
    await redis_store.append("a", [("1", 1, 0)])
    epoch = (await redis_store.append(other, [("2", 1, 0)])).epoch
    await redis_store.store(other, epoch, 1, b"theirs")
    mine = await redis_store.load("a", with_state=True, whole_log=True)
    assert (mine.state, [e.item_id for e in mine.events]) == (StateStatus.MISSING, ["1"])
    for key in redis_store.keys(other):  # exactly one hash tag, holding the whole encoded id
        tail = key[len(redis_store.prefix) + 1:]
        assert tail.count("{") == 1 and tail.count("}") == 1 and tail.index("}") > tail.index("{")
    assert not set(redis_store.keys("a")) & set(redis_store.keys(other))
    assert await redis_store.delete(other) == 5
    assert len((await redis_store.load("a", with_state=False, whole_log=True)).events) == 1


async def test_metrics_sink_round_trip_is_bounded(redis_store, shared_redis):
    sink = RedisMetricsSink(redis_store.redis, redis_store.prefix, max_samples=2, census_users=2, ttl_s=600,
                            keep_seconds=5)
    await sink.add(MetricsBatch({"requests": 2, "status:200": 1, "status:503": 1}, [(1_000.5, [1.0, 2.0])],
                                {1_000: 2}, {"u": Census(10, 2, 3)}, since=1_000.5), now=1_000.5)
    await sink.add(MetricsBatch({"requests": 1}, [(1_001.2, [3.0, 4.0]), (1_002.0, [5.0, 6.0])], {1_002: 1},
                                {"v": Census(20, 4, 6), "w": Census(1, 1, 1)}, since=1_002.0,
                                workers={"host:1": WorkerGauge(1_006.0, 100, 2, 1_000)}), now=1_006.0)
    data = await sink.read()
    assert data.since == 1_000.5
    assert data.counters == {"requests": 3, "status:200": 1, "status:503": 1}
    assert data.samples == [[5.0, 6.0], [3.0, 4.0]]  # newest first, at most max_samples
    assert data.per_second == {1_002: 1}  # seconds older than keep_seconds are dropped
    assert len(data.census) == 2 and data.census["u"] == Census(10, 2, 3)  # capped at census_users
    newcomer = next(u for u in data.census if u != "u")  # one of the batch's two new users got the last place
    assert data.workers == {"host:1": WorkerGauge(1_006.0, 100, 2, 1_000)}
    for key in (sink.counters, sink.latency, sink.seconds, sink.users, sink.workers):
        assert 0 < shared_redis.ttl(key) <= 600  # metrics never outlive a service that stopped writing them
    await sink.add(MetricsBatch(census={"u": Census(11, 2, 4)}), now=1_006.0)  # a counted user is updated
    assert (await sink.read()).census["u"] == Census(11, 2, 4)
    await sink.forget_user("u")
    await sink.reset()
    data = await sink.read()
    assert (data.since, data.counters, data.samples, data.per_second) == (None, {}, [], {})
    assert list(data.census) == [newcomer] and list(data.workers) == ["host:1"]  # they outlive a reset


async def test_metrics_keys_share_one_slot_and_a_wrong_type_is_replaced(redis_store, shared_redis):
    sink = redis_store.metrics_sink(Settings())
    keys = [sink.counters, sink.latency, sink.seconds, sink.users, sink.workers]
    assert len({key_slot(k.encode()) for k in keys}) == 1  # one Lua script writes them all, also on a cluster
    shared_redis.set(sink.latency, "not a list")
    await sink.add(MetricsBatch({"requests": 1}, [(1.0, [2.0])]), now=1.0)
    assert (await sink.read()).samples == [[2.0]]


async def test_unreachable_redis_raises_store_unavailable(private_redis, key_prefix):
    store = RedisStore.connect(Settings(redis_url=private_redis.url, key_prefix=key_prefix, redis_timeout_s=0.5))
    epoch = (await store.append("u", EVENTS)).epoch
    private_redis.stop()
    sink = store.metrics_sink(Settings())
    calls = {"ping": (store.ping, Written.NOTHING),
             "append": (lambda: store.append("u", [("4", 4, 0)]), Written.UNKNOWN),
             "load": (lambda: store.load("u", True, False), Written.NOTHING),
             "store": (lambda: store.store("u", epoch, 3, b"x"), Written.UNKNOWN),
             "delete": (lambda: store.delete("u"), Written.UNKNOWN), "info": (store.info, Written.NOTHING),
             "metrics add": (lambda: sink.add(MetricsBatch({"n": 1}), 1.0), Written.UNKNOWN),
             "metrics read": (sink.read, Written.NOTHING)}
    for name, (call, written) in calls.items():
        with pytest.raises(StoreUnavailable, match="Error") as caught:
            await call()
        assert caught.value.written is written, name
    await store.close()
