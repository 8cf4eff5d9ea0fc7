"""The budget machinery and token scores shared by token policies (pruning and merging).

A token policy keeps at most `budget` tokens per layer, or as many as `bytes` allow under the pipeline's
storage (`compression.sizing`). A layer that already fits is left whole, and no layer is ever emptied.
A policy that allocates budgets unevenly across layers (`pyramid`) overrides `budgets`; the others give
every layer the same. Subclasses implement `keep` (which tokens survive) or, when evicted tokens are
folded into survivors rather than dropped, `reduce_layer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kvrec.compression.base import Policy, Storage
from kvrec.compression.sizing import blob_bound, tokens_for_bytes
from kvrec.models.state import AttentionStats, LayerState, State
from torch import Tensor

DEFAULT_BUDGET = 256


class TokenPolicy(Policy):
    """Base of token policies; subclasses declare `budget: int | None` and `bytes: int | None` fields."""

    role = "token"
    requires = ("tokens",)
    budget: int | None
    bytes: int | None

    def __post_init__(self) -> None:
        self.check(self.budget is None or self.bytes is None, "give budget= (tokens) or bytes=, not both")
        if self.budget is None and self.bytes is None:
            self.budget = DEFAULT_BUDGET
        self.check(self.budget is None or self.budget >= 1, f"budget must be >= 1, got {self.budget}")
        self.check(self.bytes is None or self.bytes >= 1, f"bytes must be >= 1, got {self.bytes}")

    def token_budget(self) -> int | None:
        return self.budget

    def budgets(self, state: State, storage: Storage) -> list[int]:
        """Tokens each layer may keep: the same for every layer, from budget= or from bytes=."""
        budget = self.token_budget()
        if budget is None:
            budget = tokens_for_bytes(storage, state, self.bytes)
        return [budget] * state.num_layers

    def compress(self, state: State, stats: AttentionStats | None, storage: Storage) -> State:
        if state.num_layers == 0:
            return state
        for layer, budget in enumerate(self.budgets(state, storage)):
            if state.tokens(layer) > budget:
                self.reduce_layer(state, stats, layer, budget)
        return state

    def reduce_layer(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> None:
        state.select(layer, self.keep(state, stats, layer, budget))

    def keep(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> Tensor:
        """Ascending indices ([budget] int64) of the tokens of `layer` to keep; called only when T > budget."""
        raise NotImplementedError


def recent_plus_top(score: Tensor, budget: int, recent: int | None) -> Tensor:
    """The last `recent` tokens plus the highest-scoring others, `budget` in all, ascending.

    score [T] (T > budget). `recent` None is half the budget, H2O's equal split between recent tokens
    and heavy hitters (a fixed default of 64 made every budget up to 64 a plain sliding window). When
    recent >= budget this is just the last `budget` tokens.
    """
    t = score.shape[0]
    recent = budget // 2 if recent is None else min(recent, budget)
    older = t - recent
    top = torch.topk(score[:older], budget - recent).indices  # [budget - recent]
    return torch.cat([top.sort().values, torch.arange(older, t, device=score.device)])


def heavy_hitter_score(state: State, layer: int) -> Tensor:
    """H2O's score made comparable across token ages: the attention a token accumulated
    (`extras["acc"]`, summed over heads) divided by the number of queries that could see it.

    score [T]. A token at position p has been visible to the `events_consumed - p` queries since (the
    causal mask lets a query see itself and everything before it), and a merged token stands for
    `weight` events, each of which was visible about as long as its survivor. Dividing by this exposure
    turns "total attention" (which grows with age, so the oldest tokens win whatever they are) into
    "attention per query", where a heavy hitter is a token that draws more than its share.
    """
    part = state.layers[layer]
    exposure = (state.events_consumed - part.pos).clamp(min=1).to(part.weight.dtype) * part.weight  # [T]
    return state.extras["acc"][layer].sum(0) / exposure


def window_attention(stats: AttentionStats | None, layer: int, tokens: int) -> Tensor | None:
    """The attention of the call's latest queries to every token of `layer` ([H, w, T], w >= 1), or None
    when there is none to go by: no statistics, no new query, or statistics of another token axis."""
    if stats is None:
        return None
    window = stats.window[layer]
    return window if window.shape[1] > 0 and window.shape[-1] == tokens else None


def pooled_votes(window: Tensor, queries: int, kernel: int) -> Tensor:
    """SnapKV's votes: per head, the attention of the last `queries` queries summed, then averaged over
    `kernel` neighbouring tokens so that a cluster of attended tokens survives together.

    window [H, w, T] -> [H, T]."""
    votes = window[:, -queries:].sum(1)  # [H, T]
    return F.avg_pool1d(votes[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=False)[:, 0]


def layered_blob_bound(storage: Storage, state: State, budgets: list[int]) -> int:
    """`sizing.blob_bound` when layer l keeps min(T_l, budgets[l]) tokens: the bound of a view of the
    state that holds each layer's first budgets[l] tokens (slices, so nothing is copied)."""
    view = State(state.kind, [LayerState({n: x[:, :b] for n, x in part.tokens.items()}, part.pos[:b], part.ts[:b],
                                         part.weight[:b], part.fixed) for part, b in zip(state.layers, budgets)],
                 state.last_hidden, state.events_consumed, state.extras)
    return blob_bound(storage, view, max(budgets))
