"""The one serving step: restore a stored state, extend it with new events, compress, encode, score.

The server's engine and `kvrec bench offline` both run requests through this class, so the offline
numbers are the service's numbers. A request is, in order:

    state = step.restore(blob, seq)        # decode the stored blob; None when it cannot be used
         or step.start(position)           # nothing usable: an empty state whose next event is `position`
    out = step.advance(state, events)      # extend in chunks -> policy.compress -> encode (when it keeps state)
    step.scores(out.hidden, candidates)    # retrieval scores of the catalogue or of given candidates
    step.rank(out.state, candidates, ts)   # or, with a ranking head, candidates as target tokens

Under `recompute` nothing is stored: the caller hands `advance` the whole history on an empty state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from kvrec.compression.codec import BlobError, decode_state, encode_state
from kvrec.compression.pipeline import Pipeline
from kvrec.models.state import Events, State
from torch import Tensor


@dataclass
class Advanced:
    """What `advance` gives back."""

    state: State  # extended and compressed: the state the blob holds (before its storage encoding)
    hidden: Tensor | None  # [D] final hidden of the last event (None for a user with no events yet)
    blob: bytes | None  # the encoded state; None when the policy keeps none or `encode` was False
    macs: int  # attention multiply-accumulates of the extension, as each block counts them
    timing_ms: dict[str, float] = field(default_factory=dict)  # extend, compress, encode


class ServingStep:
    """A model, its fingerprint and one compression pipeline."""

    def __init__(self, model, pipeline: Pipeline, fingerprint: str, chunk: int = 1024):
        self.model = model
        self.pipeline = pipeline
        self.fingerprint = fingerprint
        self.chunk = chunk
        self.device = model.item_emb.weight.device

    @property
    def keeps_state(self) -> bool:
        return self.pipeline.keeps_state

    def restore(self, blob: bytes, events_consumed: int | None = None) -> State | None:
        """The stored state on the model's device, or None when the blob is corrupt, foreign (another
        model, policy or format) or disagrees with the store's count of the events it folded in."""
        try:
            state = decode_state(blob, self.pipeline, self.fingerprint)
        except BlobError:
            return None
        if events_consumed is not None and state.events_consumed != events_consumed:
            return None
        return state.to(self.device)

    def start(self, position: int = 0) -> State:
        """An empty state whose next event gets absolute position `position` (a trimmed log starts late)."""
        state = self.model.empty_state()
        state.events_consumed = position
        return state

    @torch.no_grad()
    def advance(self, state: State, events: Events, encode: bool = True) -> Advanced:
        """Fold `events` in, `chunk` at a time (each chunk is extended, then compressed), and encode."""
        timing: dict[str, float] = {"extend": 0.0, "compress": 0.0}
        hidden, macs = state.last_hidden, 0
        for start in range(0, len(events), self.chunk):
            clock = time.perf_counter()
            state, hidden, stats = self.model.extend(state, events[start:start + self.chunk])
            middle = time.perf_counter()
            state = self.pipeline.compress(state, stats)
            timing["extend"] += (middle - clock) * 1e3
            timing["compress"] += (time.perf_counter() - middle) * 1e3
            macs += stats.macs
        blob = None
        if encode and self.keeps_state:
            clock = time.perf_counter()
            blob = encode_state(state.to("cpu"), self.pipeline, self.fingerprint)
            timing["encode"] = (time.perf_counter() - clock) * 1e3
        return Advanced(state, hidden, blob, macs, timing)

    def scores(self, hidden: Tensor | None, candidates: Tensor | None = None) -> Tensor:
        """Retrieval scores [N] of the catalogue, or [C] of `candidates` ([C] internal ids). A user with
        no history yet has a zero hidden state: every item scores 0."""
        if hidden is None:
            hidden = torch.zeros(self.model.cfg.dim, device=self.device)
        cand = None if candidates is None else candidates.to(self.device)[None]
        return self.model.score(hidden[None], cand)[0]

    @property
    def ranks(self) -> bool:
        """Whether the model has a target-aware ranking head (else candidates are scored by retrieval)."""
        return self.model.rank_head is not None

    def rank(self, state: State, candidates: Tensor, ts: int, batch: int = 256) -> tuple[Tensor, Tensor]:
        """Candidates [C] (internal ids) as target tokens over `state` (compressed as the policy left it),
        at time `ts` (the user's latest event's) -> relevance logits [C], engagement probabilities [C]."""
        return self.model.rank(state, candidates, ts, batch)
