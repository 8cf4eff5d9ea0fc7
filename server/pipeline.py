"""One request, as data: validate, append, load, compute (in a thread), compare-and-set, answer.

    append   the new events go to the user's log first: the log is the truth, and it numbers them
    load     the state blob and the logged events it has not folded in (the whole log for a rebuild,
             for `exclude_seen`, or when the policy keeps no state); with the hot tier (server.hot_tier),
             the same read checks this worker's copy of the state and skips the blob when it is current
    compute  restore (or rebuild, or take the hot copy), extend with the missing events, compress,
             encode, score: one hop to a thread; a stored state that turns out not to restore costs a
             second load of the whole log
    store    compare-and-set the new state (only if it has folded in more events than the stored one)
             together with this answer, which the user's next events will grade (online accuracy); with
             the hot tier, the state only every `hot_writeback_events` events (the answer always), and
             the state is held, which may evict others, written back then

Concurrent requests for one user need no lock. Each appends atomically, then loads the log as it is at
that moment, so its state covers its own events and any appended before them. If a request that loaded
later stores first, the slower one's write is refused (a `cas_retries` count) and it still answers
from a state that holds its own events; the stored state only ever moves forward.

Each request carries an id (the client's Idempotency-Key, or one made here) and the store applies its
append at most once per id; a retried request is answered from the log as it is, with `replayed`.
Once the events are in the log, a failure to store the state does not fail the request (the state is
a cache: the next request extends an older one); any other failure after the append is a 503 that says
the events were written. Stored data is never a reason for a 500: a state that does not restore is
rebuilt, unreadable log entries are unknown items, and a log that cannot be read is a DamagedLog.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import torch
from kvrec.server.engine import Computed, Engine, Work
from kvrec.server.hot_tier import HotEntry, HotTier
from kvrec.server.schemas import Event, RecommendRequest
from kvrec.server.settings import Settings
from kvrec.server.store import (
    Appended,
    IdempotencyConflict,
    Snapshot,
    StateStatus,
    StateStore,
    Stored,
    StoreUnavailable,
    TimestampError,
    Written,
)

ACCURACY_AT = 10
SHUTDOWN_WRITEBACK_S = 5.0  # how long a stopping worker spends writing back held states the store lacks

log = logging.getLogger("kvrec.server")


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
    store_failed: bool = False  # the state could not be written (Redis refused or did not answer)
    unreadable_events: int = 0  # damaged log entries served as unknown items


@dataclass
class Served:
    user_id: str
    items: list[tuple[str, float]]
    computed: Computed
    state_bytes: int
    timing_ms: dict[str, float]
    sample: RequestSample
    replayed: bool = False  # the request id was applied before: this request appended nothing
    hot: bool = False  # the state extended was the hot tier's copy: no blob loaded or decoded


def new_request_id() -> str:
    """An id for a request that came without an Idempotency-Key; the response hands it back."""
    return uuid.uuid4().hex


class RankingPipeline:
    """The request path, shared by the HTTP endpoints and `kvrec bench serve`."""

    def __init__(self, store: StateStore, engine: Engine, settings: Settings):
        self.store = store
        self.engine = engine
        self.settings = settings
        self.limiter = anyio.CapacityLimiter(settings.compute_concurrency)
        self.tier = (HotTier(settings.hot_tier_bytes, settings.hot_writeback_events)
                     if settings.hot_tier_bytes and engine.keeps_state else None)

    async def recommend(self, req: RecommendRequest, request_id: str | None = None) -> Served:
        start = time.perf_counter()
        user_id = self._user_id(req.user_id)
        events = self._events(req.events, self.settings.max_events_per_request, "max_events_per_request")
        candidates = self._candidates(req.candidates)
        if not 1 <= req.k <= self.settings.max_k:
            raise InputError(422, f"k={req.k} is out of range: it must be between 1 and {self.settings.max_k}")
        appended = await self._append(user_id, events, False, request_id)
        timing = {"append": _ms(start)}
        with _events_written(bool(events) and not appended.replayed):
            served = await self._bring_up_to_date(
                user_id, Work(candidates, req.k, req.exclude_seen), timing, start,
                new_items=[item for item, _, _ in events], previous_answer=appended.previous_answer)
        return dataclasses.replace(served, replayed=appended.replayed)

    async def put_history(self, user_id: str | int, events: list[Event], request_id: str | None = None) -> Served:
        """Replace the user's history with `events` and build its state, without ranking."""
        start = time.perf_counter()
        user_id = self._user_id(user_id)
        packed = self._events(events, self.settings.max_history_events, "max_history_events")
        appended = await self._append(user_id, packed, True, request_id)
        timing = {"append": _ms(start)}
        with _events_written(not appended.replayed):
            served = await self._bring_up_to_date(user_id, Work(score=False), timing, start)
        return dataclasses.replace(served, replayed=appended.replayed)

    async def forget(self, user_id: str | int) -> tuple[str, int]:
        user_id = self._user_id(user_id)
        if self.tier is not None:  # other workers' copies fail their next check: the log is gone
            self.tier.drop(user_id)
        return user_id, await self.store.delete(user_id)

    # ----------------------------------------------------------------------------- stages

    async def _append(self, user_id: str, events: list[tuple[str, int, int]], replace: bool,
                      request_id: str | None) -> Appended:
        try:
            return await self.store.append(user_id, events, replace=replace, request_id=request_id)
        except (TimestampError, IdempotencyConflict) as exc:
            raise InputError(422, str(exc)) from exc

    async def _bring_up_to_date(self, user_id: str, work: Work, timing: dict[str, float], start: float,
                                new_items: list[str] | None = None,
                                previous_answer: list[str] | None = None) -> Served:
        """Load, compute and store for a user whose new events are already appended."""
        keeps_state = self.engine.keeps_state
        tier = self.tier
        entry = tier.get(user_id) if tier is not None else None
        clock = time.perf_counter()
        snapshot = await self.store.load(user_id, with_state=keeps_state,
                                         whole_log=work.exclude_seen or not keeps_state,
                                         held=entry.held if entry is not None else None)
        timing["load"] = _ms(clock)
        if tier is not None:
            tier.count_lookup(entry, snapshot.state is StateStatus.HELD)
        held = entry if snapshot.state is StateStatus.HELD else None
        due = tier is None or tier.due(snapshot.events_total, snapshot.stored_seq)
        computed = await self._compute_or_rebuild(user_id, work, snapshot, held, due)
        if computed is None:
            # The stored state did not restore and the events it covered were not loaded: load the whole
            # log, with the state as it is now (another request may have stored a good one), and decide again.
            clock = time.perf_counter()
            snapshot = await self.store.load(user_id, with_state=True, whole_log=True)
            timing["load"] += _ms(clock)
            held, due = None, tier is None or tier.due(snapshot.events_total, snapshot.stored_seq)
            computed = await self._compute_or_rebuild(user_id, work, snapshot, None, due)
        for stage, ms in computed.timing_ms.items():
            timing[stage] = timing.get(stage, 0.0) + ms
        if snapshot.unreadable_events:
            log.warning("user %r: %d entries of the event log do not decode; served as unknown items",
                        user_id, snapshot.unreadable_events)

        clock = time.perf_counter()
        answer = computed.item_ids[:ACCURACY_AT] if work.score else None
        blob = computed.blob if due or computed.source == "rebuild" else None  # a damaged stored state goes at once
        outcome, store_failed = None, False  # None: nothing was offered to the store, or it did not answer
        if snapshot.epoch and (blob is not None or answer is not None):
            try:
                outcome = await self.store.store(user_id, snapshot.epoch, computed.events_seen, blob, answer,
                                                 replace_equal=computed.source == "rebuild",
                                                 last_event=computed.last_event)
            except StoreUnavailable as exc:  # the events are logged; the state is a cache
                log.warning("user %r: state not stored (%s); the next request extends an older one", user_id, exc)
                store_failed = True
        wrote_back = False
        if tier is not None and snapshot.epoch and computed.kept is not None:
            wrote_back = await self._hold(user_id, snapshot, computed, held, outcome if blob is not None else None)
        if outcome is not None or store_failed or wrote_back:
            timing["store"] = _ms(clock)
        hot = held is not None and computed.source == "hit"
        if computed.blob is not None:
            state_bytes = len(computed.blob)
        elif computed.source == "hit":
            state_bytes = held.blob_bytes if hot else len(snapshot.blob)
        else:
            state_bytes = 0
        timing["total"] = _ms(start)
        sample = RequestSample(
            timing_ms=timing, source=computed.source, cas_lost=outcome is Stored.STALE,
            oov_events=computed.oov_events, user_id=user_id,
            state_bytes=len(blob) if outcome is Stored.STORED and blob is not None else None,
            tokens_kept=computed.tokens_kept, events_seen=computed.events_seen,
            accuracy=_grade(previous_answer, new_items or []), store_failed=store_failed,
            unreadable_events=snapshot.unreadable_events)
        return Served(user_id, list(zip(computed.item_ids, computed.scores)), computed, state_bytes, timing,
                      sample, hot=hot)

    async def _hold(self, user_id: str, snapshot: Snapshot, computed: Computed, held: HotEntry | None,
                    written: Stored | None) -> bool:
        """Keep the request's state in the hot tier, and write back what that evicts (-> whether it wrote
        any). `written`: what the store said of this request's state (None: it was not offered, or the
        store did not answer). A state refused as GONE (the user deleted or replaced, the log rolled back)
        is not kept, nor any copy of its epoch."""
        tier = self.tier
        if written is Stored.GONE:
            tier.drop(user_id, snapshot.epoch)
            return False
        known = snapshot.stored_seq
        if written is not None:  # STORED, or STALE: the store holds this state or a newer one
            known = max(known or 0, computed.events_seen)
        if held is not None and computed.kept is held.state:  # nothing new: the copy is held already
            if known is not None:
                tier.stored(user_id, snapshot.epoch, known)
            return False
        if self.engine.lossless:
            blob = None
        else:  # the blob that `kept` is the decoding of
            blob = computed.blob if computed.blob is not None else snapshot.blob or (held.blob if held else None)
        size = (len(computed.blob) if computed.blob is not None else len(snapshot.blob) if snapshot.blob
                else held.blob_bytes if held is not None else 0)
        entry = HotEntry(snapshot.epoch, computed.events_seen, computed.kept, computed.last_event, known, blob, size)
        evicted = tier.put(user_id, entry)
        for evicted_id, victim in evicted:
            await self._write_back(evicted_id, victim)
        return bool(evicted)

    async def _write_back(self, user_id: str, entry: HotEntry) -> None:
        """Store a copy the store lacks (compare-and-set, like any state); a failure costs a rebuild of the
        events it held beyond the stored state, which the log still has."""
        try:
            blob = entry.blob if entry.blob is not None else await anyio.to_thread.run_sync(
                self.engine.encode, entry.state, limiter=self.limiter)
            await self.store.store(user_id, entry.epoch, entry.seq, blob, last_event=entry.last)
        except StoreUnavailable as exc:
            self.tier.counts["hot_writeback_failures"] += 1
            log.warning("user %r: held state (%d events) not written back (%s); the next request re-extends "
                        "the stored one", user_id, entry.seq, exc)
            return
        self.tier.counts["hot_writebacks"] += 1

    async def close(self) -> None:
        """Write back every held state the store lacks, for at most SHUTDOWN_WRITEBACK_S (then the rest are
        dropped: each costs its user a re-extension of a few events)."""
        if self.tier is None:
            return
        dirty = self.tier.take_dirty()
        with anyio.move_on_after(SHUTDOWN_WRITEBACK_S):
            for user_id, entry in dirty:
                await self._write_back(user_id, entry)

    async def _compute(self, work: Work, snapshot: Snapshot, held: HotEntry | None, store: bool) -> Computed | None:
        """The engine's tensor work, in a worker thread (at most `compute_concurrency` at once)."""
        return await anyio.to_thread.run_sync(
            functools.partial(self.engine.compute, work, snapshot, held.state if held is not None else None,
                              store=store, keep=self.tier is not None), limiter=self.limiter)

    async def _compute_or_rebuild(self, user_id: str, work: Work, snapshot: Snapshot, held: HotEntry | None,
                                  store: bool) -> Computed | None:
        """`_compute`, and when it fails on a stored or held state, again without it: a blob that passes
        its checksum can still be wrong in ways decoding does not catch (a header that lies about its
        tensors), and a cache must cost a rebuild, never a 500. A failure without a state is the code's,
        and is raised."""
        try:
            return await self._compute(work, snapshot, held, store)
        except Exception as exc:
            if snapshot.state not in (StateStatus.FOUND, StateStatus.HELD):
                raise
            log.warning("user %r: the %s state does not serve (%s: %s); rebuilding it from the log", user_id,
                        "held" if held is not None else "stored", type(exc).__name__, exc)
        if held is not None:
            self.tier.drop(user_id, held.epoch)
        if snapshot.events_from != snapshot.log_start:
            snapshot = await self.store.load(user_id, with_state=False, whole_log=True)
        return await self._compute(work, dataclasses.replace(snapshot, state=StateStatus.UNUSABLE, blob=b"",
                                                             state_seq=0), None, True)

    # ----------------------------------------------------------------------------- validation

    def _id(self, value: str | int, what: str) -> str:
        text = str(value)
        if not text:
            raise InputError(422, f"{what} is empty")
        try:
            size = len(text.encode())
        except UnicodeEncodeError as exc:  # a lone UTF-16 surrogate, e.g. "\ud800" in the JSON
            raise InputError(422, f"{what} is not valid Unicode: {exc.reason} at character {exc.start}") from None
        if size > self.settings.max_id_length:
            raise InputError(422, f"{what} is too long: {size} bytes, at most {self.settings.max_id_length}")
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


@contextmanager
def _events_written(written: bool) -> Iterator[None]:
    """A store failure after the request's events were appended says so in its 503."""
    try:
        yield
    except StoreUnavailable as exc:
        if written and not exc.out_of_memory:
            exc.written = Written.EVENTS
        raise


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
