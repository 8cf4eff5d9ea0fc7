"""Token level, pruning: keep the tokens that matter most, drop the rest.

Tokens are shared by the heads of a layer (one `pos` per kept token), so a token is kept or dropped for
every head at once and per-head scores are combined (summed, averaged, or, for AdaKV, the best head's).
"Attention" means what `AttentionStats` reports: softmax probabilities for SASRec, and for HSTU's
pointwise SiLU attention the magnitude |SiLU(q.k + bias)| * multiplicity / n with which a key's value
enters an output, which ranks keys the same way.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from kvrec.compression.base import PolicyContext, PolicyError, Storage
from kvrec.compression.policies.lowrank import check_observation_window, move_keys, rotary_keys
from kvrec.compression.registry import register
from kvrec.compression.selection import (
    TokenPolicy,
    heavy_hitter_score,
    layered_blob_bound,
    pooled_votes,
    recent_plus_top,
    window_attention,
)
from kvrec.models.state import AttentionStats, State
from torch import Tensor


@register
@dataclass
class Window(TokenPolicy):
    """The most recent `budget` tokens (sliding-window attention, e.g. Longformer's local window)."""

    name = "window"
    budget: int | None = None
    bytes: int | None = None

    def keep(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> Tensor:
        t = state.tokens(layer)
        return torch.arange(t - budget, t)


@register
@dataclass
class Streaming(TokenPolicy):
    """StreamingLLM (Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention Sinks"):
    the `sink` oldest kept tokens, which absorb attention mass, plus a recent `window`; with `bytes=` the
    window is as long as the byte budget allows.

    As in the paper, positions are those within the cache, not in the original history: after each
    eviction the sinks are moved to sit right before the window (sink j at the window's first position
    minus `sink` plus j), so a new query sees them at the distance it would in a cache of sinks, window
    and itself laid out contiguously. The window's own positions already are contiguous with the new
    queries, so only the sinks move. kvrec keeps absolute positions in `LayerState.pos` and rotary
    models (SASRec) bake the phase of that position into each cached key, so moving a sink means
    rotating its key by the shift (rotary phases add up) as well as rewriting its `pos`; for HSTU, whose
    position bias is computed from `pos` at every extension, rewriting `pos` is the whole move.
    Timestamps are left as they are (StreamingLLM has no time). This is the one policy that renumbers
    positions, which the state contract otherwise forbids; it needs the model (bind) to know which kind
    of keys it moves.
    """

    name = "streaming"
    sink: int = 4
    window: int | None = None
    bytes: int | None = None
    rotary: bool | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.check(self.window is None or self.bytes is None, "give window= (tokens) or bytes=, not both")
        if self.window is None and self.bytes is None:
            self.window = 252
        self.check(self.sink >= 0, f"sink must be >= 0, got {self.sink}")
        self.check(self.sink + (self.window or 0) >= 1 or self.bytes, "sink + window must be >= 1")
        self.check(self.bytes is None or self.bytes >= 1, f"bytes must be >= 1, got {self.bytes}")

    def bind(self, context: PolicyContext | None) -> None:
        if context is not None and context.model is not None:
            self.rotary = rotary_keys(context.model)

    def token_budget(self) -> int | None:
        return None if self.window is None else self.sink + self.window

    def reduce_layer(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> None:
        if self.rotary is None:
            raise PolicyError("streaming: re-indexes positions and must know how the model keeps them; "
                              "parse the spec with a PolicyContext holding the model")
        t, device = state.tokens(layer), state.pos[layer].device
        sink = min(self.sink, budget - 1)  # at least one recent token: the newest event always stays
        window = torch.arange(t - (budget - sink), t, device=device)
        state.select(layer, torch.cat([torch.arange(sink, device=device), window]))
        pos = state.pos[layer]  # [budget]
        moved = torch.cat([pos[sink] - sink + torch.arange(sink, device=device), pos[sink:]])  # sinks before the window
        if self.rotary:  # the keys that carry a rotary phase: K/V's keys, or a latent state's rotary key
            tokens = state.layers[layer].tokens
            name = "kr" if "kr" in tokens else "k"
            tokens[name] = move_keys(tokens[name], moved - pos)
        state.pos[layer] = moved


@register
@dataclass
class H2O(TokenPolicy):
    """H2O with scores per query (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for Efficient
    Generative Inference"): the `recent` newest tokens plus the heavy hitters, the tokens with the most
    attention accumulated over every query since they entered the state (carried across requests in
    `extras["acc"]`).

    Difference: the accumulated attention is divided by the number of queries that could see the token
    (`selection.heavy_hitter_score`). H2O evicts one token per generated token from a cache that is full
    from the start, so every candidate has been scored by about as many queries; kvrec's states grow
    across hundreds of requests, and a raw sum lets the oldest tokens win on age alone (over 400 events
    `h2o:budget=64,recent=16` kept positions 0-47). Per query, a heavy hitter is a token that draws more
    than its share, whenever it arrived."""

    name = "h2o"
    uses_acc = True
    budget: int | None = None
    bytes: int | None = None
    recent: int | None = field(default=None, metadata={"none": "half the budget"})  # newest tokens kept

    def keep(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> Tensor:
        return recent_plus_top(heavy_hitter_score(state, layer), budget, self.recent)


@register
@dataclass
class TOVA(TokenPolicy):
    """TOVA (Oren et al., EMNLP 2024, "Transformers are Multi-State RNNs"): keep the tokens to which the
    current query (the call's last one) gives the most attention, averaged over heads; no accumulated
    score, no recent window, no sinks: the control that tells whether H2O's history of attention helps.

    TOVA evicts one token per new token, each time by that token's query; a request here brings several
    events and the state is reduced once after them, so all the evictions of a request are decided by
    its last query. Without attention statistics (no new query), the most recent tokens are kept."""

    name = "tova"
    budget: int | None = None
    bytes: int | None = None

    def keep(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> Tensor:
        t = state.tokens(layer)
        window = window_attention(stats, layer, t)
        if window is None:
            return torch.arange(t - budget, t)
        return torch.topk(window[:, -1].mean(0), budget).indices.sort().values  # last query, heads averaged


@register
@dataclass
class SnapKV(TokenPolicy):
    """SnapKV (Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"):
    every query of the observation window (this request's last `window` events) votes for the older
    tokens with its attention; per head the votes are summed and average-pooled over `kernel`
    neighbours so that clusters survive together, and the window itself is kept.

    The model reports the attention of its last `obs_window` queries only, so `window` may not exceed it
    (refused at bind). Tokens are shared by heads, so the heads' pooled votes are summed instead of
    each head keeping its own top tokens. A request of fewer than `window` events votes with the
    queries it has; without attention statistics the most recent tokens are kept."""

    name = "snapkv"
    budget: int | None = None
    bytes: int | None = None
    window: int = 16
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.window >= 1, f"window must be >= 1, got {self.window}")
        self.check(self.kernel >= 1 and self.kernel % 2 == 1, f"kernel must be odd and >= 1, got {self.kernel}")

    def bind(self, context: PolicyContext | None) -> None:
        check_observation_window(self, self.window, context)

    def keep(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> Tensor:
        t = state.tokens(layer)
        window = window_attention(stats, layer, t)
        if window is None:
            return torch.arange(t - budget, t)
        return self.select(pooled_votes(window, self.window, self.kernel), budget)

    def select(self, votes: Tensor, budget: int) -> Tensor:
        """votes [H, T] -> the ascending indices [budget] to keep: the window plus the most-voted older."""
        return recent_plus_top(votes.sum(0), budget, self.window)


@register
@dataclass
class Pyramid(SnapKV):
    """PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling"): SnapKV's selection with budgets that shrink with depth, because lower
    layers spread attention widely and upper layers focus it on a few tokens. The budgets are the
    paper's arithmetic sequence: the top layer keeps budget / `beta`, the bottom one 2 budget - budget /
    `beta`, the layers between evenly spaced, so all layers together keep layers x budget, as SnapKV
    with `budget` would. With `bytes=`, the largest mean budget whose pyramid fits the byte budget.

    Per-layer token counts therefore exceed `budget` in the lower layers; the total does not. A layer
    shorter than its share does not pass the rest on (nor does the paper)."""

    name = "pyramid"
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.beta >= 1.0, f"beta must be >= 1, got {self.beta}")

    def budgets(self, state: State, storage: Storage) -> list[int]:
        if self.budget is not None:
            return self.allocate(state, self.budget)
        lo, hi = 1, max(state.tokens(layer) for layer in range(state.num_layers))
        while lo < hi:  # the largest mean budget whose allocation fits in `bytes` (at least 1)
            mid = (lo + hi + 1) // 2
            if layered_blob_bound(storage, state, self.allocate(state, mid)) <= self.bytes:
                lo = mid
            else:
                hi = mid - 1
        return self.allocate(state, lo)

    def allocate(self, state: State, mean: int) -> list[int]:
        """The pyramid of `mean`, or `mean` everywhere when no layer holds more (a history within the
        budget is left whole, where PyramidKV's code would already cut the upper layers)."""
        if all(state.tokens(layer) <= mean for layer in range(state.num_layers)):
            return [mean] * state.num_layers
        return pyramid_budgets(mean, state.num_layers, self.beta)


def pyramid_budgets(mean: int, layers: int, beta: float) -> list[int]:
    """PyramidKV's per-layer budgets, bottom first: an arithmetic sequence from 2 mean - mean / beta down
    to mean / beta (at least 1), in whole tokens that add up to layers x mean and never grow with depth."""
    if layers == 1:
        return [mean]
    top = max(mean / beta, 1.0)
    bottom = 2 * mean - top
    floors = [math.floor(bottom - (bottom - top) * layer / (layers - 1)) for layer in range(layers)]
    short = layers * mean - sum(floors)  # 0 <= short < layers: one more token to the lowest layers
    return [f + (layer < short) for layer, f in enumerate(floors)]


@register
@dataclass
class Ada(SnapKV):
    """AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
    Efficient LLM Inference"), on SnapKV's pooled votes: one budget shared by the heads of a layer and
    allocated by score, so a head that concentrates its attention on a few tokens gets those few and a
    head that spreads it gets more, instead of every head getting the same share.

    AdaKV takes the top budget x heads (head, token) scores across heads, each head keeping its own.
    In kvrec a token is kept for all heads of its layer, so the adaptation takes (head, token) pairs in
    order of score until `budget` distinct tokens are kept, which is keeping the tokens with the highest
    score in their best head (the max over heads, where SnapKV sums). AdaKV's safeguard is kept: each
    head first gets its own top `floor` x budget / heads tokens, so no head is starved. The observation
    window is kept, as in SnapKV."""

    name = "ada"
    floor: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(0.0 <= self.floor <= 1.0, f"floor must be in [0, 1], got {self.floor}")

    def select(self, votes: Tensor, budget: int) -> Tensor:
        heads, t = votes.shape
        window = min(self.window, budget)
        older, free = t - window, budget - window
        score = votes[:, :older]  # [H, older]
        chosen = torch.zeros(older, dtype=torch.bool, device=votes.device)
        guaranteed = int(self.floor * free / heads)  # the safeguard: at most floor x free in all
        if guaranteed:
            chosen[torch.topk(score, guaranteed, dim=1).indices.flatten()] = True
        best = score.amax(0).masked_fill(chosen, -math.inf)  # [older]
        chosen[torch.topk(best, free - int(chosen.sum())).indices] = True
        return torch.cat([chosen.nonzero()[:, 0], torch.arange(older, t, device=votes.device)])


@register
@dataclass
class KNorm(TokenPolicy):
    """A softmax heuristic, K-norm (Devoto et al., EMNLP 2024, "A Simple and Effective L2 Norm-Based
    Strategy for KV Cache Compression"): keep the tokens whose keys have the lowest L2 norm (averaged over
    heads), on the paper's observation that in softmax LLMs low-norm keys draw high attention. Needs no
    attention statistics. Nothing makes that link hold in kvrec's recommenders (measured: key norm and
    received attention correlate at -0.13 to 0.005, and HSTU's attention is not a softmax), so read it as
    an unscored control beside `random`, not as an attention proxy."""

    name = "knorm"
    requires = ("tokens", "k")
    budget: int | None = None
    bytes: int | None = None

    def keep(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> Tensor:
        norms = state.k[layer].norm(dim=-1).mean(0)  # [T]
        return torch.topk(-norms, budget).indices.sort().values


@register
@dataclass
class Random(TokenPolicy):
    """Uniformly random tokens: the control every scored policy must beat. Deterministic in (seed,
    events consumed, layer), so a replay gives the same state twice."""

    name = "random"
    budget: int | None = None
    bytes: int | None = None
    seed: int = 0

    def keep(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> Tensor:
        digest = hashlib.blake2b(f"{self.seed}:{state.events_consumed}:{layer}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        return torch.randperm(state.tokens(layer), generator=gen)[:budget].sort().values
