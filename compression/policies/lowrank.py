"""Low-rank and channel level: fewer numbers per token by dropping directions of the head dimension.

Palu's latent lives before the step that makes a cached key from its linear projection (rotary phases
for SASRec, SiLU for HSTU), and StreamingLLM (pruning.py) moves rotary keys to new positions: both need
to know how a block builds what it caches. `projections` and `rotary_keys` read that from the block
classes kvrec has; a block kind they do not know is refused by name rather than guessed at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from kvrec.compression.base import Dims, KVStorage, Policy, PolicyContext, PolicyError, Shapes, Storage, kv_dims
from kvrec.compression.registry import register
from kvrec.models.hstu import HSTUBlock
from kvrec.models.recommender import SequentialRecommender
from kvrec.models.sasrec import SASRecBlock, rotate
from kvrec.models.state import AttentionStats, State
from torch import Tensor

FLOAT_TYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SILU_MIN_AT = -1.2784645  # SiLU is increasing right of its minimum, SiLU(-1.2785) = -0.2785
SILU_MIN = SILU_MIN_AT * torch.sigmoid(torch.tensor(SILU_MIN_AT, dtype=torch.float64)).item()


def float_type(policy: Storage, name: str) -> torch.dtype:
    policy.check(name in FLOAT_TYPES, f"dtype must be one of {', '.join(FLOAT_TYPES)}, got {name!r}")
    return FLOAT_TYPES[name]


def flat(x: Tensor) -> Tensor:
    """[H, T, d] -> [T, H*d]: one row per token, heads side by side."""
    return x.transpose(0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2])


def unflat(x: Tensor, heads: int) -> Tensor:
    """[T, H*d] -> [H, T, d]."""
    return x.reshape(x.shape[0], heads, x.shape[1] // heads).transpose(0, 1)


def rotary_keys(model: SequentialRecommender) -> bool:
    """Whether the model's cached keys carry the rotary phase of their position (SASRec), rather than
    positions entering through a bias computed from `pos` at every extension (HSTU and its kin)."""
    kinds = set()
    for block in model.blocks:
        if isinstance(block, SASRecBlock):
            kinds.add(True)
        elif isinstance(block, HSTUBlock):
            kinds.add(False)
        else:
            raise PolicyError(f"cannot tell how a {type(block).__name__} puts positions into its cached keys")
    return kinds == {True}


def move_keys(k: Tensor, shift: Tensor) -> Tensor:
    """Rotary keys k [H, T, d] moved by `shift` [T] positions (rotary phases add up, so rotating by the
    shift turns a key made at position p into the key the model makes at p + shift)."""
    return rotate(k[None], shift[None])[0]


def silu_inverse(y: Tensor, iterations: int = 40) -> Tensor:
    """The z >= -1.2785 with SiLU(z) = y (the increasing branch), elementwise; y below SiLU's minimum
    maps to the minimum. Newton's method from the right: SiLU is convex there, so the iterates fall
    monotonically onto the root (a root z is at most y + 2 for every y >= SiLU's minimum)."""
    y64 = y.double().clamp(min=SILU_MIN)
    z = y64 + 2.0
    for _ in range(iterations):
        s = torch.sigmoid(z)
        z = (z - (z * s - y64) / (s * (1 + z * (1 - s))).clamp(min=1e-12)).clamp(min=SILU_MIN_AT)
    return z.to(y.dtype)


@dataclass(frozen=True)
class Projection:
    """How a block makes the key or value it caches from its normalised input x [D]:
    cached = after(W x + b), where `after` is a rotary phase (SASRec keys), SiLU (HSTU keys and values)
    or nothing (SASRec values)."""

    weight: Tensor  # [H*d, D], rows head by head (the layout of the cached [H, T, d] flattened per token)
    bias: Tensor  # [H*d]
    rotary: bool
    silu: bool

    def before(self, x: Tensor, pos: Tensor) -> Tensor:
        """Cached x [H, T, d] at positions pos [T] -> the linear projection W x + b [H, T, d]."""
        if self.rotary:
            x = move_keys(x, -pos)
        return silu_inverse(x) if self.silu else x

    def after(self, z: Tensor, pos: Tensor | None) -> Tensor:
        """The linear projection z [H, T, d] -> what the block caches at positions pos [T] (needed only
        by rotary keys)."""
        if self.silu:
            z = torch.nn.functional.silu(z)
        return move_keys(z, pos.long()) if self.rotary else z


def projections(model: SequentialRecommender) -> list[dict[str, Projection]]:
    """Per layer, the key ("k") and value ("v") projections of the model's blocks, on the CPU (where
    blobs are encoded and decoded)."""
    out = []
    for block in model.blocks:
        cfg = block.cfg
        if isinstance(block, SASRecBlock):
            k = Projection(block.k.weight, block.k.bias, rotary=True, silu=False)
            v = Projection(block.v.weight, block.v.bias, rotary=False, silu=False)
        elif isinstance(block, HSTUBlock):  # uvqk rows: u (H*d_v), v (N*d_v), q (H*d_k), k (N*d_k); N K/V heads
            w, b = block.uvqk.weight, block.uvqk.bias
            u, v_end = cfg.heads * cfg.d_v, (cfg.heads + cfg.kv_head_count) * cfg.d_v
            k_start = v_end + cfg.heads * cfg.d_k
            k = Projection(w[k_start:], b[k_start:], rotary=False, silu=True)
            v = Projection(w[u:v_end], b[u:v_end], rotary=False, silu=True)
        else:
            raise PolicyError(f"svd: a {type(block).__name__} exposes no key/value projection weights")
        out.append({name: Projection(p.weight.detach().float().cpu(), p.bias.detach().float().cpu(), p.rotary, p.silu)
                    for name, p in (("k", k), ("v", v))})
    return out


@register
@dataclass
class SVD(KVStorage):
    """Palu (Chang et al., ICLR 2025, "Palu: KV-Cache Compression with Low-Rank Projection"): the key and
    value projections W (per layer, per group of `groups` of the heads) are factored by SVD, W ~ U_r (S_r
    V_r^T); each token is stored as its `rank`-dimensional latent h = S_r V_r^T x = U_r^T (W x + b - b)
    and reconstructed on use as U_r h + b, then passed through what the block applies after the
    projection (rotary phases at the token's position, HSTU's SiLU).

    The bases come from the model's weights alone, at bind: no calibration data, nothing to save, and
    they are bound into the model fingerprint (a blob made under other weights is refused as foreign).
    `groups` = 1 decomposes all heads jointly (Palu's J-LRD), = the number of heads per head (M-LRD),
    in between Palu's group-head G-LRD. Deliberate differences:

    - the latent is computed at encode from the cached tensor, whose linear projection is recovered:
      rotary keys are rotated back by their position (exact); HSTU caches SiLU(W x + b), which is
      inverted on its increasing branch, exact for projections above -1.28 (SiLU's minimum) and
      otherwise the other preimage, so HSTU pays an extra error there, and a decoded state re-encoded
      is not exactly a fixed point (a rebuilt projection below -1.28 comes back as its mirror): the
      error settles after a re-encode or two instead of growing with requests (the exact fix caches
      the projection before SiLU; see the closing note of issue 12);
    - reconstruction happens at decode, not inside the attention kernel, since the service extends a
      dense state (the numbers are the same);
    - plain SVD of W, not Palu's Fisher- or whitening-weighted variants, which need activations.
    """

    name = "svd"
    rank: int = 16
    dtype: str = "fp32"
    groups: int = 1
    layers: list[dict[str, tuple[Projection, Tensor]]] | None = field(default=None, init=False, repr=False,
                                                                      compare=False)

    def __post_init__(self) -> None:
        self.check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        self.check(self.groups >= 1, f"groups must be >= 1, got {self.groups}")
        float_type(self, self.dtype)

    def bind(self, context: PolicyContext | None) -> None:
        if context is None or context.model is None:
            raise PolicyError("svd: needs a PolicyContext with the model (its bases come from the model's weights)")
        heads = context.model.cfg.kv_head_count
        self.check(heads % self.groups == 0, f"groups must divide the model's {heads} K/V heads, got {self.groups}")
        self.layers = [{name: (p, self.bases(p.weight)) for name, p in layer.items()}
                       for layer in projections(context.model)]

    def bases(self, weight: Tensor) -> Tensor:
        """weight [H*d, D] -> per head group the leading left singular vectors [groups, H*d/groups, r]."""
        rows = weight.double().reshape(self.groups, -1, weight.shape[1])  # [groups, g*d, D]
        u = torch.linalg.svd(rows, full_matrices=False).U  # [groups, g*d, min(g*d, D)]
        return u[..., : self.rank].float().contiguous()

    def basis(self, layer: int, name: str) -> tuple[Projection, Tensor]:
        if self.layers is None:
            raise PolicyError("svd: no bases; parse the spec with a PolicyContext holding the model")
        return self.layers[layer][name]

    def pack(self, state: State) -> dict[str, Tensor]:
        out = {}
        for layer in range(state.num_layers):
            for name in ("k", "v"):
                proj, basis = self.basis(layer, name)
                z = flat(proj.before(state.layers[layer].tokens[name], state.pos[layer])) - proj.bias  # [T, H*d]
                grouped = z.reshape(len(z), self.groups, z.shape[1] // self.groups).transpose(0, 1)  # [groups, T, g*d]
                out[f"{layer}.{name}"] = (grouped @ basis).to(FLOAT_TYPES[self.dtype])  # [groups, T, r]
            # rotary keys are rebuilt at their positions, which the codec keeps but does not hand to
            # `unpack`: a copy, once when every layer has the same
            if self.basis(layer, "k")[0].rotary and (layer == 0 or not torch.equal(state.pos[layer], state.pos[0])):
                out[f"{layer}.pos"] = state.pos[layer].int()
        return out

    def unpack(self, parts: dict[str, Tensor], shapes: list[Shapes]) -> list[dict[str, Tensor]]:
        out = []
        for layer, layer_shapes in enumerate(shapes):
            tokens, dims = kv_dims(layer_shapes)
            pos = parts.get(f"{layer}.pos", parts.get("0.pos"))  # [T] int32, None unless keys are rotary
            dense = {}
            for name in ("k", "v"):
                proj, basis = self.basis(layer, name)
                z = parts[f"{layer}.{name}"].float() @ basis.transpose(1, 2)  # [groups, T, g*d]
                z = z.transpose(0, 1).reshape(tokens, proj.bias.shape[0]) + proj.bias  # [T, H*d]
                dense[name] = proj.after(unflat(z, dims.heads), pos)
            out.append(dense)
        return out

    def kv_bytes(self, tokens: int, dims: Dims) -> int:
        """Exact for the latents; the positions of rotary keys are counted in every layer (a bound: they
        are stored once when the layers keep the same tokens)."""
        (key, key_basis), (_, value_basis) = self.basis(0, "k"), self.basis(0, "v")
        latent = self.groups * (key_basis.shape[-1] + value_basis.shape[-1])
        return FLOAT_TYPES[self.dtype].itemsize * tokens * latent + (4 * tokens if key.rotary else 0)


def check_observation_window(policy: Policy, window: int, context: PolicyContext | None) -> None:
    """Refuse an observation window of more queries than the model reports statistics for (the last
    ModelConfig.obs_window of each extension); without a model there is nothing to check against."""
    if context is not None and context.model is not None:
        reported = context.model.cfg.obs_window
        policy.check(window <= reported, f"window must be at most the {reported} queries whose statistics the "
                     f"model reports (ModelConfig.obs_window), got {window}")


@register
@dataclass
class Think(KVStorage):
    """ThinK (Xu et al., ICLR 2025, "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv 2407.21018):
    prune the key channels that the current queries barely read. Channel c of a head scores
    ||Q_w[:, c] K[:, c]^T||_F, with Q_w the queries of the observation window (the request's last
    `window` queries; every query the model reports when None) and K the head's cached keys; each head
    keeps the fraction `keep` of its channels with the highest score, and the others are pruned from the
    keys of every cached token. Values are stored whole (ThinK's key-only variant); K and V in `dtype`.

    Q_w[:, c] K[:, c]^T is an outer product, so its Frobenius norm is ||Q_w[:, c]|| ||K[:, c]||: the
    model reports each window query's squared channels (`AttentionStats.query_energy`, on the state's
    head axis) and the score is computed exactly from them, without the w x T products (ThinK's own code
    ranks by the same product of norms). Under grouped-query attention the queries of a K/V head are
    those of all the query heads that read it, stacked.

    Deliberate differences:
    - when: ThinK prunes once, after the prompt's prefill, from the prompt's last queries. Here every
      request is such a prefill: the channels are chosen afresh each time the state is compressed
      (`observe`, after the token stage, so on the tokens it kept, as ThinK runs after SnapKV or H2O),
      from that request's window. A request of fewer than `window` events scores with the queries it
      has; one without events (no queries) leaves the choice as it is.
    - what is pruned: ThinK keeps its most recent 32 keys, and every key generated after the prompt,
      whole in a dense buffer beside the pruned cache. A blob holds one layout per tensor, so here
      every token's key, the window's included, keeps the same `keep` x d_k channels of its head.
    - what a pruned channel becomes: it is stored nowhere, so it is zero in the state the service goes
      on with (`observe` zeroes it, and a decode gives the same) and it cannot be restored. When a later
      request keeps it, the tokens extended since (whose keys the model made whole) have it and the
      older tokens hold zeros there; the score reads the keys as stored, so those zeros count against
      the channel, and a channel once pruned comes back only when the new queries read it enough.
    - a merged token's key counts once for every event it stands for (its weight), as attention does.
    - without queries (a state encoded without compressing, or compressed without statistics) |Q_w[:, c]|
      is taken as uniform: each head keeps its channels of most key energy.
    """

    name = "think"
    keep: float = 0.5
    dtype: str = "fp32"
    window: int | None = field(default=None, metadata={"none": "every query the model reports"})

    def __post_init__(self) -> None:
        self.check(0.0 < self.keep <= 1.0, f"keep must be in (0, 1], got {self.keep}")
        self.check(self.window is None or self.window >= 1, f"window must be >= 1, got {self.window}")
        float_type(self, self.dtype)

    def bind(self, context: PolicyContext | None) -> None:
        if self.window is not None:
            check_observation_window(self, self.window, context)

    def channels(self, d_k: int) -> int:
        return max(1, math.ceil(self.keep * d_k))

    def choose(self, state: State, layer: int, query_energy: Tensor) -> Tensor:
        """The kept channels [G, c] of each head of `layer`, ascending: the top of ThinK's score squared,
        ||Q_w[:, c]||^2 (query_energy [G, d_k]) x ||K[:, c]||^2 (every kept token's key, by weight)."""
        k = state.k[layer]  # [G, T, d_k]
        key_energy = (k.square() * state.weight[layer][None, :, None]).sum(1)  # [G, d_k]
        return torch.topk(query_energy * key_energy, self.channels(k.shape[2]), dim=1).indices.sort(dim=1).values

    def observe(self, state: State, stats: AttentionStats | None) -> None:
        """Choose each head's channels from this request's window and zero the others in every key."""
        if stats is None or stats.query_energy is None:
            return
        for layer in range(state.num_layers):
            energy = stats.query_energy[layer]  # [G, w, d_k], w >= 1: this call's last queries
            window = energy[:, -self.window:] if self.window is not None else energy
            kept = self.choose(state, layer, window.sum(1))  # [G, c]
            mask = torch.zeros(energy.shape[0], energy.shape[2], dtype=torch.bool, device=energy.device)
            mask.scatter_(1, kept, True)  # [G, d_k]
            state.k[layer] = state.k[layer] * mask[:, None, :]

    def pack_layer(self, state: State, layer: int) -> dict[str, Tensor]:
        # after `observe` at most c channels of a head are not zero, and those are the ones chosen (a
        # chosen channel that is zero too may give its place to another zero one: the same keys)
        k, v = state.k[layer], state.v[layer]  # [H, T, d_k], [H, T, d_v]
        idx = self.choose(state, layer, k.new_ones(k.shape[0], k.shape[2]))  # [H, c]
        dtype = FLOAT_TYPES[self.dtype]
        return {"ki": idx.short(), "k": k.gather(2, idx[:, None, :].expand(-1, k.shape[1], -1)).to(dtype),
                "v": v.to(dtype)}

    def unpack_layer(self, layer: int, parts: dict[str, Tensor], tokens: int, dims: Dims) -> tuple[Tensor, Tensor]:
        idx = parts["ki"].long()  # [H, c]
        k = torch.zeros(dims.heads, tokens, dims.d_k)
        k.scatter_(2, idx[:, None, :].expand(-1, tokens, -1), parts["k"].float())
        return k, parts["v"].float()

    def kv_bytes(self, tokens: int, dims: Dims) -> int:
        c = self.channels(dims.d_k)
        return 2 * dims.heads * c + FLOAT_TYPES[self.dtype].itemsize * dims.heads * tokens * (c + dims.d_v)
