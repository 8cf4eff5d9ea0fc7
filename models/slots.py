"""HSTU with trained sequence compression into learned slots (`--slots S --slot-window W`).

The last W events stay exact (models.exact_window); each event that leaves the window is folded into S
slots per layer and head by a trained router, and a query attends to the slots as to S more keys:

    r_s(k) = softmax_s(u_s . k / sqrt(d_k))          the router: learned slot embeddings u [H, S, d_k]
    n_s = sum_j r_s(k_j) w_j,  K_s = sum_j r_s(k_j) w_j k_j,  V_s = sum_j r_s(k_j) w_j v_j
    slot key K_s / n_s, slot value V_s / n_s, multiplicity n_s (w_j: the evicted token's own multiplicity)

so a slot is the soft-count-weighted mean of the keys and values routed to it and stands for n_s events,
as a merged token does under HSTU's `normalise` (the weight of a key is multiplied by how many events it
stands for): the slot's contribution is SiLU(q . K_s / n_s / sqrt(d_k) + b_s) / N * n_s * V_s / n_s,
where b [S, H] is a learned bias per slot (slots have no position for the relative bias to read). Router,
slot embeddings and biases train end to end through the training forward, which computes, for every
query, the slots as serving would hold them when it arrives: prefix sums over the key axis of the routed
keys, values and counts, read at the end of the query's older keys.

How it relates to the two papers it resembles, and why it follows neither:
- Activation Beacon (Zhang et al. 2024, arXiv 2401.03462) condenses each chunk of activations into
  beacon tokens that attend to the chunk inside the LLM, at a fixed condensing ratio, so its cache still
  grows with the context (by 1/ratio). Here the number of slots is fixed, the state does not grow, and
  condensing is a running mean under a router rather than attention by extra tokens.
- Linformer (Wang et al. 2020, arXiv 2006.04768) projects keys and values along the sequence axis with
  learned matrices E, F [k, n], fixed per position and over the whole (non-causal) sequence. The router
  here is data-dependent (a key goes to the slots its content matches), causal and incremental: an event
  is folded once, when it leaves the window, and the slots never revisit it.
Closest in spirit is soft k-means / slot pooling: each slot is the running centroid of what it was sent.

State kind "slots": per layer the window's tokens ("k", "v", at most W) and fixed "slot_k" [H, S, d_k],
"slot_v" [H, S, d_v] (the sums) and "slot_n" [H, S] (the soft counts). Sums rather than means are stored
so that folding more events in is an addition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kvrec.models.exact_window import ExactWindowBlock, ExactWindowHSTU
from kvrec.models.recommender import ModelConfig
from torch import Tensor, nn


def prefix_cut(older: Tensor) -> Tensor:
    """older [B, n, T] bool -> cut [B, n] int64 such that keys [0, cut) hold every older key of each
    query. The older keys are a prefix of the key axis up to padding keys (which carry no weight), so
    the sums over [0, cut) are the sums over the older keys."""
    if older.shape[-1] == 0:
        return older.new_zeros(older.shape[:-1], dtype=torch.long)
    index = torch.arange(1, older.shape[-1] + 1, device=older.device)  # [T], 1-based
    return (older * index).amax(-1)


class SlotBlock(ExactWindowBlock):
    """An HSTU layer with an exact window of `cfg.slot_window` events and `cfg.slots` learned slots."""

    state_kind = "slots"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.slot_window)
        self.slot_emb = nn.Parameter(torch.randn(cfg.heads, cfg.slots, cfg.d_k) / math.sqrt(cfg.d_k))  # [H, S, d_k]
        self.slot_bias = nn.Parameter(torch.zeros(cfg.slots, cfg.heads))  # [S, H]

    def summary_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.cfg
        return {"slot_k": (cfg.heads, cfg.slots, cfg.d_k), "slot_v": (cfg.heads, cfg.slots, cfg.d_v),
                "slot_n": (cfg.heads, cfg.slots)}

    def routed(self, k: Tensor, v: Tensor, key_weight: Tensor) -> Tensor:
        """k [..., H, T, d_k], v [..., H, T, d_v], key_weight [..., T] -> what each token adds to each
        slot's (key sum, value sum, count): [..., H, T, S, d_k + d_v + 1]."""
        route = torch.softmax(k @ self.slot_emb.transpose(-1, -2) / math.sqrt(self.cfg.d_k), dim=-1)  # [..., H, T, S]
        route = route * key_weight[..., None, :, None]
        return route[..., None] * torch.cat([k, v, torch.ones_like(k[..., :1])], dim=-1)[..., None, :]

    def attend(self, q, k, v, key_weight, local, older, summary):
        cfg = self.cfg
        b, h, n, _ = q.shape
        added = self.routed(k, v, key_weight)  # [B, H, T, S, E]
        prefix = F.pad(added.cumsum(2), (0, 0, 0, 0, 1, 0))  # [B, H, T + 1, S, E]: row c sums keys [0, c)
        cut = prefix_cut(older)[:, None, :, None, None].expand(b, h, n, *prefix.shape[-2:])
        stored = torch.cat([summary["slot_k"], summary["slot_v"], summary["slot_n"][..., None]], dim=-1)  # [H, S, E]
        sums = prefix.gather(2, cut) + stored[:, None]  # [B, H, n, S, E]: the slots as this query finds them
        key_sum, value_sum, count = sums.split([cfg.d_k, cfg.d_v, 1], dim=-1)
        slot_key = key_sum / count.clamp(min=1e-6)  # [B, H, n, S, d_k]; an empty slot has no weight anyway
        logits = (q[..., None, :] * slot_key).sum(-1) / math.sqrt(cfg.d_k) + self.slot_bias.T[:, None]  # [B, H, n, S]
        every = torch.ones(b, n, cfg.slots, dtype=torch.bool, device=q.device)
        w = self.normalise(logits, torch.ones(b, cfg.slots, device=q.device), every)  # SiLU(.) / N
        # multiplicity x mean value = the value sum: w n_s (V_s / n_s) = w V_s
        return local + (w[..., None] * value_sum).sum(-2)  # [B, H, n, d_v]

    def fold(self, summary, k, v, key_weight):
        key_sum, value_sum, count = self.routed(k, v, key_weight).sum(-3).split(
            [self.cfg.d_k, self.cfg.d_v, 1], dim=-1)  # [H, S, d]
        return {"slot_k": summary["slot_k"] + key_sum, "slot_v": summary["slot_v"] + value_sum,
                "slot_n": summary["slot_n"] + count[..., 0]}


class SlotHSTU(ExactWindowHSTU):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, [SlotBlock(cfg) for _ in range(cfg.layers)])
