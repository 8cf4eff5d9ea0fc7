"""The torch side of a request: the model, its item map, and the one serving step with the policy.

Everything here is synchronous and CPU/GPU bound; the pipeline runs it in a worker thread so the event
loop never waits on a matrix product. One `compute` call does all the tensor work of a request (restore,
extend, compress, encode, score, through `compression.step.ServingStep`) so that a request crosses into
the thread pool once. It reads the store's `Snapshot` and never changes it, nor the hot tier's state it
may start from (states are replaced, never written into).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from kvrec.compression.codec import encode_restored, encode_state
from kvrec.compression.policies.baseline import Full
from kvrec.compression.spec import PolicyContext, parse_policy
from kvrec.compression.step import ServingStep
from kvrec.models.checkpoint import Checkpoint, load_checkpoint
from kvrec.models.state import Events, State
from kvrec.server.settings import Settings
from kvrec.server.store import LoggedEvent, Snapshot, StateStatus
from torch import Tensor


@dataclass(frozen=True)
class Work:
    """What a request asks of the model."""

    candidates: Tensor | None = None  # [C] internal ids, None for the whole catalogue
    k: int = 10
    exclude_seen: bool = False  # leave the logged items out of a catalogue top-k (needs the whole log)
    score: bool = True  # False: only bring the state up to date (history bulk load)


@dataclass
class Computed:
    source: str  # hit (a cached state: the stored one, or the hot tier's), miss, rebuild or recompute
    events_seen: int
    tokens_kept: int
    blob: bytes | None  # the state, encoded; None when the policy keeps none, nothing changed, or not asked
    item_ids: list[str]
    scores: list[float]
    oov_events: int  # events folded in this time whose item the model does not know
    timing_ms: dict[str, float] = field(default_factory=dict)
    mode: str = "retrieval"  # "ranking": candidates ranked as target tokens by the model's ranking head
    engagement: list[float] | None = None  # ranking mode: each returned item's engagement probability
    kept: State | None = None  # asked to `keep`: the state as its blob restores, on the model's device
    last_event: LoggedEvent | None = None  # the last event the state folded in (None: none, or not logged)


class Engine:
    """A loaded checkpoint with one compression policy."""

    def __init__(self, checkpoint: Checkpoint, policy: str, prefill_chunk: int = 1024, rank_batch: int = 256):
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.policy = parse_policy(policy, context=PolicyContext(model=self.model,
                                                                 checkpoint_path=checkpoint.path))
        self.fingerprint = checkpoint.fingerprint
        self.step = ServingStep(self.model, self.policy, self.fingerprint, prefill_chunk)
        self.item_ids = checkpoint.item_ids
        self.index = checkpoint.item_index()
        self.oov = self.model.cfg.num_items
        self.rank_batch = rank_batch  # candidates per pass over the state in ranking mode
        self._layout = self.model.empty_state()  # what this model's states hold, for `dense_bytes`

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        """Load the model and parse the policy; raises CheckpointError or PolicyError with a message
        meant for the operator."""
        torch.set_num_threads(settings.torch_threads)
        checkpoint = load_checkpoint(settings.model, settings.torch_device())
        return cls(checkpoint, settings.policy, settings.prefill_chunk)

    @property
    def spec(self) -> str:
        return self.policy.spec

    @property
    def keeps_state(self) -> bool:
        return self.policy.keeps_state

    @property
    def lossless(self) -> bool:
        """Whether a state's blob restores the state exactly as computed: the `full` storage writes its
        tensors as they are; any other (quantized, low-rank, shared, ...) changes them when it encodes."""
        return isinstance(self.policy.storage, Full)

    def encode(self, state: State) -> bytes:
        """The blob of a state (a hot copy's, for its write-back)."""
        return encode_state(state.to("cpu"), self.policy, self.fingerprint)

    def dense_bytes(self, events: int, users: int = 1) -> int:
        """fp32 bytes that `users` states of this model hold after `events` events in all, with nothing
        compressed, whatever their kind: the reference that compression ratios are taken against. It is
        affine in the events (a token per event, fixed tensors once per user), so a census sums in one call."""
        return self._layout.dense_bytes(events) + (users - 1) * self._layout.dense_bytes(0)

    def internal_ids(self, item_ids: list[str]) -> Tensor:
        """External ids -> [n] internal ids, the out-of-vocabulary id for unknown ones."""
        return torch.tensor([self.index.get(i, self.oov) for i in item_ids], dtype=torch.long)

    def unknown(self, item_ids: list[str]) -> list[str]:
        return [i for i in item_ids if i not in self.index]

    @torch.no_grad()
    def compute(self, work: Work, snapshot: Snapshot, held: State | None = None, store: bool = True,
                keep: bool = False) -> Computed | None:
        """Bring the user's state up to date with the log and rank. `held`: the hot tier's copy, which
        `snapshot` (HELD) says is current. `store`: encode the state when it changed, to store it;
        `keep`: hand the state back (`kept`) as its blob would restore it, for the hot tier. None, having
        done nothing else, when the stored state does not restore and `snapshot` lacks the events it
        covered: the caller then loads the whole log and calls again (a rare rebuild costs a second load)."""
        if not self.keeps_state and not work.score:  # a history bulk load with nothing to keep
            return Computed("recompute", snapshot.events_total, 0, None, [], [], 0)
        clock = time.perf_counter()
        begun = self._begin(snapshot, held)
        if begun is None:
            return None
        state, source = begun
        timing = {"decode": _ms(clock)} if snapshot.state is StateStatus.FOUND and self.keeps_state else {}

        logged = snapshot.events[state.events_consumed - snapshot.events_from:]
        events = self._events(logged)
        changed = len(events) > 0 or source == "rebuild"
        # a rebuild is always encoded (it replaces a damaged stored state); a kept state must be what its
        # blob restores, which under a storage that changes tensors comes with the encoding
        encode = changed and (store or source == "rebuild" or (keep and not self.lossless))
        restoring = encode and keep and not self.lossless
        out = self.step.advance(state, events, encode=encode and not restoring)
        timing.update(out.timing_ms)
        blob, kept = out.blob, out.state
        if restoring:
            clock = time.perf_counter()
            blob, kept = encode_restored(out.state.to("cpu"), self.policy, self.fingerprint)
            kept = kept.to(self.step.device)
            timing["encode"] = _ms(clock)

        computed = Computed(source, out.state.events_consumed, out.state.tokens_kept(), blob, [], [],
                            int((events.items == self.oov).sum()), timing,
                            last_event=logged[-1] if logged else snapshot.state_last if source == "hit" else None)
        if keep and self.keeps_state:
            computed.kept = kept  # as its blob restores: itself when lossless or unchanged since restored
        if work.score:
            clock = time.perf_counter()
            if work.candidates is not None and self.step.ranks:
                self._rank_targets(out.state, work, snapshot, computed)
            else:
                computed.item_ids, computed.scores = self._rank(out.hidden, work, snapshot)
            timing["score"] = _ms(clock)
        return computed

    def _begin(self, snapshot: Snapshot, held: State | None = None) -> tuple[State, str] | None:
        """The restore-or-rebuild decision: the hot tier's copy when the snapshot says it is current, or
        the stored state when it restores (hit), else an empty state at the start of the kept log
        (recompute: the policy keeps none; miss: none stored; rebuild: one that cannot be used). None when
        a rebuild needs the events that `snapshot` skipped."""
        if self.keeps_state and snapshot.state is StateStatus.HELD:
            return held, "hit"
        if self.keeps_state and snapshot.state is StateStatus.FOUND:
            state = self.step.restore(snapshot.blob, snapshot.state_seq)
            if state is not None:
                return state, "hit"
            if snapshot.events_from != snapshot.log_start:
                return None
        if not self.keeps_state:
            source = "recompute"
        else:
            source = "miss" if snapshot.state is StateStatus.MISSING else "rebuild"
        return self.step.start(snapshot.log_start), source  # positions stay absolute in a trimmed log

    def _events(self, logged: tuple[LoggedEvent, ...]) -> Events:
        """Logged events -> Events of internal ids (unknown items become the out-of-vocabulary id)."""
        return Events(self.internal_ids([e.item_id for e in logged]),
                      torch.tensor([e.ts for e in logged], dtype=torch.long),
                      torch.tensor([e.action for e in logged], dtype=torch.long))

    def _rank_targets(self, state: State, work: Work, snapshot: Snapshot, computed: Computed) -> None:
        """Ranking mode: the candidates as target tokens over the state as the policy left it, at the time
        of the user's latest event: this request's last, else the latest the state kept (else 0)."""
        kept = (int(part.ts.max()) for part in state.layers if part.num_tokens)
        ts = snapshot.events[-1].ts if snapshot.events else max(kept, default=0)
        relevance, engage = self.step.rank(state, work.candidates, ts, self.rank_batch)  # [C] each
        top, order = relevance.topk(min(work.k, relevance.shape[0]))
        computed.item_ids = [self.item_ids[i] for i in work.candidates[order.cpu()].tolist()]
        computed.scores, computed.engagement = top.tolist(), engage[order].tolist()
        computed.mode = "ranking"

    def _rank(self, hidden: Tensor | None, work: Work, snapshot: Snapshot) -> tuple[list[str], list[float]]:
        """Top-k of the candidates (or the catalogue, without the logged items under `exclude_seen`),
        best first. hidden [D], or None for a user with no history yet."""
        scores = self.step.scores(hidden, work.candidates)  # [C] or [N]
        if work.candidates is None:
            ids = torch.arange(scores.shape[0], device=scores.device)
            if work.exclude_seen:  # the snapshot holds the whole log
                seen = self.internal_ids([e.item_id for e in snapshot.events]).to(scores.device)
                scores = scores.index_fill(0, seen[seen < scores.shape[0]], -torch.inf)
        else:
            ids = work.candidates.to(scores.device)
        top, order = scores.topk(min(work.k, scores.shape[0]))
        keep = torch.isfinite(top)  # excluded items score -inf: fewer eligible items than k
        return [self.item_ids[i] for i in ids[order][keep].tolist()], top[keep].tolist()


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1e3
