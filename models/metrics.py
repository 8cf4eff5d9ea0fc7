"""Ranking metrics from ranks, shared by training, `kvrec eval-model` and the benchmarks.

A rank is 0-based: the number of items scored strictly above the true item (after exclusions).
Also the AUC family for an engagement head: `auc` over all labelled cases, `gauc` per user.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def hit_rate(ranks: Tensor, k: int) -> float:
    return float((ranks < k).float().mean()) if len(ranks) else 0.0


def ndcg_gains(ranks: Tensor, k: int) -> Tensor:
    """Per case [B] double: one relevant item, so 1 / log2(rank + 2) when it is in the top k, else 0."""
    return torch.where(ranks < k, 1.0 / torch.log2(ranks.double() + 2), torch.zeros((), dtype=torch.double))


def ndcg(ranks: Tensor, k: int) -> float:
    return float(ndcg_gains(ranks, k).mean()) if len(ranks) else 0.0


def ndcg_of_list(ranked: list, relevant: set, k: int) -> float:
    """NDCG@k of a ranked list against a set of relevant ids (online accuracy: several next items)."""
    dcg = sum(1.0 / math.log2(i + 2) for i, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal if ideal else 0.0


def rank_of_targets(scores: Tensor, targets: Tensor, exclude: list[Tensor] | None = None) -> Tensor:
    """scores [B, N], targets [B] -> ranks [B]; excluded items (never the target itself) do not count."""
    target_scores = scores.gather(1, targets[:, None])  # [B, 1], taken before exclusion
    if exclude is not None:
        scores = scores.clone()
        for row, items in enumerate(exclude):
            scores[row, items] = -math.inf
    return (scores > target_scores).sum(1)


def auc(scores, labels) -> float | None:
    """Area under the ROC curve: the chance that a random positive scores above a random negative, ties
    counting half (the Mann-Whitney statistic from average ranks, O(n log n)). None when one class is
    missing: an AUC of no pairs is undefined, and a 0.5 would read as a measurement."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"auc: {s.shape[0]} scores for {y.shape[0]} labels")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average 1-based rank of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def gauc(scores, labels, groups) -> tuple[float | None, int]:
    """Group AUC (Zhou et al., DIN, KDD 2018): each group's (user's) AUC weighted by its number of labelled
    cases, groups with a single label class skipped (they rank nothing). An overall AUC mixes users and
    rewards knowing who engages at all; GAUC asks whether each user's engaged items are ranked above that
    user's others. Returns (GAUC or None when no group has both classes, groups counted)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    g = np.asarray(groups).reshape(-1)
    total, weight, counted = 0.0, 0, 0
    for group in np.unique(g):
        rows = g == group
        value = auc(s[rows], y[rows])
        if value is not None:
            total += value * int(rows.sum())
            weight += int(rows.sum())
            counted += 1
    return (total / weight if weight else None), counted


def percentile(values, q: float) -> float:
    """Percentile q (0..100) of an unsorted sequence, interpolating linearly between the two nearest ranks like
    numpy's default, so /metrics, the reports and the benchmarks agree on what p99 means. Empty input has no
    percentile: callers decide what to show (ValueError here, rather than a silent 0 that reads as a measurement)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, got {q}")
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of an empty sequence")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(ranks: Tensor, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}hr@10": hit_rate(ranks, 10), f"{prefix}ndcg@10": ndcg(ranks, 10),
            f"{prefix}hr@50": hit_rate(ranks, 50), f"{prefix}ndcg@50": ndcg(ranks, 50)}
