"""Token level, pruning: keep the tokens that matter most, drop the rest.

Tokens are shared by the heads of a layer (one `pos` per kept token), so every score here is summed over
heads. "Attention" means what `AttentionStats` reports: softmax probabilities for SASRec, and for HSTU's
pointwise SiLU attention the magnitude |SiLU(q.k + bias)| * multiplicity / n with which a key's value
enters an output, which ranks keys the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kvrec.compression.registry import register
from kvrec.compression.selection import TokenPolicy, recent_plus_top
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
    window is as long as the byte budget allows."""

    name = "streaming"
    sink: int = 4
    window: int | None = None
    bytes: int | None = None

    def __post_init__(self) -> None:
        self.check(self.window is None or self.bytes is None, "give window= (tokens) or bytes=, not both")
        if self.window is None and self.bytes is None:
            self.window = 252
        self.check(self.sink >= 0, f"sink must be >= 0, got {self.sink}")
        self.check(self.sink + (self.window or 0) >= 1 or self.bytes, "sink + window must be >= 1")
        self.check(self.bytes is None or self.bytes >= 1, f"bytes must be >= 1, got {self.bytes}")

    def token_budget(self) -> int | None:
        return None if self.window is None else self.sink + self.window

    def keep(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> Tensor:
        t = state.tokens(layer)
        sink = min(self.sink, budget - 1)  # at least one recent token: the newest event always stays
        return torch.cat([torch.arange(sink), torch.arange(t - (budget - sink), t)])


@register
@dataclass
class H2O(TokenPolicy):
    """H2O (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"):
    the `recent` newest tokens plus the heavy hitters, the tokens with the most attention accumulated
    over every query since they entered the state (carried across requests in `extras["acc"]`)."""

    name = "h2o"
    uses_acc = True
    budget: int | None = None
    bytes: int | None = None
    recent: int = 64

    def keep(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> Tensor:
        return recent_plus_top(state.extras["acc"][layer].sum(0), budget, self.recent)


@register
@dataclass
class SnapKV(TokenPolicy):
    """SnapKV (Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"):
    the attention of the latest queries (this request's last `window` events, at most the model's
    `obs_window`) votes for the older tokens; votes are average-pooled over `kernel` neighbours so that
    clusters survive together, and the observation window itself is kept."""

    name = "snapkv"
    budget: int | None = None
    bytes: int | None = None
    window: int = 16
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.kernel >= 1 and self.kernel % 2 == 1, f"kernel must be odd and >= 1, got {self.kernel}")

    def keep(self, state: State, stats: AttentionStats | None, layer: int, budget: int) -> Tensor:
        t = state.tokens(layer)
        if stats is None or stats.window[layer].shape[-1] != t:  # no votes: fall back to recency
            return torch.arange(t - budget, t)
        votes = stats.window[layer][:, -self.window:].sum((0, 1))  # [T]
        pooled = F.avg_pool1d(votes[None, None], self.kernel, stride=1, padding=self.kernel // 2,
                              count_include_pad=False)[0, 0]
        return recent_plus_top(pooled, budget, self.window)


@register
@dataclass
class KNorm(TokenPolicy):
    """K-norm (Devoto et al., EMNLP 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression"): keys with a low L2 norm draw high attention, so keep the lowest-norm tokens
    (norm averaged over heads). Needs no attention statistics."""

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
