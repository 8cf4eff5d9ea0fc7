"""The hot tier: per worker process, decoded states on the model's device in front of the store.

A request whose user this worker holds sends the store its copy's version (`store.Held`: epoch, events
folded in, the last of them) with the load it makes anyway; when the copy is current (the log's epoch, no
older than the stored state, its events still the log's) the load skips the blob and returns only the
events after the copy, and the request extends the copy: no blob crosses the network, none is decoded.
Otherwise the copy is stale (another worker stored a newer state, the user was replaced or deleted, the
log was rolled back) and the request loads the stored state as it would without the tier.

The event log is always written first, by the append, so the tier holds only caches: a state is written
back to the store (compare-and-set, like every state) once it has folded in `writeback_events` more
than the stored one, when the store lacks one, when it is evicted, and at shutdown. A worker that dies
loses at most `writeback_events - 1` events of extension per user, which the next request re-extends
from the stored state: a rebuild of a few events, never an event.

A held copy is exactly what the stored blob of it would restore, so that a hot hit serves the numbers a
Redis hit would: a storage that keeps tensors as they are (`full`) holds the computed state itself,
any other holds the decoding of the blob it encoded (and that blob, for its write-back).

Copies are never written to (models and policies replace tensors, they never write into them), so two
requests of one user may extend the same copy at once; `put` keeps the copy that has folded in more
events, as the store's compare-and-set does. The tier is used from the event loop only: no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from kvrec.models.state import State
from kvrec.server.store import Held, LoggedEvent


@dataclass
class HotEntry:
    """One user's held state."""

    epoch: str
    seq: int  # events the state has folded in
    state: State  # on the model's device, as a blob of it restores
    last: LoggedEvent | None  # the last event folded in (None: none, or no longer in the log)
    stored_seq: int | None  # events of the newest state of this epoch known to be in the store; None: none
    blob: bytes | None = None  # the encoding `state` was decoded from (storages other than `full`)
    blob_bytes: int = 0  # size of the state's blob as last encoded (what the response reports)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = state_nbytes(self.state) + (len(self.blob) if self.blob is not None else 0)

    @property
    def held(self) -> Held:
        return Held(self.epoch, self.seq, self.last)

    @property
    def dirty(self) -> bool:
        """The store holds an older state than this one (or none)."""
        return self.stored_seq is None or self.stored_seq < self.seq


def state_nbytes(state: State) -> int:
    """Bytes of every tensor of `state`, each counted whole (views of one buffer count once each, so this
    is an upper bound of what the state keeps alive besides a blob its views point into)."""
    tensors = [t for part in state.layers for t in (part.pos, part.ts, part.weight, *part.tensors().values())]
    tensors += [t for per_layer in state.extras.values() for t in per_layer]
    if state.last_hidden is not None:
        tensors.append(state.last_hidden)
    return sum(t.numel() * t.element_size() for t in tensors)


class HotTier:
    """A least-recently-used map user id -> HotEntry of at most `max_bytes` in all."""

    def __init__(self, max_bytes: int, writeback_events: int):
        self.max_bytes = max_bytes
        self.writeback_events = writeback_events
        self._entries: OrderedDict[str, HotEntry] = OrderedDict()
        self.bytes = 0
        # cumulative counts, drained into /metrics by the metrics task
        self.counts = {"hot_hits": 0, "hot_misses": 0, "hot_stale": 0, "hot_evictions": 0, "hot_writebacks": 0,
                       "hot_writeback_failures": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user_id: str) -> HotEntry | None:
        """The user's held copy, now the most recently used; None when none is held."""
        entry = self._entries.get(user_id)
        if entry is not None:
            self._entries.move_to_end(user_id)
        return entry

    def count_lookup(self, entry: HotEntry | None, current: bool) -> None:
        self.counts["hot_hits" if current else "hot_stale" if entry is not None else "hot_misses"] += 1

    def due(self, seq: int, stored_seq: int | None) -> bool:
        """Whether a state of `seq` events should be written to a store that holds `stored_seq`."""
        return stored_seq is None or seq - stored_seq >= self.writeback_events

    def put(self, user_id: str, entry: HotEntry) -> list[tuple[str, HotEntry]]:
        """Hold `entry` unless a copy of the same epoch with as many events is held already (a concurrent
        request of the user got there first: it is kept, and learns what the store holds). Evicts the
        least recently used copies past `max_bytes`, `entry` itself when it alone is larger. Returns the
        evicted copies the store lacks (the caller writes them back), `entry` among them when it is dirty
        and was not kept."""
        old = self._entries.get(user_id)
        if old is not None and old.epoch == entry.epoch:
            known = max((s for s in (old.stored_seq, entry.stored_seq) if s is not None), default=None)
            if old.seq >= entry.seq:
                old.stored_seq = known
                return []
            entry.stored_seq = known
        if entry.nbytes > self.max_bytes:
            self.drop(user_id)
            self.counts["hot_evictions"] += 1
            return [(user_id, entry)] if entry.dirty else []
        self.drop(user_id)
        self._entries[user_id] = entry
        self.bytes += entry.nbytes
        evicted = []
        while self.bytes > self.max_bytes:
            victim_id, victim = self._entries.popitem(last=False)
            self.bytes -= victim.nbytes
            self.counts["hot_evictions"] += 1
            if victim.dirty:
                evicted.append((victim_id, victim))
        return evicted

    def stored(self, user_id: str, epoch: str, seq: int) -> None:
        """The store holds a state of `seq` events of `epoch` (or a newer one) for the user."""
        entry = self._entries.get(user_id)
        if entry is not None and entry.epoch == epoch and (entry.stored_seq is None or entry.stored_seq < seq):
            entry.stored_seq = seq

    def drop(self, user_id: str, epoch: str | None = None) -> None:
        """Forget the user's copy (only one of `epoch`, when given)."""
        entry = self._entries.get(user_id)
        if entry is not None and (epoch is None or entry.epoch == epoch):
            del self._entries[user_id]
            self.bytes -= entry.nbytes

    def take_dirty(self) -> list[tuple[str, HotEntry]]:
        """Empty the tier; the copies the store lacks, for a last write-back (shutdown)."""
        dirty = [(user_id, entry) for user_id, entry in self._entries.items() if entry.dirty]
        self._entries.clear()
        self.bytes = 0
        return dirty
