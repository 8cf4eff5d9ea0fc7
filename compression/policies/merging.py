"""Token level, merging: evicted tokens are folded into kept ones instead of being (all) dropped.

A merged token stands for `weight` events: its K and V are the weight-averaged K and V of what it absorbed
and the model multiplies its attention by the weight (HSTU) or adds log(weight) to its logit (SASRec), so
a merged token enters each output as the sum of its members would if their keys were equal. Extras are
summed (accumulated attention is additive).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from kvrec.compression.registry import register
from kvrec.compression.selection import TokenPolicy, heavy_hitter_score, recent_plus_top
from kvrec.models.state import AttentionStats, State
from torch import Tensor


def fold(state: State, layer: int, group: Tensor, groups: int) -> None:
    """Replace the tokens of `layer` by `groups` weighted means; token i goes to group[i] ([T] int64).

    Token tensors (K, V, or whatever the state keeps per token) are weight-averaged, weights and extras
    summed; pos and ts are left for the caller to set.
    """
    part = state.layers[layer]
    w = part.weight  # [T]
    total = w.new_zeros(groups).index_add_(0, group, w)  # [G]
    mean = lambda x: x.new_zeros(x.shape[0], groups, x.shape[2]).index_add_(1, group, x * w[None, :, None]) / (
        total[None, :, None])  # [G_heads, T, d] -> [G_heads, groups, d]
    part.tokens = {name: mean(x) for name, x in part.tokens.items()}
    part.weight = total
    for per_layer in state.extras.values():
        x = per_layer[layer]  # [..., T]
        per_layer[layer] = x.new_zeros(*x.shape[:-1], groups).index_add_(x.dim() - 1, group, x)


@register
@dataclass
class Merge(TokenPolicy):
    """D2O's token merging (Wan et al., 2024, "D2O: Dynamic Discriminative Operations for Efficient
    Generative Inference") with a fixed threshold: choose survivors as H2O does (`recent` newest plus
    the heavy hitters of `selection.heavy_hitter_score`), then fold each evicted token into the survivor
    whose key is most similar (cosine over the concatenated heads) when that similarity reaches
    `threshold`, and drop it otherwise, so that a token unlike every survivor does not blur one.

    Deliberate differences: D2O's threshold is an exponential moving average of past similarities and
    its merge weights a softmax of similarity; here the threshold is fixed (a state carries no scalar
    from request to request) and a merged token is the multiplicity-weighted mean of its members, which
    the model counts `weight` times (see the module docstring), so the number of events the state stands
    for is preserved for what is merged. D2O's layer-level budget allocation is left to `pyramid` and
    `ada`. `threshold=-1` merges every evicted token (CaM's and D2O's merge without the discrimination)."""

    name = "merge"
    requires = ("tokens", "k")
    uses_acc = True
    budget: int | None = None
    bytes: int | None = None
    recent: int | None = field(default=None, metadata={"none": "half the budget"})  # newest tokens kept
    threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(-1.0 <= self.threshold <= 1.0, f"threshold must be in [-1, 1], got {self.threshold}")

    def reduce_layer(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> None:
        t = state.tokens(layer)
        kept = recent_plus_top(heavy_hitter_score(state, layer), budget, self.recent)  # [B] ascending
        keys = F.normalize(state.k[layer].transpose(0, 1).reshape(t, -1), dim=-1)  # [T, H*d_k]
        similarity, nearest = (keys @ keys[kept].T).max(1)  # [T] each: best cosine, index into kept
        nearest[kept] = torch.arange(len(kept), device=kept.device)  # a survivor stays its own group
        joins = similarity >= self.threshold  # [T]
        joins[kept] = True
        pos, ts = state.pos[layer][kept], state.ts[layer][kept]
        state.select(layer, joins.nonzero()[:, 0])  # the dissimilar evicted tokens are dropped
        fold(state, layer, nearest[joins], len(kept))
        state.pos[layer], state.ts[layer] = pos, ts


@register
@dataclass
class Pool(TokenPolicy):
    """Chunk means: the last `window` tokens stay exact and older history is averaged into one summary
    token per `chunk` positions (chunk = pos // chunk, so a summary absorbs late members of its chunk and
    is otherwise stable across requests). When the summaries still exceed the budget, the oldest chunks
    are folded into a single token. Summary pos and ts are weight-averaged. Activation Beacon (Zhang et
    al., 2024, "Long Context Compression with Activation Beacon") condenses old context into learned
    beacon tokens; this is the training-free mean, not the beacon."""

    name = "pool"
    budget: int | None = None
    bytes: int | None = None
    window: int = 32
    chunk: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.chunk >= 1 and self.window >= 0, "chunk must be >= 1 and window >= 0")

    def reduce_layer(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> None:
        t = state.tokens(layer)
        window = min(self.window, budget - 1)  # leave at least one slot for the summaries
        older = t - window
        chunk_id = state.pos[layer][:older] // self.chunk  # [older], ascending
        ids, group = torch.unique_consecutive(chunk_id, return_inverse=True)
        excess = len(ids) - (budget - window)
        if excess > 0:  # fold the oldest excess + 1 chunks into one
            group = (group - excess).clamp(min=0)
        groups_old = int(group[-1]) + 1 if older else 0
        group = torch.cat([group, groups_old + torch.arange(window)])
        w = state.weight[layer].double()
        total = torch.zeros(groups_old + window, dtype=torch.double).index_add_(0, group, w)
        wmean = lambda x: (torch.zeros_like(total).index_add_(0, group, x.double() * w) / total).round().long()
        pos, ts = wmean(state.pos[layer]), wmean(state.ts[layer])
        fold(state, layer, group, groups_old + window)
        state.pos[layer], state.ts[layer] = pos, ts
