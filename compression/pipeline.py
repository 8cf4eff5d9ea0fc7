"""A pipeline: at most one token policy followed by at most one storage policy.

`compress` runs after every `extend`. Before the token stage it folds this call's attention into the
running total `state.extras["acc"]` ([H, T_l] per layer) when a stage ranks tokens by accumulated
attention (h2o, merge, intact), so that the total is kept once however many stages read it. The token
stage must be the first thing that changes the token axis, because `AttentionStats` are aligned with the
extended state; that is why a pipeline has a single token stage. The storage stage then sees the
statistics once (`Storage.observe`), on the tokens the token stage kept: ThinK picks key channels there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvrec.compression.base import Policy, Storage
from kvrec.compression.selection import TokenPolicy
from kvrec.models.state import AttentionStats, State


@dataclass
class Pipeline:
    token: TokenPolicy | None
    storage: Storage
    keeps_state: bool = True

    @property
    def stages(self) -> list[Policy]:
        return [s for s in (self.token, self.storage) if s is not None]

    @property
    def spec(self) -> str:
        """Canonical spec: stages in order, parameters in field order, `full` implied after a token stage."""
        if not self.keeps_state:
            return "recompute"
        if self.token is None:
            return self.storage.spec()
        if self.storage.name == "full":
            return self.token.spec()
        return f"{self.token.spec()}+{self.storage.spec()}"

    def __str__(self) -> str:
        return self.spec

    def compress(self, state: State, stats: AttentionStats | None) -> State:
        """Reduce a freshly extended state; `stats` are that extension's attention statistics (or None).

        The caller's state is not modified: its containers are copied before tokens are selected.
        """
        state = state.shallow_copy()
        if any(s.uses_acc for s in self.stages):
            accumulate_attention(state, stats)
        if self.token is not None:
            state = self.token.compress(state, stats, self.storage)
        self.storage.observe(state, stats)
        return state


def accumulate_attention(state: State, stats: AttentionStats | None) -> None:
    """state.extras["acc"][l] [G, T_l] += attention each token received in this call; G is the head axis of
    the state's token tensors (the K/V heads, 1 for a latent state), which the model's statistics share."""
    acc = state.extras.get("acc")
    if acc is None:
        acc = [torch.zeros(next(iter(part.tokens.values())).shape[0], part.num_tokens, device=part.pos.device)
               for part in state.layers]
    for layer in range(state.num_layers):
        if stats is None:
            continue
        if stats.received[layer].shape != acc[layer].shape:  # a model whose statistics miss the state's layout
            raise ValueError(f"layer {layer}: attention statistics {tuple(stats.received[layer].shape)} do not "
                             f"line up with the state's tokens {tuple(acc[layer].shape)}")
        acc[layer] = acc[layer] + stats.received[layer].float()
    state.extras["acc"] = acc
