"""SASRec: Self-Attentive Sequential Recommendation (Kang and McAuley, ICDM 2018), with rotary positions.

Pre-norm transformer blocks with causal softmax attention and a position-wise feed-forward network, as
in the paper, except that positions enter as rotary phases on queries and keys (RoFormer, Su et al. 2021)
rather than as learned absolute embeddings: q.k then depends only on the distance between two events, so
a cached key stays valid and a state can grow past the training window.
"""

from __future__ import annotations

import math

import torch
from kvrec.models.recommender import KVAttention, ModelConfig, SequentialRecommender
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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.heads
        self.norm_attn = nn.LayerNorm(cfg.dim)
        self.q = nn.Linear(cfg.dim, h * cfg.d_k)
        self.k = nn.Linear(cfg.dim, h * cfg.d_k)
        self.v = nn.Linear(cfg.dim, h * cfg.d_v)
        self.out = nn.Linear(h * cfg.d_v, cfg.dim)
        self.norm_ffn = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def qkv(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        h = self.norm_attn(x)
        heads = lambda t: t.view(b, n, self.cfg.heads, -1).transpose(1, 2)  # [B, n, H*d] -> [B, H, n, d]
        q = rotate(heads(self.q(h)), pos)
        k = rotate(heads(self.k(h)), pos)
        return q, k, heads(self.v(h)), x

    def logits(self, q, k, geometry):
        return (q / math.sqrt(self.cfg.d_k)) @ k.transpose(-1, -2)  # [B, H, n, T]

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
