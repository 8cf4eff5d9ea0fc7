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
from kvrec.compression.base import Dims, KVStorage, PolicyContext, PolicyError, Shapes, Storage, kv_dims
from kvrec.compression.registry import register
from kvrec.models.hstu import HSTUBlock
from kvrec.models.recommender import SequentialRecommender
from kvrec.models.sasrec import SASRecBlock, rotate
from kvrec.models.state import State
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


@register
@dataclass
class Think(KVStorage):
    """Query-agnostic key-channel pruning (ThinK's pruning without its queries): keep the fraction `keep`
    of each head's key channels with the largest weighted L2 norm over the kept tokens.

    ThinK (Xu et al., ICLR 2025, "ThinK: Thinner Key Cache by Query-Driven Pruning") scores channel c of
    a head by |Q_c| |K_c|, with Q the queries of the observation window, so that the channels kept are
    those the current queries read. A storage policy sees only the state, and `AttentionStats` carry no
    queries, so here |Q_c| is taken as uniform and the score is the key norm alone: a heuristic, not
    ThinK (the model and pipeline changes that make it ThinK are in the closing note of issue 12).
    Pruned channels decode as zeros, so once a channel is pruned its norm over the old tokens is gone
    and the same channels tend to stay chosen request after request. Values are untouched; K and V are
    stored in `dtype`."""

    name = "think"
    keep: float = 0.5
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        self.check(0.0 < self.keep <= 1.0, f"keep must be in (0, 1], got {self.keep}")
        float_type(self, self.dtype)

    def channels(self, d_k: int) -> int:
        return max(1, math.ceil(self.keep * d_k))

    def pack_layer(self, state: State, layer: int) -> dict[str, Tensor]:
        k, v = state.k[layer], state.v[layer]  # [H, T, d_k], [H, T, d_v]
        score = (k.square() * state.weight[layer][None, :, None]).sum(1)  # [H, d_k]
        idx = torch.topk(score, self.channels(k.shape[2]), dim=1).indices.sort(dim=1).values  # [H, c]
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
