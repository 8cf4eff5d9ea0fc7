"""HSTU over an exact window of recent events plus a fixed-size summary of everything older.

The base of the compressive memory (models.compressive_memory) and the learned slots (models.slots):
both keep the last W events as K/V tokens, attended by HSTU's own pointwise attention with its relative
position and time bias, and fold each event that leaves the window into fixed tensors that do not grow
with the history. One convention for both, by absolute position:

    a query at position p sees exactly the events at p - W .. p (the last W before it, and itself),
    and the summary of every event at a position below p - W;

so after n events the state keeps the tokens at positions n - W .. n - 1 (W tokens, fewer before W
events) and a target token at position n, the next event's, sees exactly those, the summary and itself.

Training and serving run one code path: `forward` and `extend` both split the keys a query may see into
`local` ([B, n, T], distance 0..W) and `older` ([B, n, T], distance > W) and hand them to the subclass's
`attend`, which combines HSTU's local attention with its summary; serving adds the summary of events
evicted by earlier calls (`part.fixed`), training starts from an empty one. Keys are in position order
in both (the padded training window; the cached tokens followed by the new ones), so each query's
`older` keys are a prefix of the key axis.

Token policies apply to the window (they need tokens): one that drops a window token drops it for good,
before it would have reached the summary; one that merges folds the merged token into the summary with
its multiplicity when it leaves. Storages that encode only keys and values refuse these states (they
also hold the summary); per-tensor storages apply.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from kvrec.models.hstu import HSTU, HSTUBlock
from kvrec.models.recommender import Extension, LayerStats, ModelConfig, Window
from kvrec.models.state import AttentionStats, Events, LayerState, State
from torch import Tensor


class ExactWindowBlock(HSTUBlock):
    """An HSTU layer that keeps `window` events exact and summarises older ones in `summary_shapes`
    fixed tensors. Subclasses implement `attend` (how a query combines its local attention with the
    summary of its older keys) and `fold` (how evicted tokens enter the summary)."""

    def __init__(self, cfg: ModelConfig, window: int):
        super().__init__(cfg)
        self.window = window

    def summary_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the fixed summary tensors (zeros when nothing was folded in)."""
        raise NotImplementedError

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_weight: Tensor, local: Tensor, older: Tensor,
               summary: dict[str, Tensor]) -> Tensor:
        """q [B, H, n, d_k], k [B, H, T, d_k], v [B, H, T, d_v], key_weight [B, T]; local [B, H, n, d_v]:
        HSTU's attention of each query over its window; older [B, n, T] bool: the keys each query sees
        only through the summary, on top of `summary` (what earlier calls folded in) -> A [B, H, n, d_v]."""
        raise NotImplementedError

    def fold(self, summary: dict[str, Tensor], k: Tensor, v: Tensor, key_weight: Tensor) -> dict[str, Tensor]:
        """The summary with evicted tokens k [H, e, d_k], v [H, e, d_v] of multiplicity key_weight [e]
        folded in (a new dict; `summary` is left as it was)."""
        raise NotImplementedError

    def empty_summary(self, device: torch.device) -> dict[str, Tensor]:
        return {name: torch.zeros(shape, device=device) for name, shape in self.summary_shapes().items()}

    def split(self, dist: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """dist [B, n, T] query minus key position, mask [B, n, T] what the query may see -> (local, older)."""
        return mask & (dist <= self.window), mask & (dist > self.window)

    def forward(self, x: Tensor, window: Window) -> Tensor:
        q, k, v, ctx = self.qkv(x, window.pos)  # [B, H, L, d]
        local, older = self.split(window.pos[:, :, None] - window.pos[:, None, :], window.mask)
        key_weight = window.valid.to(x.dtype)  # [B, L]
        w = self.weights(q, k, window.geometry, key_weight, local)  # [B, H, L, L]
        attn = self.attend(q, k, v, key_weight, w @ v, older, self.empty_summary(x.device))
        return self.output(x, attn, ctx)

    def empty_state(self, device: torch.device) -> LayerState:
        part = super().empty_state(device)
        return LayerState(part.tokens, fixed=self.empty_summary(device))

    def extend(self, x: Tensor, part: LayerState, ext: Extension) -> tuple[Tensor, LayerState, LayerStats]:
        cfg, n = self.cfg, x.shape[1]
        q, k, v, ctx = self.qkv(x, ext.q_pos[None])  # [1, H, n, d]
        keys = torch.cat([part.tokens["k"], k[0]], dim=1)  # [H, T, d_k], T = T_cached + n
        values = torch.cat([part.tokens["v"], v[0]], dim=1)  # [H, T, d_v]
        k_pos, k_ts = torch.cat([part.pos, ext.q_pos]), torch.cat([part.ts, ext.ts])  # [T]
        k_weight = torch.cat([part.weight, keys.new_ones(n)])  # [T]
        dist = ext.q_pos[:, None] - k_pos[None, :]  # [n, T]
        local, older = self.split(dist[None], dist[None] >= 0)  # [1, n, T]
        w = self.weights(q, keys[None], ext.geometry(k_pos, k_ts), k_weight[None], local)  # [1, H, n, T]
        attn = self.attend(q, keys[None], values[None], k_weight[None], w @ values[None], older, part.fixed)
        keep = k_pos >= ext.q_pos[-1] + 1 - self.window  # [T]: a suffix, the tokens a later query sees exactly
        summary = self.fold(part.fixed, keys[:, ~keep], values[:, ~keep], k_weight[~keep])
        kept = LayerState({"k": keys[:, keep], "v": values[:, keep]}, k_pos[keep], k_ts[keep], k_weight[keep],
                          summary)
        w = w[0][..., keep]  # [H, n, T_kept], aligned with the extended state's tokens
        stats = LayerStats(w.abs().sum(1), w[:, -cfg.obs_window:].abs(),
                           cfg.heads * n * keys.shape[1] * (cfg.d_k + cfg.d_v))
        return self.output(x, attn, ctx), kept, stats

    def rank(self, x: Tensor, part: LayerState, ext: Extension) -> Tensor:
        """Targets x [1, C, D] at the next position: each sees the kept window (all within W of it), the
        summary and itself, never another target (as `KVAttention.rank`, plus the summary)."""
        q, k, v, ctx = self.qkv(x, ext.q_pos[None])  # [1, H, C, d]
        cached = self.logits(q, part.tokens["k"][None], ext.geometry(part.pos, part.ts))  # [1, H, C, T]
        zero = torch.zeros(1, 1, 1, dtype=torch.long, device=x.device)  # distance and gap to itself
        own = self.logits(q.transpose(0, 2), k.transpose(0, 2), ext.geometry_of(zero, zero))  # [C, H, 1, 1]
        logits = torch.cat([cached, own.transpose(0, 2)], dim=-1)  # [1, H, C, T + 1]
        key_weight = torch.cat([part.weight, part.weight.new_ones(1)])[None]  # [1, T + 1]
        sees_all = torch.ones(1, 1, 1, dtype=torch.bool, device=x.device)
        w = self.normalise(logits, key_weight, sees_all)
        local = w[..., :-1] @ part.tokens["v"][None] + w[..., -1:] * v  # [1, H, C, d_v]
        no_older = torch.zeros(1, q.shape[2], part.num_tokens, dtype=torch.bool, device=x.device)
        attn = self.attend(q, part.tokens["k"][None], part.tokens["v"][None], part.weight[None], local,
                           no_older, part.fixed)
        return self.output(x, attn, ctx)


class ExactWindowHSTU(HSTU):
    """HSTU (its relative-bias geometry) whose blocks keep an exact window: `extend` also keeps the
    per-token extras that policies carry aligned with the window as it slides."""

    def __init__(self, cfg: ModelConfig, blocks: list[ExactWindowBlock]):
        super(HSTU, self).__init__(cfg, blocks)  # HSTU's own __init__ would build plain HSTU blocks

    def extend(self, state: State, events: Events) -> tuple[State, Tensor | None, AttentionStats]:
        """The base pads each extra with zeros for new tokens, assuming tokens are only ever appended;
        here each block also evicts the oldest ones. The kept tokens are a suffix of the cached tokens
        followed by the new ones, so each extra keeps the same suffix of itself padded with zeros."""
        n = len(events)
        if n == 0 or not state.extras:
            return super().extend(state, events)
        new, hidden, stats = super().extend(replace(state, extras={}), events)
        new.extras = {name: [F.pad(t, (0, n))[..., t.shape[-1] + n - part.num_tokens:]
                             for t, part in zip(per_layer, new.layers)]
                      for name, per_layer in state.extras.items()}
        return new, hidden, stats
