"""One request, as data: validate, append, load, compute (in a thread), compare-and-set, answer.

    append   the new events go to the user's log first: the log is the truth, and it numbers them
    load     the state blob and the logged events it has not folded in (the whole log for a rebuild,
             for `exclude_seen`, or when the policy keeps no state)
    compute  restore (or rebuild), extend with the missing events, compress, encode, score: one hop to
             a thread; a stored state that turns out not to restore costs a second load of the whole log
    store    compare-and-set the new state (only if it has folded in more events than the stored one)
             together with this answer, which the user's next events will grade (online accuracy)

Concurrent requests for one user need no lock. Each appends atomically, then loads the log as it is at
that moment, so its state covers its own events and any appended before them. If a request that loaded
later stores first, the slower one's write is refused (a `cas_retries` count) and it still answers
from a state that holds its own events; the stored state only ever moves forward.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import anyio
import torch
from kvrec.server.engine import Computed, Engine, Work
from kvrec.server.schemas import Event, RecommendRequest
from kvrec.server.settings import Settings
from kvrec.server.store import Appended, Snapshot, StateStore, Stored, TimestampError

ACCURACY_AT = 10


class InputError(ValueError):
    """A request the service will not serve as sent: `status` is 413 (too large) or 422."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class RequestSample:
    """What one served request contributes to /metrics."""

    timing_ms: dict[str, float]
    source: str
    cas_lost: bool  # its state write lost to a fresher state
    oov_events: int
    user_id: str
    state_bytes: int | None  # the user's stored state now; None when this request stored none
    tokens_kept: int
    events_seen: int
    accuracy: tuple[float, float] | None  # (hit@10, ndcg@10) of the user's previous answer


@dataclass
class Served:
    user_id: str
    items: list[tuple[str, float]]
    computed: Computed
    state_bytes: int
    timing_ms: dict[str, float]
    sample: RequestSample


