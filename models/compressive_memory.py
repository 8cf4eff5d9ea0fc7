"""HSTU with a compressive memory (`--memory W`): Infini-attention (Munkhdalai et al. 2024, "Leave No
Context Behind", arXiv 2404.07143) on HSTU's pointwise attention.

Per layer and head, beside the exact window of the last W events (models.exact_window), a linear-attention
memory of every older event, with sigma = ELU + 1 as in the paper:

    M = sum_s sigma(k_s) v_s^T    [H, d_k, d_v]        z = sum_s sigma(k_s)    [H, d_k]
    A_mem = sigma(q) M / (sigma(q) z)                   retrieval (the paper's eq. 3)
    A = sigmoid(beta_h) A_mem + (1 - sigmoid(beta_h)) A_local     long-term context injection (eq. 6)

then HSTU's LayerNorm(A) * U and output projection in place of the paper's concatenation and W_O. The
memory update is the paper's linear one (eq. 4); its delta rule, which subtracts what the memory already
retrieves for a key, is not used: it makes M depend on the order in which events were folded one chunk at
a time, and the linear update keeps training's parallel form and serving's chunked form equal by
construction. beta_h is one learned scalar per head, as in the paper, and everything is trained end to end.

Differences from the paper, and why:
- local attention is HSTU's pointwise SiLU(q.k / sqrt(d_k) + rab) / N with its relative position and
  time bias, not a softmax, and the memory reads the same q and k (HSTU's SiLU projections) through sigma;
- events leave the exact window one at a time (a query at p sees p - W .. p exactly and the memory of
  everything before), instead of fixed segments of N whose first query sees only itself exactly: every
  event gets the same exact context, and the state holds exactly the last W events, not up to N - 1;
- an empty memory retrieves zero (the paper leaves sigma(q) z = 0 undefined).

State kind "memory": per layer the window's tokens ("k", "v", at most W) and fixed "mem" [H, d_k, d_v]
and "norm" [H, d_k].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kvrec.models.exact_window import ExactWindowBlock, ExactWindowHSTU
from kvrec.models.recommender import ModelConfig
from torch import Tensor, nn


def sigma(x: Tensor) -> Tensor:
    """The memory's positive feature map, ELU + 1 (Katharopoulos et al. 2020, as Infini-attention)."""
    return F.elu(x) + 1


class MemoryBlock(ExactWindowBlock):
    """An HSTU layer with an exact window of `cfg.memory` events and an Infini-attention memory."""

    state_kind = "memory"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.memory)
        self.beta = nn.Parameter(torch.zeros(cfg.heads))  # [H]: sigmoid(0) = the two halves equal at first

    def summary_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.cfg
        return {"mem": (cfg.heads, cfg.d_k, cfg.d_v), "norm": (cfg.heads, cfg.d_k)}

    def attend(self, q, k, v, key_weight, local, older, summary):
        sq, sk = sigma(q), sigma(k)  # [B, H, n, d_k], [B, H, T, d_k]
        # the keys each query reads from memory but that no earlier call folded in: (sq sk^T) masked to
        # them is the same sum as sq (sum_s sk_s v_s^T), computed without a matrix per query
        scores = (sq @ sk.transpose(-1, -2)) * (older * key_weight[:, None, :])[:, None]  # [B, H, n, T]
        num = sq @ summary["mem"] + scores @ v  # [B, H, n, d_v]
        den = (sq @ summary["norm"][..., None])[..., 0] + scores.sum(-1)  # [B, H, n]
        memory = num / den.clamp(min=1e-6)[..., None]  # zero while the memory is empty
        gate = torch.sigmoid(self.beta)[:, None, None]  # [H, 1, 1]
        return gate * memory + (1 - gate) * local

    def fold(self, summary, k, v, key_weight):
        sk = sigma(k) * key_weight[:, None]  # [H, e, d_k]: a merged token enters as often as it counts
        return {"mem": summary["mem"] + sk.transpose(1, 2) @ v, "norm": summary["norm"] + sk.sum(1)}


class CompressiveMemoryHSTU(ExactWindowHSTU):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, [MemoryBlock(cfg) for _ in range(cfg.layers)])
