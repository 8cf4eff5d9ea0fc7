"""SASRec: Self-Attentive Sequential Recommendation (Kang and McAuley, ICDM 2018), with rotary positions.

Pre-norm transformer blocks with causal softmax attention and a position-wise feed-forward network, as
in the paper, except that positions enter as rotary phases on queries and keys (RoFormer, Su et al. 2021)
rather than as learned absolute embeddings: q.k then depends only on the distance between two events, so
a cached key stays valid and a state can grow past the training window.
"""

from __future__ import annotations

import math

import torch
from kvrec.models.recommender import (
    KVAttention,
    LatentKV,
    ModelConfig,
    SequentialRecommender,
    grouped_matmul,
    split_heads,
)
from torch import Tensor, nn


def rotate(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding. x [B, H, n, d] (d even), pos [B, n] absolute event index -> [B, H, n, d]."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)  # [d/2]
    angles = (pos.double()[..., None] * inv_freq)[:, None]  # [B, 1, n, d/2], float64 so far-out positions stay exact
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class SASRecBlock(KVAttention):
    """One SASRec layer. Its state is the rotated keys and the values of every event ("kv"; H_kv =
    cfg.kv_head_count heads under grouped-query attention) or, with cfg.latent_dim, DeepSeek-V2's
    multi-head latent attention ("latent"): per event the latent c [1, T, D_c] (`LatentKV`) and one
    rotary key k^R = RoPE(W_KR x) [1, T, d_r] shared by the heads. Each head's query is then
    [q^C; RoPE(q^R)] and its key [W_UK c; k^R], so q.k = q^C.k^C + q^R.k^R over sqrt(d_k + d_r): the
    content parts carry no rotary phase (it would not commute with the up-projection) and positions
    enter through the rotary parts alone. Queries are projected directly, not through the paper's
    compressed query latent: that saves training activations, not state, which is what kvrec measures."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, kv = cfg.heads, cfg.kv_head_count
        self.norm_attn = nn.LayerNorm(cfg.dim)
        self.q = nn.Linear(cfg.dim, h * cfg.d_k)
        if cfg.latent_dim:
            self.latent = LatentKV(cfg)
            self.q_rope = nn.Linear(cfg.dim, h * cfg.rope_dim)  # W_QR: each head's rotary query
            self.k_rope = nn.Linear(cfg.dim, cfg.rope_dim)  # W_KR: the rotary key shared by the heads
        else:
            self.latent = None
            self.k = nn.Linear(cfg.dim, kv * cfg.d_k)
            self.v = nn.Linear(cfg.dim, kv * cfg.d_v)
        self.out = nn.Linear(h * cfg.d_v, cfg.dim)
        self.norm_ffn = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def project(self, x: Tensor, pos: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        cfg = self.cfg
        h = self.norm_attn(x)
        q = split_heads(self.q(h), cfg.heads)  # [B, H, n, d_k]
        if self.latent is None:
            return rotate(q, pos), {"k": rotate(split_heads(self.k(h), cfg.kv_head_count), pos),
                                    "v": split_heads(self.v(h), cfg.kv_head_count)}, x
        q_rope = rotate(split_heads(self.q_rope(h), cfg.heads), pos)  # [B, H, n, d_r]
        k_rope = rotate(self.k_rope(h)[:, None], pos)  # [B, 1, n, d_r]
        return torch.cat([q, q_rope], dim=-1), {"c": self.latent.compress(h), "kr": k_rope}, x

    def logits(self, q, k, geometry):
        return grouped_matmul(q / math.sqrt(q.shape[-1]), k.transpose(-1, -2))  # [B, H, n, T]

    def normalise(self, logits, key_weight, mask):
        logits = logits + key_weight.clamp(min=1e-30).log()[:, None, None, :]  # a merged key counts w times
        logits = logits.masked_fill(~mask[:, None], -math.inf)
        # a padded query row has no allowed key: give it zeros instead of NaN
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)

    def output(self, x, attn, ctx):
        b, h, n, d = attn.shape
        x = x + self.drop(self.out(attn.transpose(1, 2).reshape(b, n, h * d)))
        return x + self.drop(self.ffn(self.norm_ffn(x)))


class SASRec(SequentialRecommender):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, [SASRecBlock(cfg) for _ in range(cfg.layers)])
