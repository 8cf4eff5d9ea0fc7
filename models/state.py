"""The state contract: what a model keeps per user between requests, and the events that extend it.

Every `State` says what it is (`kind`, chosen by the model's blocks: "kv" for today's keys and values,
"recurrent" for a fixed-size matrix, ...), how many events it has folded in, the last hidden vector, and
per layer a `LayerState` of named tensors. A layer's tensors are of two sorts:

- *token* tensors, one entry per kept token on axis 1 (`[G, T, d]`: K/V are `k [H_kv, T, d_k]` and
  `v [H_kv, T, d_v]`, a latent-attention layer would keep one latent per token), together with each kept
  token's absolute position in the history, its timestamp and its multiplicity (a merged token stands
  for several events). Positions are not renumbered after eviction, so relative position biases stay
  correct whatever a compression policy dropped; the one deliberate exception is `streaming`, which lays
  its sinks out right before its window as StreamingLLM's cache does;
- *fixed* tensors, whose size does not grow with the history (a recurrent layer's matrix `[H, d_k, d_v]`).

Tokens are shared by all token tensors and heads of a layer (a policy evicts a token for all of them at
once) but may differ between layers. Each attention block owns how its layer's part is extended
(`models.recommender.Block.extend`); the codec stores any state as named tensors; a compression policy
declares which states it applies to by the tensors it needs (`compression.base.Policy.requires`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class Events:
    """A user's events in time order, as internal ids.

    items:   [n] int64, contiguous item ids; `num_items` (one past the last id) is the out-of-vocabulary id
    ts:      [n] int64, unix seconds, or the event index where the data has no time
    actions: [n] int64, 0 where the data has no action (e.g. a rating of 4 gives action 8, see models.data)
    """

    items: Tensor
    ts: Tensor
    actions: Tensor

    def __post_init__(self) -> None:
        if not (self.items.shape == self.ts.shape == self.actions.shape) or self.items.dim() != 1:
            raise ValueError(
                f"events need three 1-d tensors of one length, got {tuple(self.items.shape)}, "
                f"{tuple(self.ts.shape)}, {tuple(self.actions.shape)}"
            )

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def __getitem__(self, sl: slice) -> Events:
        return Events(self.items[sl], self.ts[sl], self.actions[sl])

    @staticmethod
    def of(items, ts=None, actions=None) -> Events:
        """Events from plain sequences; missing times become the event index, missing actions 0."""
        items_t = torch.as_tensor(items, dtype=torch.long).reshape(-1)
        n = items_t.shape[0]
        ts_t = torch.arange(n, dtype=torch.long) if ts is None else torch.as_tensor(ts, dtype=torch.long)
        act_t = torch.zeros(n, dtype=torch.long) if actions is None else torch.as_tensor(actions, dtype=torch.long)
        return Events(items_t, ts_t.reshape(-1), act_t.reshape(-1))

    @staticmethod
    def cat(parts: list[Events]) -> Events:
        return Events(
            torch.cat([p.items for p in parts]),
            torch.cat([p.ts for p in parts]),
            torch.cat([p.actions for p in parts]),
        )


class LayerState:
    """One layer's part of a user's state.

    tokens: name -> [G, T, d]  per-token tensors, token axis 1
    pos:    [T] int64          absolute event index of each kept token
    ts:     [T] int64          timestamp of each kept token
    weight: [T] float          how many events each kept token stands for (1 unless merged)
    fixed:  name -> tensor     state whose size does not depend on the history length
    """

    def __init__(self, tokens: dict[str, Tensor] | None = None, pos: Tensor | None = None,
                 ts: Tensor | None = None, weight: Tensor | None = None, fixed: dict[str, Tensor] | None = None):
        self.tokens = tokens or {}
        self.fixed = fixed or {}
        device = next(iter({**self.tokens, **self.fixed}.values())).device if self.tokens or self.fixed else None
        self.pos = torch.zeros(0, dtype=torch.long, device=device) if pos is None else pos
        self.ts = torch.zeros(0, dtype=torch.long, device=device) if ts is None else ts
        self.weight = torch.zeros(0, device=device) if weight is None else weight

    def __repr__(self) -> str:
        shapes = {name: tuple(t.shape) for name, t in {**self.tokens, **self.fixed}.items()}
        return f"LayerState(T={self.num_tokens}, {shapes})"

    @property
    def num_tokens(self) -> int:
        return int(self.pos.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        """Every float tensor of the layer, token and fixed, by name (names are unique within a layer)."""
        return {**self.tokens, **self.fixed}

    def select(self, idx: Tensor) -> None:
        """Keep only tokens `idx` ([T'] int64, ascending) with their metadata."""
        self.tokens = {name: t[:, idx] for name, t in self.tokens.items()}
        self.pos, self.ts, self.weight = self.pos[idx], self.ts[idx], self.weight[idx]

    def map(self, fn) -> LayerState:
        """A new layer with `fn` applied to every tensor (to move or copy it)."""
        return LayerState({n: fn(t) for n, t in self.tokens.items()}, fn(self.pos), fn(self.ts), fn(self.weight),
                          {n: fn(t) for n, t in self.fixed.items()})

    def copy(self) -> LayerState:
        """A shallow copy: new dicts, the same tensors (policies replace tensors, they never write into them)."""
        return self.map(lambda t: t)


class PerLayer:
    """`state.k[l]` reads and `state.k[l] = x` replaces the token tensor "k" of layer l; `state.pos[l]`
    the same for a token attribute. Lets token policies index layers as lists."""

    def __init__(self, layers: list[LayerState], name: str, attribute: bool):
        self.layers, self.name, self.attribute = layers, name, attribute

    def __getitem__(self, layer: int) -> Tensor:
        part = self.layers[layer]
        return getattr(part, self.name) if self.attribute else part.tokens[self.name]

    def __setitem__(self, layer: int, value: Tensor) -> None:
        part = self.layers[layer]
        if self.attribute:
            setattr(part, self.name, value)
        else:
            part.tokens[self.name] = value

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return (self[layer] for layer in range(len(self)))


@dataclass
class State:
    """Cached state of one user.

    kind:            what the model's blocks keep ("kv", "recurrent", ...); a blob records it
    layers:          one LayerState per layer
    last_hidden:     [D] float, final hidden state of the last consumed event (None before any event)
    events_consumed: events folded into this state (the next event gets this position)
    extras:          per-layer tensors a policy carries between requests, e.g. {"acc": [[G, T_l], ...]};
                     every extra is aligned with the token axis (last dim T_l), so selecting tokens
                     selects them too
    """

    kind: str
    layers: list[LayerState]
    last_hidden: Tensor | None = None
    events_consumed: int = 0
    extras: dict[str, list[Tensor]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # views of token tensors and token metadata, per layer (see PerLayer)
    k = property(lambda self: PerLayer(self.layers, "k", attribute=False))
    v = property(lambda self: PerLayer(self.layers, "v", attribute=False))
    pos = property(lambda self: PerLayer(self.layers, "pos", attribute=True))
    ts = property(lambda self: PerLayer(self.layers, "ts", attribute=True))
    weight = property(lambda self: PerLayer(self.layers, "weight", attribute=True))

    def tokens(self, layer: int = 0) -> int:
        return self.layers[layer].num_tokens

    def tokens_kept(self) -> int:
        """Kept tokens summed over layers, the unit that token budgets count per layer (0 for a state
        that keeps no tokens)."""
        return sum(part.num_tokens for part in self.layers)

    def token_names(self) -> set[str]:
        """Names of the per-token tensors (empty for a state without tokens)."""
        return {name for part in self.layers for name in part.tokens}

    def tensor_bytes(self) -> int:
        """Bytes of the dense float tensors alone (token and fixed), as they are held in memory."""
        return sum(t.numel() * t.element_size() for part in self.layers for t in part.tensors().values())

    def dense_bytes(self, events: int) -> int:
        """fp32 bytes that a state of this layout holds after `events` events with nothing compressed:
        every event a token of every token tensor, fixed tensors as they are. Compression ratios are
        taken against it."""
        per_event = sum(t.shape[0] * math.prod(t.shape[2:]) for part in self.layers for t in part.tokens.values())
        fixed = sum(t.numel() for part in self.layers for t in part.fixed.values())
        return 4 * (events * per_event + fixed)

    def select(self, layer: int, idx: Tensor) -> None:
        """Keep only tokens `idx` ([T'] int64, ascending) of `layer`, with their metadata and extras."""
        self.layers[layer].select(idx)
        for per_layer in self.extras.values():
            per_layer[layer] = per_layer[layer][..., idx]

    def map(self, fn) -> State:
        return replace(self, layers=[part.map(fn) for part in self.layers],
                       last_hidden=None if self.last_hidden is None else fn(self.last_hidden),
                       extras={name: [fn(t) for t in ts] for name, ts in self.extras.items()})

    def shallow_copy(self) -> State:
        """New containers over the same tensors, so that a policy can replace tensors without touching
        the caller's state."""
        return replace(self, layers=[part.copy() for part in self.layers],
                       extras={name: list(ts) for name, ts in self.extras.items()})

    def to(self, device: torch.device | str) -> State:
        """The state on `device`: blobs decode to (zero-copy) CPU tensors while a CUDA model extends on
        the GPU. The state itself, no copy, when it is already there."""
        device = torch.device(device)
        if all(t.device == device for part in self.layers for t in [part.pos, *part.tensors().values()]):
            return self
        return self.map(lambda t: t.to(device))

    def clone(self) -> State:
        return self.map(lambda t: t.clone())


@dataclass
class AttentionStats:
    """Attention statistics of one `extend` call, for score-based policies (H2O, SnapKV, IntactKV, ThinK).

    received[l]: [G, T_l] float  attention mass that each key of layer l (cached and new, in the order
                                 of the extended state) received from the new queries, summed over them
    window[l]:   [G, w, T_l]     attention weights of the last w new queries (w <= obs_window)
    query_energy[l]: [G, w, d_q] the same w queries' squared channels q_tc^2, summed over the query
                                 heads that read each state head (ThinK's key-channel score); None when
                                 the call had no events or its blocks report none (KVAttention's do)

    G is the head axis of the state's token tensors: the query heads, or under grouped-query attention
    the K/V heads (a group's query heads summed), or 1 for a latent state (all heads summed), so that a
    score lines up with what a policy evicts.
    macs:                        multiply-accumulates of attention in the call (q.k and weights.v)

    For softmax attention (SASRec) a weight is the softmax probability. HSTU's pointwise attention has
    no distribution over keys: there a weight is |SiLU(q.k + bias)| / norm * multiplicity, the magnitude
    with which a key's value enters the output, which plays the same role for ranking keys.
    """

    received: list[Tensor]
    window: list[Tensor]
    macs: int = 0  # attention multiply-accumulates of the call, as each block counts them
    query_energy: list[Tensor] | None = None
