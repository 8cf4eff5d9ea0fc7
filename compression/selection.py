"""The budget machinery shared by token policies (pruning and merging).

A token policy keeps at most `budget` tokens per layer, or as many as `bytes` allow under the pipeline's
storage (`compression.sizing`). A layer that already fits is left whole, and no layer is ever emptied.
Subclasses implement `keep` (which tokens survive) or, when evicted tokens are folded into survivors
rather than dropped, `reduce_layer`.
"""

from __future__ import annotations

import torch
from kvrec.compression.base import Policy, Storage
from kvrec.compression.sizing import tokens_for_bytes
from kvrec.models.state import AttentionStats, State
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

    def compress(self, state: State, stats: AttentionStats | None, storage: Storage) -> State:
        if state.num_layers == 0:
            return state
        budget = self.token_budget()
        if budget is None:
            budget = tokens_for_bytes(storage, state, self.bytes)
        for layer in range(state.num_layers):
            if state.tokens(layer) > budget:
                self.reduce_layer(state, stats, layer, budget)
        return state

    def reduce_layer(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> None:
        state.select(layer, self.keep(state, stats, layer, budget))

    def keep(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> Tensor:
        """Ascending indices ([budget] int64) of the tokens of `layer` to keep; called only when T > budget."""
        raise NotImplementedError


def recent_plus_top(score: Tensor, budget: int, recent: int) -> Tensor:
    """The last `recent` tokens plus the highest-scoring others, `budget` in all, ascending.

    score [T] (T > budget). When recent >= budget this is just the last `budget` tokens.
    """
    t = score.shape[0]
    recent = min(recent, budget)
    older = t - recent
    top = torch.topk(score[:older], budget - recent).indices  # [budget - recent]
    return torch.cat([top.sort().values, torch.arange(older, t)])
