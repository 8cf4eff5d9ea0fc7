"""The store interfaces through their Redis implementation (the shared Redis, or a private one to stop):
decoded events, explicit statuses, compare-and-set, user ids that are data, and errors without Redis types."""

from __future__ import annotations

import pytest
from kvrec.server.settings import Settings
from kvrec.server.store import (
    Census,
    LoggedEvent,
    RedisStore,
    StateStatus,
    Stored,
    StoreUnavailable,
    TimestampError,
)

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
    assert await redis_store.delete("u") == 3
    assert await redis_store.delete("u") == 0


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
    assert await redis_store.delete(other) == 3
    assert len((await redis_store.load("a", with_state=False, whole_log=True)).events) == 1


async def test_metrics_sink_round_trip(redis_store):
    sink = redis_store.metrics_sink(max_samples=2)
    await sink.add(1_000.5, {"requests": 1, "status:200": 1}, [1.0, 2.0], ("u", Census(10, 2, 3)))
    await sink.add(1_001.2, {"requests": 1, "status:503": 1}, [3.0, 4.0])
    await sink.add(1_002.0, {"requests": 1}, [5.0, 6.0], ("v", Census(20, 4, 6)))
    data = await sink.read(drop_seconds_before=1_001)
    assert data.since == 1_000.5
    assert data.counters == {"requests": 3, "status:200": 1, "status:503": 1}
    assert data.samples == [[5.0, 6.0], [3.0, 4.0]]  # newest first, at most max_samples
    assert data.per_second == {1_001: 1, 1_002: 1}
    assert data.census == {"u": Census(10, 2, 3), "v": Census(20, 4, 6)}
    assert data.memory_bytes > 0 and data.keys >= 4
    assert (await sink.read(drop_seconds_before=0)).per_second == {1_001: 1, 1_002: 1}  # dropped for good
    await sink.forget_user("u")
    await sink.reset()
    data = await sink.read(drop_seconds_before=0)
    assert (data.since, data.counters, data.samples, data.per_second) == (None, {}, [], {})
    assert data.census == {"v": Census(20, 4, 6)}  # the census outlives a reset


async def test_unreachable_redis_raises_store_unavailable(private_redis, key_prefix):
    store = RedisStore.connect(Settings(redis_url=private_redis.url, key_prefix=key_prefix, redis_timeout_s=0.5))
    epoch = (await store.append("u", EVENTS)).epoch
    private_redis.stop()
    for call in (store.ping(), store.append("u", [("4", 4, 0)]), store.load("u", True, False),
                 store.store("u", epoch, 3, b"x"), store.delete("u"), store.metrics_sink(10).add(1.0, {"n": 1}),
                 store.metrics_sink(10).read(0)):
        with pytest.raises(StoreUnavailable, match="Error"):
            await call
    await store.close()
