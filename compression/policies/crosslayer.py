"""Layer level: adjacent layers share what they have in common."""

from __future__ import annotations

from dataclasses import dataclass

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

    Layers are paired (0-1, 2-3, ...). For a token present in both layers of a pair (same position) whose
    K and V directions agree in every head (cosine >= `threshold`), the blob stores one shared direction
    (the SLERP midpoint of the two unit vectors, which at t = 1/2 is their normalised sum) and each
    layer's magnitude (fp32); the other tokens are retained as they are. Directions and retained tokens
    are stored in `dtype`.
    """

    name = "minicache"
    threshold: float = 0.8
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        self.check(0.0 < self.threshold <= 1.0, f"threshold must be in (0, 1], got {self.threshold}")
        float_type(self, self.dtype)

    def pack(self, state: State) -> dict[str, Tensor]:
        dtype = FLOAT_TYPES[self.dtype]
        out: dict[str, Tensor] = {}
        for a in range(0, state.num_layers, 2):
            b = a + 1
            if b == state.num_layers:  # odd layer out
                out[f"{a}.k"], out[f"{a}.v"] = state.k[a].to(dtype), state.v[a].to(dtype)
                break
            ia = torch.isin(state.pos[a], state.pos[b]).nonzero()[:, 0]  # [M] shared tokens, in pos order
            ib = torch.isin(state.pos[b], state.pos[a]).nonzero()[:, 0]
            agree = torch.ones(len(ia), dtype=torch.bool)
            for x in (state.k, state.v):
                agree &= F.cosine_similarity(x[a][:, ia], x[b][:, ib], dim=-1).amin(0) >= self.threshold
            ia, ib = ia[agree], ib[agree]
            out[f"{a}.mi"], out[f"{b}.mi"] = ia.int(), ib.int()
            for name, x in (("k", state.k), ("v", state.v)):
                xa, xb = x[a][:, ia], x[b][:, ib]  # [H, M, d]
                out[f"{a}.d{name}"] = F.normalize(F.normalize(xa, dim=-1) + F.normalize(xb, dim=-1), dim=-1).to(dtype)
                out[f"{a}.n{name}"] = torch.stack([xa.norm(dim=-1), xb.norm(dim=-1)])  # [2, H, M]
                for layer, merged in ((a, ia), (b, ib)):
                    out[f"{layer}.{name}"] = x[layer][:, retained(state.tokens(layer), merged)].to(dtype)
        return out

    def unpack(self, parts: dict[str, Tensor], shapes: list[Shapes]) -> list[dict[str, Tensor]]:
        tokens = [kv_dims(layer_shapes)[0] for layer_shapes in shapes]
        dims = kv_dims(shapes[0])[1] if shapes else None
        out: list[dict[str, Tensor]] = [{} for _ in shapes]
        for a in range(0, len(tokens), 2):
            if a + 1 == len(tokens):
                out[a] = {"k": parts[f"{a}.k"].float(), "v": parts[f"{a}.v"].float()}
                break
            for name, d in (("k", dims.d_k), ("v", dims.d_v)):
                direction, norms = parts[f"{a}.d{name}"].float(), parts[f"{a}.n{name}"]
                for side, layer in enumerate((a, a + 1)):
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
