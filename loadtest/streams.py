"""The replayed users: dataset streams as API events, the request plan of one user, and the pool.

A load test replays real users, not random traffic: each dataset user's history is cut into a prefix
(loaded before the measured phase, so states are long when it starts) and a future that is sent to the
service in time order, `events_per_request` events per request. Everything here is deterministic for a
given dataset, options and seed, so two runs (two policies) send the same requests in the same order
per user; that is what lets the sweep compare each policy's answers with `full`'s request by request.

Nothing here talks HTTP or imports Locust: the pool and the plans are plain data, tested directly.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# Imported here, not lazily: torch's import takes seconds, and a Locust worker that first imports it
# inside test_start stops answering its master's heartbeats for that long.
from kvrec.models.data import holdout_users, load_dataset, stream_split
from kvrec.models.evaluate import has_repeats


@dataclass(frozen=True)
class UserStream:
    """One dataset user as the API sees it: external ids, events as `POST /recommend` takes them."""

    user_id: str
    prefix: list[dict]  # [{"item_id": str, "ts": int, "action": int}], time order
    future: list[dict]


@dataclass(frozen=True)
class ReplaySource:
    """Everything a replay needs from a dataset, loaded once per process."""

    name: str
    streams: list[UserStream]
    catalogue: list[str]  # external item ids, the pool that negatives are drawn from
    repeats: bool  # some user consumes an item twice: excluding seen items would hide true targets


def load_source(dataset: str, *, prefix_fraction: float, max_users: int, holdout: float = 0.0) -> ReplaySource:
    """Stream split of `dataset` (a name, path or synth spec, as `models.data.load_dataset` takes).

    The first `max_users` users with a non-empty prefix and future are kept, in dataset order, so every
    process (Locust master and workers) derives the same list and can partition it without talking; with
    `holdout`, only users held out of training at that share (`models.data.holdout_users`).
    """
    ds = load_dataset(dataset)
    users = holdout_users(ds, holdout) if holdout else None
    split = stream_split(ds, fraction=prefix_fraction, users=users)[:max_users]
    if not split:
        raise ValueError(f"{dataset}: no user has both a prefix and a future at fraction {prefix_fraction}")

    def api_events(ev) -> list[dict]:
        return [{"item_id": ds.item_ids[i], "ts": t, "action": a}
                for i, t, a in zip(ev.items.tolist(), ev.ts.tolist(), ev.actions.tolist(), strict=True)]

    streams = [UserStream(u.user_id, api_events(u.prefix), api_events(u.future)) for u in split]
    return ReplaySource(ds.name, streams, list(ds.item_ids), has_repeats(ds.seqs))


def partition(streams: list[UserStream], index: int, count: int) -> list[UserStream]:
    """The streams of partition `index` of `count` (Locust worker i of n): disjoint, together complete."""
    if not 0 <= index < count:
        raise ValueError(f"partition index {index} outside 0..{count - 1}")
    return streams[index::count]


# ---------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Pacing:
    """How long a virtual user waits between two requests of one stream.

    time_scale > 0: the real gap between the last event sent and the next one, divided by time_scale
    and capped at max_gap seconds (real gaps can be months); time_scale == 0: a fixed think_time.
    """

    think_time: float = 0.0
    time_scale: float = 0.0
    max_gap: float = 5.0

    def wait(self, gap_s: float) -> float:
        if self.time_scale > 0:
            return min(max(gap_s, 0.0) / self.time_scale, self.max_gap)
        return self.think_time


@dataclass(frozen=True)
class PlannedRequest:
    """One `POST /recommend` of a replay and what it is judged against.

    targets: the items of the next request's events, the "true next items" that the answer's top-10 is
    scored against (empty for a stream's last request, which is then not scored).
    candidates: None asks for top-k over the whole catalogue; else the targets plus sampled negatives,
    shuffled so that ties in score cannot favour the targets.
    """

    index: int
    events: list[dict]
    targets: list[str]
    candidates: list[str] | None
    wait_s: float  # pause after this request, before the next one


def plan_requests(stream: UserStream, *, events_per_request: int, negatives: int | None,
                  catalogue: list[str], pacing: Pacing, seed: int = 0) -> list[PlannedRequest]:
    """The fixed request sequence of one user: its future in time order, `events_per_request` at a time.

    negatives None: catalogue top-k; else each request's candidates are its targets plus `negatives`
    items drawn from `catalogue` (never a target) by an RNG seeded with (seed, user, request index).
    """
    if events_per_request < 1:
        raise ValueError(f"events_per_request must be at least 1, got {events_per_request}")
    chunks = [stream.future[i:i + events_per_request]
              for i in range(0, len(stream.future), events_per_request)]
    plan = []
    for index, chunk in enumerate(chunks):
        nxt = chunks[index + 1] if index + 1 < len(chunks) else []
        targets = list(dict.fromkeys(e["item_id"] for e in nxt))  # distinct, in order
        candidates = None
        if negatives is not None:
            rng = random.Random(f"{seed}:{stream.user_id}:{index}")
            candidates = targets + _sample_negatives(rng, catalogue, set(targets), negatives)
            rng.shuffle(candidates)
        gap = nxt[0]["ts"] - chunk[-1]["ts"] if nxt else 0
        plan.append(PlannedRequest(index, chunk, targets, candidates, pacing.wait(gap)))
    return plan


def _sample_negatives(rng: random.Random, catalogue: list[str], exclude: set[str], n: int) -> list[str]:
    n = min(n, len(catalogue) - len(exclude & set(catalogue)))
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        item = catalogue[rng.randrange(len(catalogue))]
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


# ----------------------------------------------------------------------------------------------- pool


@dataclass
class Lease:
    """A stream held by one virtual user, with its plan and how far the replay has got."""

    stream: UserStream
    plan: list[PlannedRequest]
    next_index: int = 0

    @property
    def finished(self) -> bool:
        return self.next_index >= len(self.plan)

    def next_request(self) -> PlannedRequest:
        req = self.plan[self.next_index]
        self.next_index += 1
        return req


@dataclass
class StreamPool:
    """Hands out each stream to one virtual user at a time, each stream replayed once.

    A stream is either waiting, leased to exactly one virtual user, or done. A virtual user that stops
    mid-stream gives its lease back and the next taker resumes it where it stopped, so no user's events
    are ever sent twice or out of order. Locust runs users as greenlets of one thread and these methods
    never yield, so no lock is needed; each Locust process builds its own pool over its own partition.
    """

    streams: list[UserStream]
    plan_of: Callable[[UserStream], list[PlannedRequest]]
    _waiting: deque = field(init=False)
    _leased: set = field(init=False, default_factory=set)
    done: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._waiting = deque(Lease(s, self.plan_of(s)) for s in self.streams)

    def take(self) -> Lease | None:
        """The next stream for a virtual user, or None when every stream is replayed or leased."""
        while self._waiting:
            lease = self._waiting.popleft()
            if lease.finished:
                self.done += 1
                continue
            self._leased.add(lease.stream.user_id)
            return lease
        return None

    def release(self, lease: Lease, *, last: bool = False) -> None:
        """Return a lease: done when finished, else back to the front of the queue to be resumed by the
        next taker, or with `last` to the back (the open loop's round robin, where every request takes
        the user idle longest, as independent users' requests interleave)."""
        self._leased.discard(lease.stream.user_id)
        if lease.finished:
            self.done += 1
        elif last:
            self._waiting.append(lease)
        else:
            self._waiting.appendleft(lease)

    @property
    def leased(self) -> int:
        return len(self._leased)

    @property
    def exhausted(self) -> bool:
        return not self._waiting and not self._leased
