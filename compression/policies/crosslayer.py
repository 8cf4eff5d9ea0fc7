"""Layer level: adjacent layers share what they have in common."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from kvrec.compression.base import Dims, KVStorage, Shapes, kv_dims
from kvrec.compression.policies.lowrank import FLOAT_TYPES, float_type
from kvrec.compression.registry import register
from kvrec.models.state import State
from torch import Tensor


@register
@dataclass
class MiniCache(KVStorage):
    """MiniCache (Liu et al., NeurIPS 2024, "MiniCache: KV Cache Compression in Depth Dimension").

    From mid-depth on (layer `start`, by default half the layers rounded down) layers are paired (start
    and start + 1, then start + 2 and start + 3, ...), because the paper finds adjacent layers' K/V
    similar only in the deeper half. For a token present in both layers of a pair (same position)
    whose K and V directions agree in every head (cosine >= `threshold`, the paper's retention rule
    that keeps dissimilar tokens apart), the blob stores one shared direction (the SLERP midpoint of
    the two unit vectors, at t = 1/2 their normalised sum) and each layer's magnitude (fp32); the
    other tokens, and every layer before `start` or left without a partner, are retained as they are.
    Directions and retained tokens are stored in `dtype`.

    So a model too shallow to have a pair at mid-depth (2 layers: start 1, no partner) merges nothing,
    as the paper would. `merged_tokens` counts the token pairs stored as one shared direction and
    `paired_tokens` the tokens that sat in both layers of a pair (the most that could merge), summed
    over every state this policy has packed, so a report can say what fraction merged and flag a run
    that merged nothing instead of showing the dtype cast as a compression.

    Deliberate differences: the paper interpolates at t = 0.6 and measures similarity on whole token
    vectors; here t = 1/2 (neither layer favoured, so one rule serves K and V of both layers) and
    every head must agree, since heads of one token are stored together.
    """

    name = "minicache"
    threshold: float = 0.8
    dtype: str = "fp32"
    start: int | None = None
    merged_tokens: int = field(default=0, init=False, compare=False)
    paired_tokens: int = field(default=0, init=False, compare=False)

    def __post_init__(self) -> None:
        self.check(0.0 < self.threshold <= 1.0, f"threshold must be in (0, 1], got {self.threshold}")
        self.check(self.start is None or self.start >= 0, f"start must be >= 0, got {self.start}")
        float_type(self, self.dtype)

    def pairs(self, layers: int) -> list[tuple[int, int]]:
        """The layer pairs that may share directions: (start, start + 1), (start + 2, start + 3), ..."""
        start = layers // 2 if self.start is None else self.start
        return [(a, a + 1) for a in range(start, layers - 1, 2)]

    def pack(self, state: State) -> dict[str, Tensor]:
        dtype = FLOAT_TYPES[self.dtype]
        out: dict[str, Tensor] = {}
        paired = set()
        for a, b in self.pairs(state.num_layers):
            paired |= {a, b}
            ia = torch.isin(state.pos[a], state.pos[b]).nonzero()[:, 0]  # [M] shared tokens, in pos order
            ib = torch.isin(state.pos[b], state.pos[a]).nonzero()[:, 0]
            agree = torch.ones(len(ia), dtype=torch.bool)
            for x in (state.k, state.v):
                agree &= F.cosine_similarity(x[a][:, ia], x[b][:, ib], dim=-1).amin(0) >= self.threshold
            self.paired_tokens += len(ia)
            ia, ib = ia[agree], ib[agree]
            self.merged_tokens += len(ia)
            out[f"{a}.mi"], out[f"{b}.mi"] = ia.int(), ib.int()
            for name, x in (("k", state.k), ("v", state.v)):
                xa, xb = x[a][:, ia], x[b][:, ib]  # [H, M, d]
                out[f"{a}.d{name}"] = F.normalize(F.normalize(xa, dim=-1) + F.normalize(xb, dim=-1), dim=-1).to(dtype)
                out[f"{a}.n{name}"] = torch.stack([xa.norm(dim=-1), xb.norm(dim=-1)])  # [2, H, M]
                for layer, merged in ((a, ia), (b, ib)):
                    out[f"{layer}.{name}"] = x[layer][:, retained(state.tokens(layer), merged)].to(dtype)
        for layer in set(range(state.num_layers)) - paired:
            out[f"{layer}.k"], out[f"{layer}.v"] = state.k[layer].to(dtype), state.v[layer].to(dtype)
        return out

    def unpack(self, parts: dict[str, Tensor], shapes: list[Shapes]) -> list[dict[str, Tensor]]:
        tokens = [kv_dims(layer_shapes)[0] for layer_shapes in shapes]
        out: list[dict[str, Tensor]] = [{"k": parts[f"{layer}.k"].float(), "v": parts[f"{layer}.v"].float()}
                                        for layer in range(len(shapes))]
        for a, b in self.pairs(len(shapes)):
            dims = kv_dims(shapes[a])[1]
            for name, d in (("k", dims.d_k), ("v", dims.d_v)):
                direction, norms = parts[f"{a}.d{name}"].float(), parts[f"{a}.n{name}"]
                for side, layer in enumerate((a, b)):
                    merged = parts[f"{layer}.mi"].long()
                    x = torch.empty(dims.heads, tokens[layer], d)
                    x[:, merged] = direction * norms[side][..., None]
                    x[:, retained(tokens[layer], merged)] = parts[f"{layer}.{name}"].float()
                    out[layer][name] = x
        return out

    def kv_bytes(self, tokens: int, dims: Dims) -> int:
        """Bound: nothing merges (a merged pair costs less than two retained tokens)."""
        return FLOAT_TYPES[self.dtype].itemsize * dims.heads * tokens * (dims.d_k + dims.d_v)


def retained(tokens: int, merged: Tensor) -> Tensor:
    """Boolean mask [T] of the tokens not in `merged`."""
    mask = torch.ones(tokens, dtype=torch.bool)
    mask[merged] = False
    return mask
