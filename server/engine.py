"""The torch side of a request: the model, its item map and the compression policy.

Everything here is synchronous and CPU/GPU bound; the pipeline runs it in a worker thread so the event
loop never waits on a matrix product. One `compute` call does all the tensor work of a request (decode,
extend, compress, encode, score) so that a request crosses into the thread pool once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from kvrec.compression.codec import BlobError, decode_state, encode_state
from kvrec.compression.spec import PolicyContext, parse_policy
from kvrec.models.checkpoint import Checkpoint, load_checkpoint
from kvrec.models.state import Events, State
from kvrec.server.settings import Settings
from kvrec.server.store import Loaded, unpack_event
from torch import Tensor


@dataclass
class Work:
    """What a request hands to the model: what to rank, and the stored state with the log around it."""

    candidates: Tensor | None = None  # [C] internal ids, None for the whole catalogue
    k: int = 10
    exclude_seen: bool = False  # leave the logged items out of a catalogue top-k (needs the whole log)
    score: bool = True  # False: only bring the state up to date (history bulk load)
    loaded: Loaded | None = None  # the stored state (if any) and the log entries from `entries_from` on


@dataclass
class Computed:
    source: str  # hit, miss, rebuild or recompute
    events_seen: int
    tokens_kept: int
    blob: bytes | None  # the state to store; None when the policy keeps none or nothing changed
    item_ids: list[str]
    scores: list[float]
    oov_events: int  # events folded in this time whose item the model does not know
    timing_ms: dict[str, float] = field(default_factory=dict)


class NeedFullLog(Exception):
    """The stored state could not be used and the events it covered were not loaded: reload the log."""


class Engine:
    """A loaded checkpoint with one compression policy."""

    def __init__(self, checkpoint: Checkpoint, policy: str, prefill_chunk: int = 1024):
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.policy = parse_policy(policy, context=PolicyContext(model=self.model,
                                                                 checkpoint_path=checkpoint.path))
        self.fingerprint = checkpoint.fingerprint
        self.item_ids = checkpoint.item_ids
        self.index = checkpoint.item_index()
        self.oov = self.model.cfg.num_items
        self.device = self.model.item_emb.weight.device
        self.prefill_chunk = prefill_chunk
        cfg = self.model.cfg
        self.raw_bytes_per_event = cfg.layers * cfg.heads * (cfg.d_k + cfg.d_v) * 4  # full fp32 K/V

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

    def internal_ids(self, item_ids: list[str]) -> Tensor:
        """External ids -> [n] internal ids, the out-of-vocabulary id for unknown ones."""
        return torch.tensor([self.index.get(i, self.oov) for i in item_ids], dtype=torch.long)

    def unknown(self, item_ids: list[str]) -> list[str]:
        return [i for i in item_ids if i not in self.index]

    @torch.no_grad()
    def compute(self, work: Work) -> Computed:
        """Bring the user's state up to date with the log and rank. Raises NeedFullLog when the stored
        state turns out unusable and the log was loaded only from where that state ended."""
        timing: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timing[stage] = timing.get(stage, 0.0) + (now - clock) * 1e3
            clock = now

        loaded = work.loaded
        if not self.keeps_state and not work.score:  # a history bulk load with nothing to keep
            return Computed("recompute", loaded.events_total, 0, None, [], [], 0, timing)
        state: State | None = None
        if not self.keeps_state:
            source = "recompute"
        elif loaded.state_seq == Loaded.MISSING:
            source = "miss"
        elif loaded.state_seq == Loaded.UNUSABLE:
            source = "rebuild"
        else:
            try:
                state = decode_state(loaded.blob, self.policy, self.fingerprint).to(self.device)
                source = "hit"
            except BlobError:
                source = "rebuild"
            if state is not None and state.events_consumed != loaded.state_seq:
                state, source = None, "rebuild"  # a header that disagrees with the store: distrust it
            lap("decode")
        if state is None:
            if loaded.entries_from != loaded.log_start:
                raise NeedFullLog
            state = self.model.empty_state()
            state.events_consumed = loaded.log_start  # positions stay absolute when the log was trimmed

        events = self.decode_events(loaded.entries[state.events_consumed - loaded.entries_from:])
        oov = int((events.items == self.oov).sum())
        for start in range(0, len(events), self.prefill_chunk):
            state, _, stats = self.model.extend(state, events[start:start + self.prefill_chunk])
            lap("extend")
            state = self.policy.compress(state, stats)
            lap("compress")

        blob = None
        if self.keeps_state and (len(events) or source == "rebuild"):
            blob = encode_state(state.to("cpu"), self.policy, self.fingerprint)
            lap("encode")

        ids: list[str] = []
        scores: list[float] = []
        if work.score:
            ids, scores = self._rank(state, work)
            lap("score")
        return Computed(source, state.events_consumed, state.tokens_kept(), blob, ids, scores, oov, timing)

    def decode_events(self, entries: list[bytes]) -> Events:
        """Packed log entries -> Events of internal ids (unknown items become the out-of-vocabulary id)."""
        items, ts, actions = [], [], []
        for entry in entries:
            item, t, a = unpack_event(entry)
            items.append(item)
            ts.append(t)
            actions.append(a)
        return Events(self.internal_ids(items), torch.tensor(ts, dtype=torch.long),
                      torch.tensor(actions, dtype=torch.long))

    def _rank(self, state: State, work: Work) -> tuple[list[str], list[float]]:
        """Top-k of the candidates (or the catalogue), best first. A user with no history yet has a zero
        hidden state: every item scores 0."""
        hidden = state.last_hidden
        if hidden is None:
            hidden = torch.zeros(self.model.cfg.dim, device=self.device)
        hidden = hidden[None]
        if work.candidates is None:
            exclude = None
            if work.exclude_seen:
                exclude = [self.internal_ids([unpack_event(e)[0] for e in work.loaded.entries])]
            top, idx = self.model.topk(hidden, work.k, exclude)
            top, idx = top[0], idx[0]
        else:
            cand = work.candidates.to(hidden.device)
            scores = self.model.score(hidden, cand[None])[0]
            top, order = scores.topk(min(work.k, scores.shape[0]))
            idx = cand[order]
        keep = torch.isfinite(top)  # excluded items score -inf: fewer eligible items than k
        return [self.item_ids[i] for i in idx[keep].tolist()], top[keep].tolist()
