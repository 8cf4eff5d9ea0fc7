"""What every backbone shares: embeddings, the block contract, forward/prefill/extend, scoring, top-k.

A model is a stack of blocks, and each block owns its part of the user's state (models.state): what it
keeps and how new events extend it. `KVAttention` is the block that caches keys and values, or, under
multi-head latent attention, the latents they are made from (HSTU and SASRec): it turns its input into
queries, keys and values, weighs keys for each query, and folds the weighted values back into the
residual stream; the same methods serve training (`forward`, the whole window at once with a causal
mask) and serving (`extend`, only the new events, attending to the cached keys and values). Because
nothing in a block depends on absolute position except through relative biases or rotary phases,
`extend(prefill(h[:t]), h[t:])` equals `prefill(h)`: the invariant the whole service rests on
(tests/test_exactness.py), for every block kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from kvrec.models.state import AttentionStats, Events, LayerState, State
from torch import Tensor, nn


@dataclass
class ModelConfig:
    """Hyperparameters of either model. The defaults are the design card's small model:
    2 layers x 2 heads x (32 + 32) x 4 bytes = 1 KiB of fp32 state per event."""

    kind: str = "hstu"  # a name in models.registry.MODELS: "hstu", "sasrec" or "astro"
    num_items: int = 1  # catalogue size; id num_items is the out-of-vocabulary item
    num_actions: int = 16  # action ids 0..num_actions-1; 0 means "no action"
    dim: int = 64
    layers: int = 2
    heads: int = 2
    d_k: int = 32
    d_v: int = 32
    max_len: int = 200  # training window; states may grow past it (positions are relative)
    dropout: float = 0.2
    # HSTU's relative bias: buckets exact up to 16 events, log-spaced up to max_len; a farther distance
    # shares the last bucket, which training reaches, so a state far longer than the window stays in
    # distribution. Time gaps are log2 buckets of seconds; `train` sets `time_buckets` so that the last
    # one holds every gap longer than the training windows span.
    pos_buckets: int = 32
    time_buckets: int = 64
    obs_window: int = 16  # new queries whose attention rows `extend` reports (SnapKV-style policies)
    ranking_head: bool = False  # a target-aware ranking head (models.recommender.Targets, `rank`)
    # The trained levels of memory reduction (MALLOC's head, architecture and sequence levels); at most
    # one of latent / recurrent / memory / slots, see `check`.
    kv_heads: int = 0  # grouped-query attention: K/V heads shared by heads / kv_heads query heads (0: heads)
    latent_dim: int = 0  # multi-head latent attention: one latent per token, K and V up-projected (0: off)
    rope_dim: int = 16  # MLA on a rotary model: the decoupled rotary key's width (DeepSeek-V2)
    recurrent: str = ""  # "linear": decayed linear attention, a fixed-size state per layer (HSTU)
    memory: int = 0  # compressive memory: the last `memory` events exact, older ones in a linear memory
    slots: int = 0  # trained sequence compression: older events folded into this many learned slots
    slot_window: int = 64  # events kept exact beside the slots

    def __post_init__(self) -> None:
        self.check()

    @property
    def kv_head_count(self) -> int:
        """K/V heads per layer: `kv_heads` under grouped-query attention, else one per query head."""
        return self.kv_heads or self.heads

    def check(self) -> None:
        """Refuse an impossible combination with a message naming the constraint, before any training or
        serving starts (ModelConfig is built first by `kvrec train` and by every checkpoint load)."""
        if self.kv_heads and (self.kv_heads > self.heads or self.heads % self.kv_heads):
            raise ValueError(f"--kv-heads {self.kv_heads} must divide --heads {self.heads} "
                             "(each K/V head serves an equal group of query heads)")
        kv_width = self.heads * (self.d_k + self.d_v)
        if self.latent_dim and self.latent_dim >= kv_width:
            raise ValueError(f"--latent-dim {self.latent_dim} must be smaller than the K/V it replaces "
                             f"(heads x (d_k + d_v) = {kv_width} per token), or the latent saves nothing")
        if self.latent_dim and self.kind == "sasrec" and (self.rope_dim % 2 or self.rope_dim < 2):
            raise ValueError(f"--rope-dim {self.rope_dim} must be even and at least 2 (rotary pairs)")
        if self.recurrent not in ("", "linear"):
            raise ValueError(f"--recurrent {self.recurrent!r}: the one recurrent backbone is 'linear'")
        trained = {"--kv-heads": self.kv_heads, "--latent-dim": self.latent_dim,
                   "--recurrent": self.recurrent, "--memory": self.memory, "--slots": self.slots}
        chosen = [flag for flag, value in trained.items() if value]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} change the same attention: choose one of them "
                             "(post-hoc policies stack on any of them)")
        if chosen and self.kind == "astro":
            raise ValueError(f"{chosen[0]} applies to hstu and sasrec; astro keeps its own partitioned state")
        if self.kind == "sasrec" and (self.recurrent or self.memory or self.slots):
            raise ValueError(f"{chosen[0]} builds on HSTU's pointwise attention (no softmax to normalise a "
                             "linear memory against): use --model hstu")
        if self.slots and self.slot_window < 1:
            raise ValueError("--slot-window must keep at least 1 event exact")

    def variant(self) -> str:
        """A short name of the trained level this config uses, for reports ("base" when none)."""
        if self.kv_heads and self.kv_heads < self.heads:
            return "mqa" if self.kv_heads == 1 else f"gqa{self.kv_heads}"
        for name, value in (("mla", self.latent_dim), ("linear", self.recurrent), ("memory", self.memory),
                            ("slots", self.slots)):
            if value:
                return f"{name}{value}" if isinstance(value, int) else name
        return "base"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Window:
    """What a training pass tells every block about its padded windows, computed once for all layers.

    pos [B, L] int64: index of each event among the valid ones; valid [B, L] bool; mask [B, L, L] bool
    (causal, both ends valid); geometry: the model's `geometry` of the query-key layout.
    """

    pos: Tensor
    valid: Tensor
    mask: Tensor
    geometry: Any


@dataclass
class Targets:
    """Candidates that enter a training pass as target tokens (M-FALCON, Zhai et al. 2024, section 3.4):
    each is its item embedding with no action, sees the first `seen` valid events of its row's window
    and itself, never another candidate, and takes position `seen` (the next event's) and time `ts`.

    items, seen, ts [B, C] int64. Many candidates of one row may share a cut point (one positive and its
    sampled negatives) and different cut points may share a row, so one pass trains them all.
    """

    items: Tensor
    seen: Tensor
    ts: Tensor


class Extension:
    """What an `extend` call tells every block: the new events' absolute positions and times, and the
    geometry of their layout against a layer's kept tokens (layers that kept the same tokens share it)."""

    def __init__(self, geometry_of, q_pos: Tensor, ts: Tensor):
        self.geometry_of = geometry_of  # the model's `geometry`
        self.q_pos, self.ts = q_pos, ts  # [n] int64 each
        self._last: tuple[Tensor, Tensor, Any] | None = None

    def geometry(self, k_pos: Tensor, k_ts: Tensor):
        """Geometry of the new queries against keys at k_pos, k_ts ([T] int64), as [1, n, T] layouts."""
        last = self._last
        if last is None or not (torch.equal(last[0], k_pos) and torch.equal(last[1], k_ts)):
            rel_pos = (self.q_pos[:, None] - k_pos[None, :])[None]  # [1, n, T]
            rel_ts = (self.ts[:, None] - k_ts[None, :])[None]
            self._last = last = (k_pos, k_ts, self.geometry_of(rel_pos, rel_ts))
        return last[2]


@dataclass
class LayerStats:
    """One block's attention statistics for one `extend` call (see AttentionStats)."""

    received: Tensor  # [H, T] attention each kept key received from the new queries
    window: Tensor  # [H, w, T] the weights of the last w new queries
    macs: int
    query_energy: Tensor | None = None  # [H, w, d_q] their squared query channels (None: not reported)


class Block(nn.Module):
    """One layer. It owns its part of the user's state: what it keeps (`empty_state`) and how new events
    extend it (`extend`), so a block that keeps latents or a fixed-size matrix needs nothing from the
    rest of the model. `forward` (training) and `extend` (serving) must agree: extending a state with
    events gives the hidden vectors that `forward` gives for them after the same history.
    Shapes: B users, L or n events, D model width."""

    state_kind: ClassVar[str]  # the State.kind of a model made of these blocks

    def forward(self, x: Tensor, window: Window) -> Tensor:
        """x [B, L, D] -> [B, L, D], causal over the window."""
        raise NotImplementedError

    def empty_state(self, device: torch.device) -> LayerState:
        raise NotImplementedError

    def extend(self, x: Tensor, part: LayerState, ext: Extension) -> tuple[Tensor, LayerState, LayerStats]:
        """x [1, n, D] of the new events -> their output [1, n, D], this layer's extended state (a new
        LayerState; `part` is left as it was) and the call's attention statistics."""
        raise NotImplementedError

    def rank(self, x: Tensor, part: LayerState, ext: Extension) -> Tensor:
        """Target tokens x [1, C, D], all at position ext.q_pos and time ext.ts ([1] each) -> their output
        [1, C, D]: each sees this layer's state and itself, never another target. `forward` with
        `Targets` must agree."""
        raise NotImplementedError(f"{type(self).__name__} has no target-aware ranking")


class KVAttention(Block):
    """A block that caches, for every event, what its keys and values are made from, and attends over it.

    Two state layouts, one code path:
    - "kv": the keys and values themselves, k [H_kv, T, d_k] and v [H_kv, T, d_v]. H_kv = cfg.kv_head_count:
      every query head (the default) or, under grouped-query attention (Ainslie et al., EMNLP 2023),
      fewer K/V heads, each read by a group of H / H_kv consecutive query heads (H_kv = 1: multi-query
      attention, Shazeer 2019), so the state is H / H_kv times smaller;
    - "latent" (multi-head latent attention, `LatentKV`): one latent per token, c [1, T, D_c], from which
      every head's key and value are up-projected when they are needed, plus a model's decoupled rotary
      key kr [1, T, d_r] where its positions are rotary.

    Subclasses say how to project (`project`: the queries and what the state caches for new tokens), how
    to weigh keys (`logits`, `normalise`) and how to fold the attention output back (`output`); training
    (`forward`, via `qkv`) and serving (`extend`, `rank`) share all of them. `keys_values` turns what the
    state caches into keys and values, `grouped_matmul` pairs each query head with its K/V head.
    Attention statistics are reported on the state's own head axis (the first axis of its token tensors:
    H_kv, or 1 for a latent), each the sum over the query heads that read it, so that a policy scoring
    tokens by attention lines them up with what it evicts.
    """

    cfg: ModelConfig
    latent: LatentKV | None  # set by subclasses: MLA's key/value path, or None for a "kv" state

    @property
    def state_kind(self) -> str:
        return "kv" if self.latent is None else "latent"

    def project(self, x: Tensor, pos: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """x [B, n, D], pos [B, n] -> queries q [B, H, n, d_q], what the state caches for these tokens
        (token tensors by name, [B, G, n, d] each) and ctx (for `output`)."""
        raise NotImplementedError

    def keys_values(self, cached: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """What the state caches (token tensors [B, G, T, d] by name) -> keys [B, H_kv, T, d_q] and values
        [B, H_kv, T, d_v]: the cache itself for a "kv" state; for a latent one, every head's key and value
        up-projected from the latents, the shared rotary key appended to each head's key."""
        if self.latent is None:
            return cached["k"], cached["v"]
        k, v = self.latent.expand(cached["c"])  # [B, H, T, d_k], [B, H, T, d_v]
        if "kr" in cached:
            k = torch.cat([k, cached["kr"].expand(-1, k.shape[1], -1, -1)], dim=-1)  # [B, H, T, d_k + d_r]
        return k, v

    def expansion_macs(self, tokens: int) -> int:
        """Multiply-accumulates of `keys_values` over `tokens` cached tokens (the up-projection, if any)."""
        return 0 if self.latent is None else self.latent.macs(tokens)

    def qkv(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, n, D], pos [B, n] -> q [B, H, n, d_q], k [B, H_kv, n, d_q], v [B, H_kv, n, d_v], ctx."""
        q, cached, ctx = self.project(x, pos)
        return (q, *self.keys_values(cached), ctx)

    def logits(self, q: Tensor, k: Tensor, geometry) -> Tensor:
        """Attention logits [B, H, n, T]. q [B, H, n, d_q], k [B, H_kv, T, d_q] (H_kv divides H, see
        `grouped_matmul`); geometry: what the model's `geometry` derived from relative positions and times
        ([B, n, T] layouts)."""
        raise NotImplementedError

    def normalise(self, logits: Tensor, key_weight: Tensor, mask: Tensor) -> Tensor:
        """Logits [B, H, n, T] -> the weights applied to the values; key_weight [B, T] (a merged key
        stands for that many events), mask [B, n, T] (False: the query may not see the key)."""
        raise NotImplementedError

    def weights(self, q: Tensor, k: Tensor, geometry, key_weight: Tensor, mask: Tensor) -> Tensor:
        """Attention weights [B, H, n, T] applied to the values (see `logits` and `normalise`)."""
        return self.normalise(self.logits(q, k, geometry), key_weight, mask)

    def output(self, x: Tensor, attn: Tensor, ctx: Tensor) -> Tensor:
        """x [B, n, D], attn [B, H, n, d_v] (weights @ values) -> new residual stream [B, n, D]."""
        raise NotImplementedError

    def forward(self, x: Tensor, window: Window) -> Tensor:
        q, k, v, ctx = self.qkv(x, window.pos)
        w = self.weights(q, k, window.geometry, window.valid.to(x.dtype), window.mask)
        return self.output(x, grouped_matmul(w, v), ctx)

    def empty_state(self, device: torch.device) -> LayerState:
        """No tokens, in the layout `project` caches (so the layout is declared in one place)."""
        x = torch.zeros(1, 0, self.cfg.dim, device=device)
        _, cached, _ = self.project(x, torch.zeros(1, 0, dtype=torch.long, device=device))
        return LayerState({name: t[0] for name, t in cached.items()})

    def extend(self, x: Tensor, part: LayerState, ext: Extension) -> tuple[Tensor, LayerState, LayerStats]:
        cfg, n = self.cfg, x.shape[1]
        q, new, ctx = self.project(x, ext.q_pos[None])  # q [1, H, n, d_q]; new: name -> [1, G, n, d]
        tokens = {name: torch.cat([part.tokens[name], t[0]], dim=1) for name, t in new.items()}  # [G, T, d]
        k, v = self.keys_values({name: t[None] for name, t in tokens.items()})  # [1, H_kv, T, d_q], [1, H_kv, T, d_v]
        k_pos = torch.cat([part.pos, ext.q_pos])  # [T], T = T_cached + n
        k_ts = torch.cat([part.ts, ext.ts])
        k_weight = torch.cat([part.weight, torch.ones(n, device=x.device, dtype=k.dtype)])
        mask = (ext.q_pos[:, None] >= k_pos[None, :])[None]  # [1, n, T]
        w = self.weights(q, k, ext.geometry(k_pos, k_ts), k_weight[None], mask)  # [1, H, n, T]
        x = self.output(x, grouped_matmul(w, v), ctx)
        t = k_pos.shape[0]
        heads = next(iter(tokens.values())).shape[0]  # G, the state's head axis
        by_state_head = per_state_head(w[0], heads)  # [G, n, T]
        query_energy = per_state_head(q[0, :, -cfg.obs_window:].square(), heads)  # [G, w, d_q]
        macs = cfg.heads * n * t * (q.shape[-1] + v.shape[-1]) + self.expansion_macs(t)
        stats = LayerStats(by_state_head.sum(1), by_state_head[:, -cfg.obs_window:], macs, query_energy)
        return x, LayerState(tokens, k_pos, k_ts, k_weight), stats

    def rank(self, x: Tensor, part: LayerState, ext: Extension) -> Tensor:
        """Target tokens x [1, C, D] against this layer's cached tokens -> their output [1, C, D].

        Each target attends to every cached token and to itself, never to another target, so C
        candidates cost C x T key reads and are independent of how they are batched. All targets share
        one position and time (ext.q_pos, ext.ts: [1]), so their geometry against the cache is computed
        once and broadcast. The cached logits [1, H, C, T] and each target's logit on its own key
        [1, H, C, 1] (the targets moved to the batch axis, one key each) are normalised together (a
        softmax needs both), then the values are folded in."""
        q, new, ctx = self.project(x, ext.q_pos[None])  # q [1, H, C, d_q]; new: name -> [1, G, C, d]
        k, v = self.keys_values({name: t[None] for name, t in part.tokens.items()})  # [1, H_kv, T, d]
        own_k, own_v = (t.transpose(0, 2) for t in self.keys_values(new))  # [C, H_kv, 1, d]
        cached = self.logits(q, k, ext.geometry(part.pos, part.ts))  # [1, H, C, T]
        zero = torch.zeros(1, 1, 1, dtype=torch.long, device=x.device)  # distance and gap to itself
        own = self.logits(q.transpose(0, 2), own_k, ext.geometry_of(zero, zero))  # [C, H, 1, 1]
        logits = torch.cat([cached, own.transpose(0, 2)], dim=-1)  # [1, H, C, T + 1]
        key_weight = torch.cat([part.weight, part.weight.new_ones(1)])[None]  # [1, T + 1]
        sees_all = torch.ones(1, 1, 1, dtype=torch.bool, device=x.device)  # [1, 1, 1], broadcast
        w = self.normalise(logits, key_weight, sees_all)
        own_attn = grouped_matmul(w[..., -1:].transpose(0, 2), own_v).transpose(0, 2)  # [1, H, C, d_v]
        return self.output(x, grouped_matmul(w[..., :-1], v) + own_attn, ctx)


class LatentKV(nn.Module):
    """Multi-head latent attention's key/value path (DeepSeek-V2, arXiv 2405.04434, section 2.1.2): a
    token caches one latent c = W_DKV x of width D_c = cfg.latent_dim instead of H (d_k + d_v) numbers,
    and every head's key and value are up-projected from it, k^C = W_UK c and v = W_UV c (through `act`,
    the block's activation: HSTU's SiLU, so K and V stay HSTU's SiLU(W x) with W factored in two).

    Serving up-projects the cached latents at every `extend` and `rank` (counted in `macs`), rather than
    using the paper's absorbed form (W_UK folded into the queries, W_UV into the output projection):
    HSTU's SiLU sits between the up-projection and the attention, so there nothing can be absorbed, and
    one form for both models keeps training and serving on the same code. No biases, as in the paper.
    A rotary model keeps positions out of c (a rotary phase would not commute with W_UK) and adds the
    paper's decoupled rotary key itself (SASRec's "kr")."""

    def __init__(self, cfg: ModelConfig, act: Callable[[Tensor], Tensor] = lambda t: t):
        super().__init__()
        self.cfg, self.act = cfg, act
        self.down = nn.Linear(cfg.dim, cfg.latent_dim, bias=False)  # W_DKV
        self.up = nn.Linear(cfg.latent_dim, cfg.heads * (cfg.d_k + cfg.d_v), bias=False)  # [W_UK; W_UV]

    def compress(self, h: Tensor) -> Tensor:
        """Normalised input h [B, n, D] -> the latents the state caches, c [B, 1, n, D_c]."""
        return self.down(h)[:, None]

    def expand(self, c: Tensor) -> tuple[Tensor, Tensor]:
        """Latents c [B, 1, T, D_c] -> keys [B, H, T, d_k] and values [B, H, T, d_v]."""
        cfg = self.cfg
        k, v = self.act(self.up(c[:, 0])).split([cfg.heads * cfg.d_k, cfg.heads * cfg.d_v], dim=-1)
        return split_heads(k, cfg.heads), split_heads(v, cfg.heads)

    def macs(self, tokens: int) -> int:
        """Multiply-accumulates of `expand` over `tokens` latents."""
        cfg = self.cfg
        return tokens * cfg.latent_dim * cfg.heads * (cfg.d_k + cfg.d_v)


def split_heads(t: Tensor, heads: int) -> Tensor:
    """[B, n, heads * d] -> [B, heads, n, d] (n may be 0, hence no -1 in the view)."""
    return t.view(*t.shape[:-1], heads, t.shape[-1] // heads).transpose(-3, -2)


def grouped_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a [B, H, n, m] @ b [B or 1, H_kv, m, p] -> [B, H, n, p], query head h paired with K/V head
    h // (H / H_kv). Each group's query heads are stacked on the row axis, so no K/V head is copied:
    scores are grouped_matmul(q, k^T), attention outputs grouped_matmul(weights, v)."""
    batch, heads, n, m = a.shape
    kv_heads = b.shape[1]
    return (a.reshape(batch, kv_heads, heads // kv_heads * n, m) @ b).view(batch, heads, n, -1)


def per_state_head(w: Tensor, heads: int) -> Tensor:
    """A statistic of the query heads (attention weights, squared queries), w [H, ...] -> its magnitudes
    summed over the query heads that read each of the state's `heads` heads [heads, ...] (H / heads
    consecutive query heads each)."""
    return w.abs().reshape(heads, -1, *w.shape[1:]).sum(1)


class SequentialRecommender(nn.Module):
    """Base of every backbone: embeddings, forward/prefill/extend over its blocks, score and top-k."""

    def __init__(self, cfg: ModelConfig, blocks: list[Block]):
        super().__init__()
        kinds = {block.state_kind for block in blocks}
        if len(kinds) != 1:
            raise ValueError(f"a model's blocks must keep one kind of state, got {sorted(kinds)}")
        self.cfg = cfg
        self.state_kind = kinds.pop()
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.dim)  # last row: out-of-vocabulary item
        self.action_emb = nn.Embedding(cfg.num_actions, cfg.dim)
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        # ranking head: a target token's final hidden -> (relevance logit, engagement logit)
        self.rank_head = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, 2)) \
            if cfg.ranking_head else None
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.action_emb.weight, std=0.02)

    # ----------------------------------------------------------------------------- inputs

    def embed(self, items: Tensor, actions: Tensor) -> Tensor:
        """items, actions [..., n] -> [..., n, D]; unknown items map to the OOV row, actions are clamped."""
        items = items.clamp(0, self.cfg.num_items)
        actions = actions.clamp(0, self.cfg.num_actions - 1)
        return self.drop(self.item_emb(items) + self.action_emb(actions))

    # ----------------------------------------------------------------------------- training

    def forward(self, items: Tensor, ts: Tensor, actions: Tensor, valid: Tensor,
                targets: Targets | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Full causal pass over padded windows.

        items, ts, actions [B, L] int64, valid [B, L] bool (padding anywhere) -> hidden [B, L, D].
        Positions count valid events only, so left and right padding give the same result. With
        `targets` [B, C], their C tokens join the pass under M-FALCON's mask and it returns
        (hidden [B, L, D], target hidden [B, C, D]); the history's hidden vectors are unchanged by them.
        """
        pos = valid.long().cumsum(1) - 1  # [B, L]
        x = self.embed(items, actions)
        mask = valid[:, None, :] & (pos[:, :, None] >= pos[:, None, :]) & valid[:, :, None]  # [B, L, L]
        if targets is not None:
            b, length, c = *items.shape, targets.items.shape[1]
            x = torch.cat([x, self.embed(targets.items, torch.zeros_like(targets.items))], dim=1)
            sees = valid[:, None, :] & (pos[:, None, :] < targets.seen[:, :, None])  # [B, C, L]
            own = torch.eye(c, dtype=torch.bool, device=items.device).expand(b, c, c)
            mask = torch.cat([torch.cat([mask, mask.new_zeros(b, length, c)], dim=2),
                              torch.cat([sees, own], dim=2)], dim=1)  # [B, L + C, L + C]
            pos, ts = torch.cat([pos, targets.seen], dim=1), torch.cat([ts, targets.ts], dim=1)
            valid = torch.cat([valid, torch.ones_like(targets.items, dtype=torch.bool)], dim=1)
        rel_pos = pos[:, :, None] - pos[:, None, :]  # [B, L', L']
        rel_ts = ts[:, :, None] - ts[:, None, :]
        window = Window(pos, valid, mask, self.geometry(rel_pos, rel_ts))
        for block in self.blocks:
            x = block(x, window)
        x = self.final_norm(x)
        if targets is None:
            return x
        return x[:, :items.shape[1]], x[:, items.shape[1]:]

    def geometry(self, rel_pos: Tensor, rel_ts: Tensor):
        """What the blocks need of the query-key layout (rel_pos, rel_ts [B, n, T] int64, query minus key),
        computed once per call and shared by all layers. Rotary models need none of it."""
        return None

    # ----------------------------------------------------------------------------- serving

    def empty_state(self) -> State:
        dev = self.item_emb.weight.device
        return State(self.state_kind, [block.empty_state(dev) for block in self.blocks])

    def extension(self, q_pos: Tensor, ts: Tensor, actions: Tensor) -> Extension:
        """What `extend` tells every block about the new events (positions, times, actions: [n] each); a
        backbone whose blocks need more (e.g. ASTRO's sub-sequences) returns its own."""
        return Extension(self.geometry, q_pos, ts)

    def read_out(self, x: Tensor, top: LayerState, position: Tensor) -> Tensor:
        """The user's hidden vector [D] after the event at `position` whose top-layer output is x [D];
        `top` is the top layer's extended state, for a backbone that reads it."""
        return self.final_norm(x)

    @torch.no_grad()
    def extend(self, state: State, events: Events) -> tuple[State, Tensor | None, AttentionStats]:
        """Fold `events` into `state`: only the new tokens are computed, each block extending its own
        part of the state against what it cached.

        Returns a new state (the input is not modified), the last event's hidden [D] (the state's
        previous one when there are no events) and the attention statistics of this call.
        """
        dev = self.item_emb.weight.device
        n = len(events)
        if n == 0:  # nothing to fold in: the same state, and no key received any attention
            heads = [next(iter(part.tokens.values())).shape[0] if part.tokens else self.cfg.heads
                     for part in state.layers]  # each layer's head axis of statistics (see KVAttention)
            zeros = [torch.zeros(g, part.num_tokens, device=dev) for g, part in zip(heads, state.layers)]  # [G, T_l]
            window = [z.new_zeros(z.shape[0], 0, z.shape[1]) for z in zeros]  # [G, 0, T_l]
            return state, state.last_hidden, AttentionStats(zeros, window)
        items, ts, actions = (t.to(dev) for t in (events.items, events.ts, events.actions))
        ext = self.extension(state.events_consumed + torch.arange(n, device=dev), ts, actions)
        x = self.embed(items, actions)[None]  # [1, n, D]
        layers, stats = [], []
        for part, block in zip(state.layers, self.blocks):
            x, part, layer_stats = block.extend(x, part, ext)
            layers.append(part)
            stats.append(layer_stats)
        hidden = self.read_out(x[0, -1], layers[-1], ext.q_pos[-1])
        # extras are aligned with the token axis: new tokens start at zero (e.g. no accumulated attention)
        extras = {name: [F.pad(t, (0, part.num_tokens - t.shape[-1])) for t, part in zip(per_layer, layers)]
                  for name, per_layer in state.extras.items()}
        new = State(state.kind, layers, hidden, state.events_consumed + n, extras)
        energy = [s.query_energy for s in stats]
        return new, hidden, AttentionStats([s.received for s in stats], [s.window for s in stats],
                                           sum(s.macs for s in stats),
                                           None if any(e is None for e in energy) else energy)

    @torch.no_grad()
    def prefill(self, events: Events, chunk: int = 1024) -> tuple[State, Tensor | None, AttentionStats]:
        """State of a whole history, built in chunks so memory stays O(chunk x T) for long histories.

        `received` and `macs` sum over all chunks; `window` comes from the last chunk.
        """
        state, hidden = self.empty_state(), None
        received: list[Tensor] | None = None
        stats, macs = AttentionStats([], []), 0
        for start in range(0, max(len(events), 1), chunk):
            state, hidden, stats = self.extend(state, events[start:start + chunk])
            if received is not None:
                stats.received = [F.pad(old, (0, new.shape[-1] - old.shape[-1])) + new
                                  for old, new in zip(received, stats.received)]
                stats.macs += macs
            received, macs = stats.received, stats.macs
        return state, hidden, stats

    # ----------------------------------------------------------------------------- retrieval

    def item_vectors(self) -> Tensor:
        """[N, D] L2-normalised catalogue embeddings (the OOV row excluded).

        Serving scores the whole catalogue on every request, so outside training the normalised table
        is kept until the weights change (tracked by the tensor's in-place version counter)."""
        weight = self.item_emb.weight
        if self.training or torch.is_grad_enabled() and weight.requires_grad:
            return F.normalize(weight[: self.cfg.num_items], dim=-1)
        key = (weight._version, weight.data_ptr(), weight.device)
        if getattr(self, "_item_vectors_key", None) != key:
            self._item_vectors = F.normalize(weight[: self.cfg.num_items].detach(), dim=-1)
            self._item_vectors_key = key
        return self._item_vectors

    def score(self, hidden: Tensor, candidates: Tensor | None = None) -> Tensor:
        """Cosine scores. hidden [B, D]; candidates [B, C] item ids, or None for the catalogue -> [B, C|N]."""
        h = F.normalize(hidden, dim=-1)
        if candidates is None:
            return h @ self.item_vectors().T
        cand = F.normalize(self.item_emb(candidates.clamp(0, self.cfg.num_items)), dim=-1)  # [B, C, D]
        return torch.einsum("bd,bcd->bc", h, cand)

    def topk(self, hidden: Tensor, k: int, exclude: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Top-k over the catalogue. hidden [B, D]; exclude: per user the item ids to leave out (e.g. seen
        ones) -> scores [B, k], item ids [B, k], best first."""
        scores = self.score(hidden)  # [B, N]
        if exclude is not None:
            for row, items in enumerate(exclude):
                scores[row, items[items < self.cfg.num_items]] = -math.inf
        return scores.topk(min(k, scores.shape[1]), dim=1)

    # ----------------------------------------------------------------------------- target-aware ranking

    def head(self, target_hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Target hidden [..., D] -> relevance logits [...] and engagement logits [...]."""
        if self.rank_head is None:
            raise ValueError("this model has no ranking head (train it with --task ranking)")
        out = self.rank_head(target_hidden)
        return out[..., 0], out[..., 1]

    @torch.no_grad()
    def rank(self, state: State, candidates: Tensor, ts: int, batch: int = 256) -> tuple[Tensor, Tensor]:
        """Score candidates [C] (internal ids) against a cached state, `batch` at a time: each is a target
        token at the next position and time `ts` that sees the state and itself, never another candidate,
        so one pass over the state ranks a whole batch and the batch size changes no score.

        Returns relevance logits [C] and engagement probabilities [C]."""
        dev = self.item_emb.weight.device
        candidates = candidates.to(dev)
        through = self.target_pass(state, ts)
        relevance, engage = [], []
        for start in range(0, candidates.shape[0], batch):
            chunk = candidates[start:start + batch]  # [c]
            rel, eng = self.head(self.final_norm(through(self.embed(chunk, torch.zeros_like(chunk)))))
            relevance.append(rel)
            engage.append(torch.sigmoid(eng))
        if not relevance:
            empty = torch.zeros(0, device=dev)
            return empty, empty
        return torch.cat(relevance), torch.cat(engage)

    def target_pass(self, state: State, ts: int) -> Callable[[Tensor], Tensor]:
        """How target tokens pass through `state`: a function of their embeddings [c, D] -> their last
        hidden [c, D] before the final norm. What depends only on the state (here one position and time
        for all targets, so one geometry) is prepared once for every batch; a backbone with another
        state layout (ASTRO) overrides this alone."""
        dev = self.item_emb.weight.device
        ext = Extension(self.geometry, torch.tensor([state.events_consumed], device=dev),
                        torch.tensor([int(ts)], device=dev))

        def through(x: Tensor) -> Tensor:
            x = x[None]  # [1, c, D]
            for part, block in zip(state.layers, self.blocks):
                x = block.rank(x, part, ext)
            return x[0]

        return through


def log_bucket(distance: Tensor, num_buckets: int, exact: int = 16, max_distance: int = 4096) -> Tensor:
    """Relative-position bucket, defined for any distance: exact below `exact`, log-spaced up to
    `max_distance`, and the last bucket open-ended. Negative distances (masked anyway) map to 0."""
    d = distance.clamp(min=0)
    span = math.log(max(max_distance, 2 * exact) / exact)
    log_part = exact + (torch.log(d.clamp(min=exact).float() / exact) / span * (num_buckets - exact)).long()
    return torch.where(d < exact, d, log_part.clamp(max=num_buckets - 1))


def time_bucket(gap_seconds: Tensor, num_buckets: int) -> Tensor:
    """HSTU's time bucket: floor(log2(gap + 1)), clamped; gaps are non-negative in a causal window."""
    return torch.log2(gap_seconds.clamp(min=0).float() + 1).long().clamp(max=num_buckets - 1)
