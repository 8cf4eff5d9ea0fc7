"""The replay's data side: partitions, request plans and the stream pool (no HTTP, no Locust)."""

from __future__ import annotations

import random

import pytest
from kvrec.loadtest.options import ReplayOptions, add_arguments
from kvrec.loadtest.streams import Pacing, StreamPool, UserStream, load_source, partition, plan_requests

CATALOGUE = [str(i) for i in range(100)]


def stream(uid: str, n: int, start_ts: int = 1000) -> UserStream:
    events = [{"item_id": str((i * 7) % 100), "ts": start_ts + 10 * i, "action": 0} for i in range(n)]
    return UserStream(uid, events[: n // 2], events[n // 2:])


def plan(s: UserStream, per: int = 3, negatives: int | None = None, pacing: Pacing | None = None):
    return plan_requests(s, events_per_request=per, negatives=negatives, catalogue=CATALOGUE,
                         pacing=pacing or Pacing())


def test_partition_is_disjoint_and_complete():
    streams = [stream(f"u{i}", 10) for i in range(11)]
    parts = [partition(streams, i, 3) for i in range(3)]
    ids = [s.user_id for p in parts for s in p]
    assert sorted(ids) == sorted(s.user_id for s in streams)
    assert len(ids) == len(set(ids))
    with pytest.raises(ValueError, match="partition index"):
        partition(streams, 3, 3)


def test_plan_sends_the_future_in_time_order_in_chunks():
    s = stream("u", 22)  # future: 11 events
    p = plan(s, per=3)
    assert [len(r.events) for r in p] == [3, 3, 3, 2]
    sent = [e for r in p for e in r.events]
    assert sent == s.future
    assert all(a["ts"] <= b["ts"] for a, b in zip(sent, sent[1:], strict=False))
    assert sent[0]["ts"] >= s.prefix[-1]["ts"]
    for req, nxt in zip(p, p[1:], strict=False):
        assert req.targets == list(dict.fromkeys(e["item_id"] for e in nxt.events))
    assert p[-1].targets == []
    assert all(r.candidates is None for r in p)


def test_sampled_candidates_are_targets_plus_distinct_negatives_and_deterministic():
    s = stream("u", 40)
    p = plan(s, per=2, negatives=15)
    for r in p:
        assert set(r.targets) <= set(r.candidates)
        assert len(r.candidates) == len(set(r.candidates)) == len(r.targets) + 15
    assert p == plan(s, per=2, negatives=15)  # same seed, same requests: what top10_overlap relies on
    other = plan(UserStream("v", s.prefix, s.future), per=2, negatives=15)
    assert [r.candidates for r in other] != [r.candidates for r in p]


def test_pacing_fixed_or_scaled_and_capped():
    s = stream("u", 8)  # gaps of 10 s between events
    assert [r.wait_s for r in plan(s, per=1, pacing=Pacing(think_time=0.25))] == [0.25] * 4
    scaled = plan(s, per=1, pacing=Pacing(time_scale=20, max_gap=5))
    assert [r.wait_s for r in scaled] == [0.5, 0.5, 0.5, 0.0]
    assert Pacing(time_scale=1, max_gap=2).wait(86400) == 2


def test_pool_never_leases_a_user_twice_and_resumes_given_back_streams():
    streams = [stream(f"u{i}", 12) for i in range(5)]
    pool = StreamPool(streams, lambda s: plan(s, per=2))
    rng = random.Random(0)
    holders: dict[int, object] = {}
    sent: dict[str, list[int]] = {}
    for _ in range(500):  # 3 virtual users taking, sending, stopping early at random
        vu = rng.randrange(3)
        lease = holders.get(vu) or pool.take()
        if lease is None:
            continue
        held_by_others = {h.stream.user_id for v, h in holders.items() if v != vu}
        assert lease.stream.user_id not in held_by_others
        holders[vu] = lease
        sent.setdefault(lease.stream.user_id, []).append(lease.next_request().index)
        if lease.finished or rng.random() < 0.2:
            pool.release(lease)
            del holders[vu]
    assert pool.exhausted and pool.done == 5
    assert sent == {s.user_id: list(range(3)) for s in streams}  # every request once, in order


def test_options_round_trip_through_locusts_parser_and_the_web_form():
    import configargparse

    parser = configargparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["--dataset", "x", "--events-per-request", "4", "--candidates", "sampled"])
    opts = ReplayOptions.from_namespace(ns)
    assert (opts.dataset, opts.events_per_request, opts.sampled_negatives) == ("x", 4, 100)
    ns.events_per_request, ns.skip_warm_up = "5", "true"  # the web UI's form hands strings over
    assert ReplayOptions.from_namespace(ns).events_per_request == 5
    assert ReplayOptions.from_namespace(ns).skip_warm_up is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--k", "5"])
    assert ReplayOptions(exclude_seen="auto").exclude_seen_for(repeats=True) is False


def test_load_source_gives_api_events_in_time_order():
    src = load_source("synth-short:users=12,mean_len=30", prefix_fraction=0.5, max_users=5)
    assert len(src.streams) == 5
    for s in src.streams:
        events = s.prefix + s.future
        assert all(a["ts"] <= b["ts"] for a, b in zip(events, events[1:], strict=False))
        assert {e["item_id"] for e in events} <= set(src.catalogue)
        assert all(isinstance(e["item_id"], str) for e in events)
