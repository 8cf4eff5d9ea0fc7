"""The two reference points every other policy is measured against."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvrec.compression.base import PerTensor, Policy
from kvrec.compression.registry import register
from torch import Tensor


@register
@dataclass
class Full(PerTensor):
    """Uncompressed fp32 tensors: the cached state exactly as the model computed it."""

    name = "full"

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        return {"": x.float()}

    def decode(self, parts: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        return parts[""]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return 4 * math.prod(shape)


@register
@dataclass
class Recompute(Policy):
    """No state at all: every request re-runs the whole history (the quadratic baseline that caching
    beats; its accuracy is by construction that of `full`)."""

    name = "recompute"
    role = "baseline"
