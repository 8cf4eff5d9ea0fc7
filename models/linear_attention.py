"""HSTU with decayed linear attention: a fixed-size recurrent state per layer (`--recurrent linear`).

HSTU already drops the softmax: a query weighs each key pointwise, SiLU(q.k + rab) / N, and LayerNorm
then the U gate shape the sum. Dropping the SiLU too leaves a sum of (q.k) v over keys, which factors
through a matrix: sum_s (q_t . k_s) v_s = q_t (sum_s k_s v_s^T). Weighing older keys by a per-head decay
gamma_h^(t - s) keeps that factorisation, so one matrix per head carries the whole history:

    S_t = gamma_h S_{t-1} + k_t v_t^T          S [H, d_k, d_v], the state; its size never grows
    A_t = q_t S_t / sqrt(d_k)                   then HSTU's own LayerNorm(A) * U and output projection

This is the retention of RetNet (Sun et al. 2023, "Retentive Network", arXiv 2307.08621): the same
parallel form (Q K^T masked by D_nm = gamma^(n - m)) for training and recurrent form for serving, the same
multi-scale initial decays gamma_h = 1 - 2^(-5 - h), followed by a normalisation of the head outputs and a
multiplicative gate (RetNet: GroupNorm and swish(X W_G); here HSTU's LayerNorm and its SiLU U branch).
Differences, and why:
- phi (the feature map of linear attention) is HSTU's SiLU on the projections, not RetNet's identity
  with xPos rotation: the decay is the only position signal. HSTU's bucketed position and time biases
  cannot enter a fixed-size state (a bias per distance bucket does not factor through S), so the
  recurrent model has neither.
- each head's decay is learned (sigmoid of a parameter initialised at RetNet's multi-scale values,
  as gated linear attention learns its gates; Yang et al. 2023, arXiv 2312.06635, data-independent here
  so the state stays a plain decayed sum and chunked extension stays exact).
- no denominator: RetNet's parallel form divides rows of Q K^T by their sum for stability, a constant
  per query that the LayerNorm after it removes anyway; without it the recurrent form is exactly the
  parallel one.

State kind "recurrent": per layer one fixed tensor "s" [H, d_k, d_v], no tokens, so token policies are
refused (they need tokens) and per-tensor storages (fp16, int8, int4) apply. Target-aware ranking is
exact and cheap: a target at the next position sees gamma S + k v^T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from kvrec.models.hstu import HSTUBlock
from kvrec.models.recommender import Extension, LayerStats, ModelConfig, SequentialRecommender, Window
from kvrec.models.state import LayerState
from torch import Tensor, nn


def multi_scale_decays(heads: int) -> Tensor:
    """RetNet's per-head decays [H]: 1 - 2^(-5 - h), from 0.969 (a memory of ~32 events) upwards."""
    return 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float))


class LinearBlock(HSTUBlock):
    """One HSTU layer whose attention is decayed linear attention over a fixed-size state."""

    state_kind = "recurrent"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        del self.pos_bias, self.time_bias  # the decay is the position signal (see the module docstring)
        self.decay = nn.Parameter(torch.logit(multi_scale_decays(cfg.heads)))  # [H], gamma = sigmoid(decay)

    def log_gamma(self) -> Tensor:
        """log gamma_h [H], in (-inf, 0): decays are powers of gamma computed as exp(distance * log gamma)."""
        return F.logsigmoid(self.decay)

    def forward(self, x: Tensor, window: Window) -> Tensor:
        """The parallel form: A = (Q K^T / sqrt(d_k) * D) V with D[t, s] = gamma^(pos_t - pos_s) where the
        window's mask lets t see s (causal, valid; target tokens see their prefix and themselves)."""
        q, k, v, ctx = self.qkv(x, window.pos)  # [B, H, L, d]
        dist = (window.pos[:, :, None] - window.pos[:, None, :]).clamp(min=0)  # [B, L, L]
        decay = torch.exp(dist[:, None] * self.log_gamma()[None, :, None, None])  # [B, H, L, L]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.cfg.d_k) * decay * window.mask[:, None]
        return self.output(x, scores @ v, ctx)

    def empty_state(self, device: torch.device) -> LayerState:
        cfg = self.cfg
        return LayerState(fixed={"s": torch.zeros(cfg.heads, cfg.d_k, cfg.d_v, device=device)})

    def extend(self, x: Tensor, part: LayerState, ext: Extension) -> tuple[Tensor, LayerState, LayerStats]:
        """The chunk-wise form for n new events at offsets i = 0..n-1 after the cached state S:
        A_i = q_i (gamma^(i+1) S + sum_{j<=i} gamma^(i-j) k_j v_j^T) / sqrt(d_k) and
        S' = gamma^n S + sum_j gamma^(n-1-j) k_j v_j^T, both equal to the parallel form's sums."""
        cfg, n = self.cfg, x.shape[1]
        q, k, v, ctx = self.qkv(x, ext.q_pos[None])
        q, k, v = q[0], k[0], v[0]  # [H, n, d]
        lg = self.log_gamma()[:, None]  # [H, 1]
        i = torch.arange(n, device=x.device, dtype=x.dtype)  # [n]
        causal = i[:, None] >= i[None, :]  # [n, n]
        within = torch.exp((i[:, None] - i[None, :]).clamp(min=0)[None] * lg[..., None]) * causal  # [H, n, n]
        s = part.fixed["s"]  # [H, d_k, d_v]
        scores = (q @ k.transpose(-1, -2)) * within  # [H, n, n]
        attn = (torch.exp((i + 1) * lg)[..., None] * (q @ s) + scores @ v) / math.sqrt(cfg.d_k)  # [H, n, d_v]
        s = torch.exp(n * lg)[..., None] * s + (k * torch.exp((n - 1 - i) * lg)[..., None]).transpose(1, 2) @ v
        # no tokens, so no per-token attention to report; macs: q S and k v^T per event, q k and w v in the chunk
        macs = cfg.heads * n * (2 * cfg.d_k * cfg.d_v + n * (cfg.d_k + cfg.d_v))
        stats = LayerStats(x.new_zeros(cfg.heads, 0), x.new_zeros(cfg.heads, 0, 0), macs)
        return self.output(x, attn[None], ctx), LayerState(fixed={"s": s}), stats

    def rank(self, x: Tensor, part: LayerState, ext: Extension) -> Tensor:
        """Targets x [1, C, D] at the next position: each reads gamma S + k_c v_c^T, the state it would
        have after itself, so no target sees another."""
        q, k, v, ctx = self.qkv(x, ext.q_pos[None])  # [1, H, C, d]
        gamma = self.log_gamma().exp()[None, :, None, None]  # [1, H, 1, 1]
        own = (q * k).sum(-1, keepdim=True) * v  # [1, H, C, d_v]: (q_c . k_c) v_c
        attn = (gamma * (q @ part.fixed["s"][None]) + own) / math.sqrt(self.cfg.d_k)
        return self.output(x, attn, ctx)


class LinearHSTU(SequentialRecommender):
    """HSTU with every layer a `LinearBlock`: a state of layers x H x d_k x d_v numbers, whatever the
    history's length. No relative bias, so no geometry (the base's None)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, [LinearBlock(cfg) for _ in range(cfg.layers)])
