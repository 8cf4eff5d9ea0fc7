"""The two reference points every other policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from kvrec.compression.base import Dims, Policy, Storage
from kvrec.compression.registry import register
from kvrec.models.state import State
from torch import Tensor


@register
@dataclass
class Full(Storage):
    """Uncompressed fp32 K/V: the cached state exactly as the model computed it."""

    name = "full"

    def pack_layer(self, state: State, layer: int) -> dict[str, Tensor]:
        return {"k": state.k[layer].float(), "v": state.v[layer].float()}  # [H, T, d_k], [H, T, d_v]

    def unpack_layer(self, layer: int, parts: dict[str, Tensor], tokens: int, dims: Dims) -> tuple[Tensor, Tensor]:
        return parts["k"], parts["v"]

    def kv_bytes(self, tokens: int, dims: Dims) -> int:
        return 4 * dims.heads * tokens * (dims.d_k + dims.d_v)


@register
@dataclass
class Recompute(Policy):
    """No state at all: every request re-runs the whole history (the quadratic baseline that caching
    beats; its accuracy is by construction that of `full`)."""

    name = "recompute"
    role = "baseline"
