"""The per-user attention state and the event batch that extends it.

A `State` is what the server caches per user: for every layer the keys and values of the kept tokens,
and for each kept token its absolute position in the history, its timestamp and its multiplicity (a
merged token stands for several events). Positions are never renumbered after eviction, so relative
position biases stay correct whatever a compression policy dropped.

Tokens are shared across the heads of a layer (a policy evicts a token for all heads of that layer at
once) but may differ between layers, which is why `pos`, `ts` and `weight` are per layer.
"""

from __future__ import annotations

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


@dataclass
class State:
    """Cached attention state of one user.

    k[l]:      [H, T_l, d_k] float  keys of the kept tokens of layer l (after rotary, where the model has it)
    v[l]:      [H, T_l, d_v] float  values of the kept tokens of layer l
    pos[l]:    [T_l] int64          absolute event index of each kept token
    ts[l]:     [T_l] int64          timestamp of each kept token
    weight[l]: [T_l] float          how many events each kept token stands for (1 unless merged)
    last_hidden: [D] float          final hidden state of the last consumed event (None before any event)
    events_consumed: int            events folded into this state (the next event gets this position)
    extras: per-layer tensors a policy carries between requests, e.g. {"acc": [[H, T_l], ...]}; every
            extra is aligned with the token axis (last dim T_l) so that selecting tokens selects them too.
    """

    k: list[Tensor]
    v: list[Tensor]
    pos: list[Tensor]
    ts: list[Tensor]
    weight: list[Tensor]
    last_hidden: Tensor | None = None
    events_consumed: int = 0
    extras: dict[str, list[Tensor]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def tokens(self, layer: int = 0) -> int:
        return int(self.k[layer].shape[1])

    def tokens_kept(self) -> int:
        """Kept tokens summed over layers, the unit that token budgets count per layer."""
        return sum(self.tokens(layer) for layer in range(self.num_layers))

    def tensor_bytes(self) -> int:
        """Bytes of the dense K/V tensors alone, as they are held in memory."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def select(self, layer: int, idx: Tensor) -> None:
        """Keep only tokens `idx` ([T'] int64, ascending) of `layer`, with their metadata and extras."""
        self.k[layer] = self.k[layer][:, idx]
        self.v[layer] = self.v[layer][:, idx]
        self.pos[layer] = self.pos[layer][idx]
        self.ts[layer] = self.ts[layer][idx]
        self.weight[layer] = self.weight[layer][idx]
        for per_layer in self.extras.values():
            per_layer[layer] = per_layer[layer][..., idx]

    def to(self, device: torch.device | str) -> State:
        """The state on `device`: blobs decode to (zero-copy) CPU tensors while a CUDA model extends on
        the GPU. The state itself, no copy, when it is already there."""
        device = torch.device(device)
        if all(t.device == device for t in self.k):
            return self
        move = lambda ts: [t.to(device) for t in ts]
        return replace(self, k=move(self.k), v=move(self.v), pos=move(self.pos), ts=move(self.ts),
                       weight=move(self.weight),
                       last_hidden=None if self.last_hidden is None else self.last_hidden.to(device),
                       extras={name: move(ts) for name, ts in self.extras.items()})

    def clone(self) -> State:
        return replace(
            self,
            k=[t.clone() for t in self.k],
            v=[t.clone() for t in self.v],
            pos=[t.clone() for t in self.pos],
            ts=[t.clone() for t in self.ts],
            weight=[t.clone() for t in self.weight],
            last_hidden=None if self.last_hidden is None else self.last_hidden.clone(),
            extras={name: [t.clone() for t in ts] for name, ts in self.extras.items()},
        )


@dataclass
class AttentionStats:
    """Attention statistics of one `extend` call, for score-based policies (H2O, SnapKV, IntactKV).

    received[l]: [H, T_l] float  attention mass that each key of layer l (cached and new, in the order
                                 of the extended state) received from the new queries, summed over them
    window[l]:   [H, w, T_l]     attention weights of the last w new queries (w <= obs_window)
    macs:                        multiply-accumulates of attention in the call (q.k and weights.v)

    For softmax attention (SASRec) a weight is the softmax probability. HSTU's pointwise attention has
    no distribution over keys: there a weight is |SiLU(q.k + bias)| / norm * multiplicity, the magnitude
    with which a key's value enters the output, which plays the same role for ranking keys.
    """

    received: list[Tensor]
    window: list[Tensor]
    macs: int = 0  # attention multiply-accumulates of the call, as each block counts them