class RankingPipeline:
    """The request path, shared by the HTTP endpoints and `kvrec bench serve`."""

    def __init__(self, store: StateStore, engine: Engine, settings: Settings):
        self.store = store
        self.engine = engine
        self.settings = settings
        self.limiter = anyio.CapacityLimiter(settings.compute_concurrency)

    async def recommend(self, req: RecommendRequest) -> Served:
        start = time.perf_counter()
        user_id = self._user_id(req.user_id)
        events = self._events(req.events, self.settings.max_events_per_request, "max_events_per_request")
        candidates = self._candidates(req.candidates)
        if not 1 <= req.k <= self.settings.max_k:
            raise InputError(422, f"k={req.k} is out of range: it must be between 1 and {self.settings.max_k}")
        appended = await self._append(user_id, events, replace=False)
        timing = {"append": _ms(start)}
        return await self._bring_up_to_date(
            user_id, Work(candidates, req.k, req.exclude_seen), timing, start,
            new_items=[item for item, _, _ in events], previous_answer=appended.previous_answer)

    async def put_history(self, user_id: str | int, events: list[Event]) -> Served:
        """Replace the user's history with `events` and build its state, without ranking."""
        start = time.perf_counter()
        user_id = self._user_id(user_id)
        packed = self._events(events, self.settings.max_history_events, "max_history_events")
        await self._append(user_id, packed, replace=True)
        timing = {"append": _ms(start)}
        return await self._bring_up_to_date(user_id, Work(score=False), timing, start)

    async def forget(self, user_id: str | int) -> tuple[str, int]:
        user_id = self._user_id(user_id)
        return user_id, await self.store.delete(user_id)

    # ----------------------------------------------------------------------------- stages

    async def _append(self, user_id: str, events: list[tuple[str, int, int]], replace: bool) -> Appended:
        try:
            return await self.store.append(user_id, events, replace=replace)
        except TimestampError as exc:
            raise InputError(422, str(exc)) from exc

    async def _bring_up_to_date(self, user_id: str, work: Work, timing: dict[str, float], start: float,
                                new_items: list[str] | None = None,
                                previous_answer: list[str] | None = None) -> Served:
        """Load, compute and store for a user whose new events are already appended."""
        keeps_state = self.engine.keeps_state
        clock = time.perf_counter()
        snapshot = await self.store.load(user_id, with_state=keeps_state,
                                         whole_log=work.exclude_seen or not keeps_state)
        timing["load"] = _ms(clock)
        computed = await self._compute(work, snapshot)
        if computed is None:
            # The stored state did not restore and the events it covered were not loaded: load the whole
            # log, with the state as it is now (another request may have stored a good one), and decide again.
            clock = time.perf_counter()
            snapshot = await self.store.load(user_id, with_state=True, whole_log=True)
            timing["load"] += _ms(clock)
            computed = await self._compute(work, snapshot)
        for stage, ms in computed.timing_ms.items():
            timing[stage] = timing.get(stage, 0.0) + ms

        clock = time.perf_counter()
        answer = computed.item_ids[:ACCURACY_AT] if work.score else None
        stored = Stored.STORED
        if snapshot.epoch and (computed.blob is not None or answer is not None):
            stored = await self.store.store(user_id, snapshot.epoch, computed.events_seen, computed.blob, answer)
            timing["store"] = _ms(clock)
        if computed.blob is not None:
            state_bytes = len(computed.blob)
        elif computed.source == "hit":
            state_bytes = len(snapshot.blob)
        else:
            state_bytes = 0
        timing["total"] = _ms(start)
        sample = RequestSample(
            timing_ms=timing, source=computed.source, cas_lost=stored is Stored.STALE,
            oov_events=computed.oov_events, user_id=user_id,
            state_bytes=state_bytes if stored is Stored.STORED and computed.blob is not None else None,
            tokens_kept=computed.tokens_kept, events_seen=computed.events_seen,
            accuracy=_grade(previous_answer, new_items or []))
        return Served(user_id, list(zip(computed.item_ids, computed.scores)), computed, state_bytes, timing,
                      sample)

    async def _compute(self, work: Work, snapshot: Snapshot) -> Computed | None:
        """The engine's tensor work, in a worker thread (at most `compute_concurrency` at once)."""
        return await anyio.to_thread.run_sync(self.engine.compute, work, snapshot, limiter=self.limiter)

    # ----------------------------------------------------------------------------- validation

    def _id(self, value: str | int, what: str) -> str:
        text = str(value)
        if not text:
            raise InputError(422, f"{what} is empty")
        if len(text.encode()) > self.settings.max_id_length:
            raise InputError(422, f"{what} is too long: {len(text.encode())} bytes, at most "
                                  f"{self.settings.max_id_length}")
        return text

    def _user_id(self, value: str | int) -> str:
        return self._id(value, "user_id")

    def _events(self, events: list[Event], limit: int, setting: str) -> list[tuple[str, int, int]]:
        if len(events) > limit:
            raise InputError(413, f"too many events: {len(events)}, at most {limit} ({setting})")
        packed = []
        for i, event in enumerate(events):
            if i and event.ts < events[i - 1].ts:
                raise InputError(422, f"events[{i}].ts={event.ts} is earlier than events[{i - 1}].ts="
                                      f"{events[i - 1].ts}; events must be in time order")
            packed.append((self._id(event.item_id, f"events[{i}].item_id"), event.ts, event.action))
        return packed

    def _candidates(self, candidates: list[str | int] | None) -> torch.Tensor | None:
        if candidates is None:
            return None
        if not candidates:
            raise InputError(422, "candidates is empty: send null to rank the whole catalogue")
        if len(candidates) > self.settings.max_candidates:
            raise InputError(413, f"too many candidates: {len(candidates)}, at most "
                                  f"{self.settings.max_candidates} (max_candidates)")
        ids = [self._id(c, f"candidates[{i}]") for i, c in enumerate(candidates)]
        unknown = self.engine.unknown(ids)
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise InputError(422, f"{len(unknown)} unknown candidate item id(s): {shown}")
        return self.engine.internal_ids(ids)


def _grade(previous_answer: list[str] | None, new_items: list[str]) -> tuple[float, float] | None:
    """Hit and NDCG at 10 of the user's previous answer against the first item of the new events: the
    next item the user actually took, as in leave-one-out evaluation."""
    if previous_answer is None or not new_items:
        return None
    if new_items[0] not in previous_answer:
        return 0.0, 0.0
    return 1.0, 1.0 / math.log2(previous_answer.index(new_items[0]) + 2)


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1e3
