"""ASTRO: the Adaptive Scalable Transformer for RecOmmendation of Climber (Xu et al., "An Efficient Large
Recommendation Model: Towards a Resource-Optimal Scaling Law", arXiv 2502.09888, CIKM 2025), on HSTU's
blocks so that it differs from kvrec's HSTU in ASTRO's three ideas only:

- **Multi-scale sequence partitioning.** The history is split into `PARTITIONS` sub-sequences and an
  event attends only to the earlier events of its own sub-sequence, at every layer, so building and
  extending the state costs sum_p n_p^2 d instead of n^2 d (n^2 d / N_b when the sub-sequences are
  even). An event's sub-sequence is its behaviour where the data has actions (action a goes to
  (a - 1) mod 4: Taobao's pv, cart, fav and buy each get their own); where it has none (action 0), the
  history is cut into blocks of `BLOCK` consecutive events dealt out to the sub-sequences in turn, so
  each sub-sequence holds the recent block of its turn and every fourth older one (a coarse, long view
  beside a fine, local one). Relative positions and time gaps are still measured in the whole history.
- **Dynamic temperature.** Each sub-sequence and head has its own learned temperature T in place of
  sqrt(d_k) (logits q.k / T + rab; T starts at sqrt(d_k), HSTU's scale), because attention over views,
  carts and buys, or over near and far blocks, wants different sharpness.
- **Adaptive gated fusion.** A softmax gate per channel over the sub-sequences (bit-wise gating) fuses
  what each contributes, conditioned on a context vector, on the sub-sequence and on how many events ago
  its latest event was; sub-sequences with no events yet are left out.

How the paper's parts map onto a cached, incrementally extended state, and where this differs:

- The state is an ordinary K/V state, one LayerState per layer holding every event's key and value in
  time order, plus a token tensor "part" [1, T, 4]: each kept token's share in each sub-sequence (one-hot
  for an event). So token selection and merging, per-tensor storages and the codec need nothing
  ASTRO-specific: selecting tokens selects their memberships, and a merged token (CaM, pool) belongs to
  each sub-sequence with the share of its members, which weighs its attention there. K/V storages
  (kivi, intact, svd, think, minicache) refuse the state because it holds more than keys and values;
  per-tensor ones (fp16, bf16, fp8, int8, int4) encode the membership too (0 stays 0, so the set of a
  sub-sequence's keys survives quantization). Token budgets count per layer, as for HSTU.
- Retrieval (the user vector): the paper fuses each sub-sequence block's output. Here the user vector
  after event t is the event's own output (its sub-sequence's, full depth) plus the gated fusion of one
  summary per sub-sequence: the top layer's cached key and value of that sub-sequence's latest token,
  projected. The summaries come from the cache, so the fusion needs no state of its own and costs
  O(N_b d) per request, independent of the history; the gate's context is the event's output.
- Ranking (M-FALCON targets): as in the paper, the candidate joins each sub-sequence: one copy per
  sub-sequence attends, at every layer, to that sub-sequence's tokens and to itself (never to another
  candidate or another copy); the gate (context: the candidate's embedding, so the candidate chooses
  which behaviour to trust) fuses the copies' outputs. C candidates cost C x T key reads in all, as for
  HSTU, with up to N_b x C projections.
- The paper's blocks per sub-sequence may have their own weights; here the sub-sequences share the
  layers' weights and differ by temperature and gate, so the model is HSTU's size and the comparison
  with HSTU isolates the partitioning.
- The partition rule is fixed in code because ModelConfig has no field for it: on MovieLens, whose
  actions are star ratings (round(2 * rating)), (a - 1) mod 4 groups ratings without meaning (2 and 4
  stars share a sub-sequence). A per-dataset map (behaviours each their own, ratings in bands, no actions
  by blocks) needs a ModelConfig field filled by training.

Attention MACs (AttentionStats.macs) count what is computed: each new query against the keys of its own
sub-sequence only. Building a state (prefill, recompute, a cache miss) shrinks with them; a request of
one event does not, on CPU: its cost is mostly appending to the cache (a copy of every cached key and
value, O(T) for any model) plus per-call overhead, and ASTRO adds a gather of its sub-sequence's keys and
about twice HSTU's small tensor operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from kvrec.models.hstu import HSTU, HSTUBlock
from kvrec.models.recommender import (
    Extension,
    LayerStats,
    ModelConfig,
    SequentialRecommender,
    Targets,
    Window,
    log_bucket,
)
from kvrec.models.state import LayerState, State
from torch import Tensor, nn

PARTITIONS = 4  # N_b, the number of sub-sequences
BLOCK = 16  # events per block where the data has no actions


def partition_of(actions: Tensor, pos: Tensor) -> Tensor:
    """Sub-sequence of each event, fixed when it arrives. actions, pos [...] int64 -> [...] int64 in
    [0, PARTITIONS): (action - 1) mod N_b for a behaviour, the turn of its block of BLOCK events for none."""
    block = torch.div(pos, BLOCK, rounding_mode="floor")
    return torch.where(actions > 0, (actions - 1) % PARTITIONS, block % PARTITIONS)


def restrict(part: LayerState, p: int) -> tuple[LayerState, Tensor]:
    """Sub-sequence p of a layer as a plain K/V layer, each token weighted by its multiplicity times its
    share in p, and the indices [T_p] of those tokens in the layer."""
    share = part.tokens["part"][0, :, p] * part.weight  # [T]
    cols = share.nonzero().squeeze(1)  # [T_p]
    take = lambda t, dim=0: t.index_select(dim, cols)  # index_select: far cheaper than indexing per call
    sub = LayerState({"k": take(part.tokens["k"], 1), "v": take(part.tokens["v"], 1)},
                     take(part.pos), take(part.ts), take(share))
    return sub, cols


def latest_tokens(part: LayerState) -> tuple[Tensor, Tensor]:
    """Index and position ([N_b] each) of the latest token of each sub-sequence in a layer, -1 where it
    has none."""
    t = torch.arange(-1, part.num_tokens, device=part.pos.device)  # a row of -1 first: an empty layer has none
    member = F.pad(part.tokens["part"][0], (0, 0, 1, 0), value=1.0)  # [1 + T, N_b]
    index = torch.where(member > 0, t[:, None], -1).amax(0)
    return index, F.pad(part.pos, (1, 0), value=-1)[index + 1]


class Partitioned:
    """What an ASTRO `extend` tells every block: the new events' positions, times and sub-sequences
    ([n] each), and per sub-sequence present among them its rows and an Extension of only those events,
    whose geometry names the sub-sequence (for its temperature). Shared by all layers."""

    def __init__(self, geometry_of, q_pos: Tensor, ts: Tensor, part: Tensor):
        self.q_pos, self.ts, self.part = q_pos, ts, part
        self.parts = []
        for p in part.unique().tolist():
            rows = (part == p).nonzero().squeeze(1)  # [n_p]
            sub = Extension(partial(geometry_of, partition=p), q_pos.index_select(0, rows), ts.index_select(0, rows))
            self.parts.append((p, rows, sub))


class ASTROBlock(HSTUBlock):
    """HSTU's layer with a temperature per sub-sequence and head; a query sees its own sub-sequence only.

    The model's geometry carries each query's sub-sequence ([B, n]) after HSTU's bucket ids. Its state
    is keys and values plus each token's sub-sequence membership, a kind of its own, so that a policy
    that would drop the membership refuses it by name."""

    state_kind = "partitioned-kv"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # log T per sub-sequence and head; T = sqrt(d_k) at first, HSTU's fixed scale
        self.log_temperature = nn.Parameter(torch.full((PARTITIONS, cfg.heads), 0.5 * math.log(cfg.d_k)))

    def logits(self, q, k, geometry):
        pos_bucket, time_bucket_, part = geometry  # part [B, n]: each query's sub-sequence
        # HSTU's logits divide q by sqrt(d_k): scaling q by sqrt(d_k) / T makes them q.k / T + rab
        scale = math.sqrt(self.cfg.d_k) / self.log_temperature.exp()[part]  # [B, n, H]
        return super().logits(q * scale.permute(0, 2, 1)[..., None], k, (pos_bucket, time_bucket_))

    def attend(self, x: Tensor, window: Window) -> tuple[Tensor, Tensor, Tensor]:
        """`forward`, also returning the keys [B, H, L, d_k] and values [B, H, L, d_v] (the top layer's
        feed the fusion's summaries)."""
        q, k, v, ctx = self.qkv(x, window.pos)
        w = self.weights(q, k, window.geometry, window.valid.to(x.dtype), window.mask)
        return self.output(x, w @ v, ctx), k, v

    def forward(self, x: Tensor, window: Window) -> Tensor:
        return self.attend(x, window)[0]

    def empty_state(self, device: torch.device) -> LayerState:
        part = super().empty_state(device)
        part.tokens["part"] = torch.zeros(1, 0, PARTITIONS, device=device)
        return part

    def extend(self, x: Tensor, part: LayerState, ext: Partitioned) -> tuple[Tensor, LayerState, LayerStats]:
        """The new events' queries, each against the cached and new keys of its own sub-sequence."""
        cfg, n = self.cfg, x.shape[1]
        q, k, v, ctx = self.qkv(x, ext.q_pos[None])  # [1, H, n, d]
        member = F.one_hot(ext.part, PARTITIONS).to(x.dtype)[None]  # [1, n, N_b]
        full = LayerState({name: torch.cat([part.tokens[name], new], dim=1)
                           for name, new in (("k", k[0]), ("v", v[0]), ("part", member))},
                          torch.cat([part.pos, ext.q_pos]), torch.cat([part.ts, ext.ts]),
                          torch.cat([part.weight, x.new_ones(n)]))  # T = T_cached + n
        t, w_rows = full.num_tokens, min(cfg.obs_window, n)
        attn = x.new_zeros(1, cfg.heads, n, cfg.d_v)
        received, window = x.new_zeros(cfg.heads, t), x.new_zeros(cfg.heads, w_rows, t)
        macs = 0
        for p, rows, sub_ext in ext.parts:
            sub, cols = restrict(full, p)  # [T_p] keys of sub-sequence p
            mask = (sub_ext.q_pos[:, None] >= sub.pos[None, :])[None]  # [1, n_p, T_p]
            w = self.weights(q.index_select(2, rows), sub.tokens["k"][None], sub_ext.geometry(sub.pos, sub.ts),
                             sub.weight[None], mask)  # [1, H, n_p, T_p]
            attn.index_copy_(2, rows, w @ sub.tokens["v"][None])
            received.index_add_(1, cols, w[0].abs().sum(1))
            last = (rows >= n - w_rows).nonzero().squeeze(1)  # its queries among the last w_rows of the call
            if len(last):
                seen = x.new_zeros(cfg.heads, len(last), t).index_copy_(2, cols, w[0].index_select(1, last).abs())
                window.index_copy_(1, rows.index_select(0, last) - (n - w_rows), seen)
            macs += cfg.heads * len(rows) * len(cols) * (cfg.d_k + cfg.d_v)
        return self.output(x, attn, ctx), full, LayerStats(received, window, macs)


class Fusion(nn.Module):
    """Adaptive gated fusion: per channel, a softmax over the sub-sequences present of
    W_v value_p + W_c context + bias[p] + bias[bucket(gap_p)], weighing the values [.., N_b, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.value = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.context = nn.Linear(cfg.dim, cfg.dim)
        self.part_bias = nn.Parameter(torch.zeros(PARTITIONS, cfg.dim))
        self.gap_bias = nn.Parameter(torch.zeros(cfg.pos_buckets, cfg.dim))

    def forward(self, values: Tensor, context: Tensor, gap: Tensor, present: Tensor) -> Tensor:
        """values [..., N_b, D], context [..., D], gap [..., N_b] events since each sub-sequence's latest,
        present [..., N_b] bool (none present: all count) -> [..., D]."""
        gap_bucket = log_bucket(gap, self.cfg.pos_buckets, max_distance=self.cfg.max_len)
        logits = (self.value(values) + self.context(context)[..., None, :] + self.part_bias
                  + F.embedding(gap_bucket, self.gap_bias))  # [..., N_b, D]
        present = present | ~present.any(-1, keepdim=True)
        gate = logits.masked_fill(~present[..., None], -math.inf).softmax(-2)
        return (gate * values).sum(-2)


class ASTRO(HSTU):
    """HSTU with partitioned attention, a temperature per sub-sequence, and gated fusion (see above)."""

    def __init__(self, cfg: ModelConfig):
        # HSTU's geometry, ASTRO's blocks: HSTU's own __init__ would build HSTU blocks
        SequentialRecommender.__init__(self, cfg, [ASTROBlock(cfg) for _ in range(cfg.layers)])
        self.summary = nn.Linear(cfg.heads * (cfg.d_k + cfg.d_v), cfg.dim)  # a top-layer key and value -> D
        self.fusion = Fusion(cfg)
        self.target_fusion = Fusion(cfg) if cfg.ranking_head else None

    def geometry(self, rel_pos: Tensor, rel_ts: Tensor, partition: int | Tensor):
        """HSTU's bucket ids [B, n, T] and each query's sub-sequence [B, n] (`partition`, or all of them
        in one sub-sequence when it is an int)."""
        if isinstance(partition, int):
            partition = torch.full(rel_pos.shape[:2], partition, dtype=torch.long, device=rel_pos.device)
        return (*super().geometry(rel_pos, rel_ts), partition)

    # ----------------------------------------------------------------------------- training

    def forward(self, items: Tensor, ts: Tensor, actions: Tensor, valid: Tensor,
                targets: Targets | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """SequentialRecommender.forward's contract, with attention inside sub-sequences; each target
        enters once per sub-sequence (copy p sees the events of p before its cut, and itself)."""
        b, length = items.shape
        pos = valid.long().cumsum(1) - 1  # [B, L]
        part = partition_of(actions, pos)  # [B, L]
        x = self.embed(items, actions)  # [B, L, D]
        mask = (valid[:, None, :] & valid[:, :, None] & (pos[:, :, None] >= pos[:, None, :])
                & (part[:, :, None] == part[:, None, :]))  # [B, L, L]
        q_pos, q_ts, q_part, q_valid = pos, ts, part, valid
        if targets is not None:
            c = targets.items.shape[1]
            target_x = self.embed(targets.items, torch.zeros_like(targets.items))  # [B, C, D]
            copy_part = torch.arange(PARTITIONS, device=items.device).repeat_interleave(c).expand(b, -1)  # [B, N_b C]
            seen = targets.seen.repeat(1, PARTITIONS)  # [B, N_b C], copies in sub-sequence order
            x = torch.cat([x, target_x.repeat(1, PARTITIONS, 1)], dim=1)
            sees = (valid[:, None, :] & (pos[:, None, :] < seen[:, :, None])
                    & (part[:, None, :] == copy_part[:, :, None]))  # [B, N_b C, L]
            own = torch.eye(PARTITIONS * c, dtype=torch.bool, device=items.device).expand(b, -1, -1)
            mask = torch.cat([torch.cat([mask, mask.new_zeros(b, length, PARTITIONS * c)], dim=2),
                              torch.cat([sees, own], dim=2)], dim=1)  # [B, L + N_b C, L + N_b C]
            q_pos, q_part = torch.cat([pos, seen], dim=1), torch.cat([part, copy_part], dim=1)
            q_ts = torch.cat([ts, targets.ts.repeat(1, PARTITIONS)], dim=1)
            q_valid = torch.cat([valid, torch.ones_like(seen, dtype=torch.bool)], dim=1)
        geometry = self.geometry(q_pos[:, :, None] - q_pos[:, None, :], q_ts[:, :, None] - q_ts[:, None, :], q_part)
        window = Window(q_pos, q_valid, mask, geometry)
        for block in self.blocks[:-1]:
            x = block(x, window)
        x, k, v = self.blocks[-1].attend(x, window)
        hidden = self.read_out_window(x[:, :length], k[:, :, :length], v[:, :, :length], pos, part, valid)
        if targets is None:
            return hidden
        copies = x[:, length:].view(b, PARTITIONS, c, -1).transpose(1, 2)  # [B, C, N_b, D]
        of_p = valid[:, None, :, None] & (part[:, None, :, None] == torch.arange(PARTITIONS, device=items.device))
        before = of_p & (pos[:, None, :, None] < targets.seen[:, :, None, None])  # [B, C, L, N_b]
        latest = torch.where(before, pos[:, None, :, None], -1).amax(2)  # [B, C, N_b] position, -1: none
        fused = self.target_fusion(copies, target_x, targets.seen[..., None] - latest, latest >= 0)
        return hidden, self.final_norm(fused)

    def read_out_window(self, x: Tensor, k: Tensor, v: Tensor, pos: Tensor, part: Tensor, valid: Tensor) -> Tensor:
        """The user vector after every event of a window: x [B, L, D] top outputs, k, v [B, H, L, d] top
        keys and values, pos, part [B, L], valid [B, L] -> [B, L, D]."""
        b, length, dim = x.shape
        summary = self.summary(torch.cat([k, v], dim=-1).transpose(1, 2).flatten(2))  # [B, L, D] every token's
        of_p = valid[..., None] & (part[..., None] == torch.arange(PARTITIONS, device=x.device))  # [B, L, N_b]
        index = torch.arange(length, device=x.device)[None, :, None]
        latest = torch.where(of_p, index, -1).cummax(1).values  # [B, L, N_b] each sub-sequence's latest so far
        j = latest.clamp(min=0).flatten(1)  # [B, L N_b]
        values = summary.gather(1, j[..., None].expand(-1, -1, dim)).view(b, length, PARTITIONS, dim)
        gap = pos[..., None] - pos.gather(1, j).view(b, length, PARTITIONS)
        return self.final_norm(x + self.drop(self.fusion(values, x, gap, latest >= 0)))

    # ----------------------------------------------------------------------------- serving

    def read_out(self, x: Tensor, top: LayerState, position: Tensor) -> Tensor:
        """The user vector after the event at `position` whose top output is x [D], from the top layer's
        state (which holds it) -> [D]; the same numbers as `read_out_window` at that event."""
        latest, latest_pos = latest_tokens(top)  # [N_b] each
        j = latest.clamp(min=0)
        kv = torch.cat([top.tokens["k"].index_select(1, j), top.tokens["v"].index_select(1, j)], dim=-1)  # [H, N_b, d]
        kv = kv.transpose(0, 1).flatten(1)  # [N_b, H (d_k + d_v)], heads in the order training flattens them
        return self.final_norm(x + self.fusion(self.summary(kv), x, position - latest_pos, latest >= 0))

    def extension(self, q_pos: Tensor, ts: Tensor, actions: Tensor) -> Partitioned:
        """Each new event extends the state of its own sub-sequence."""
        return Partitioned(self.geometry, q_pos, ts, partition_of(actions, q_pos))

    def target_pass(self, state: State, ts: int) -> Callable[[Tensor], Tensor]:
        """SequentialRecommender.target_pass's contract: a copy of each target per sub-sequence present (all
        of them over an empty state), through that sub-sequence's tokens layer by layer, then fused."""
        if self.target_fusion is None:
            raise ValueError("this model has no ranking head (train it with --task ranking)")
        dev = self.item_emb.weight.device
        top = state.layers[-1]
        latest, latest_pos = latest_tokens(top)  # [N_b] each
        present = latest >= 0
        gap = state.events_consumed - latest_pos  # [N_b]
        chosen = present.nonzero().squeeze(1).tolist() or list(range(PARTITIONS))
        subs = {p: [restrict(part, p)[0] for part in state.layers] for p in chosen}
        position, time = torch.tensor([state.events_consumed], device=dev), torch.tensor([int(ts)], device=dev)
        extensions = {p: Extension(partial(self.geometry, partition=p), position, time) for p in subs}

        def through(target_x: Tensor) -> Tensor:  # [c, D] -> [c, D]
            copies = target_x.new_zeros(len(target_x), PARTITIONS, self.cfg.dim)  # [c, N_b, D]
            for p, parts in subs.items():
                x = target_x[None]
                for sub, block in zip(parts, self.blocks):
                    x = block.rank(x, sub, extensions[p])
                copies[:, p] = x[0]
            c = len(target_x)
            return self.target_fusion(copies, target_x, gap.expand(c, -1), present.expand(c, -1))

        return through
