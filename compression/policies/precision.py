"""Precision level: the same tokens, fewer bits per number.

The per-tensor formats (fp16, bf16, fp8, int8, int4) encode any state's tensors row by row (a row is
one token of one head, or one row of a fixed-size matrix); KIVI and IntactKV are built for keys and
values. All formats quantize each head's K and V separately. Per-token formats (int8, int4, fp8) give every
token its own scale, so one token's outlier cannot spoil the others; KIVI observes that keys have outlier
*channels* and so quantizes keys per channel (across a group of tokens) and values per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kvrec.compression.base import Dims, KVStorage, PerTensor
from kvrec.compression.quant import FP16_MAX, absmax_scale, dequantize_asym, pack_bits, quantize_asym, unpack_bits
from kvrec.compression.registry import register
from kvrec.models.state import State
from torch import Tensor

FP8_MAX = 448.0  # largest finite float8 e4m3fn


def quantize_tokens(x: Tensor, bits: int, group: int) -> dict[str, Tensor]:
    """Per-row quantization of x [..., d] (a row is one token of one head, or one row of a fixed matrix):
    bits 8 is symmetric absmax with an fp32 scale per row; bits 4 or 2 is asymmetric per group of `group`
    channels with fp16 scale and zero, codes packed."""
    *rows, d = x.shape
    if bits == 8:
        scale = absmax_scale(x, 127.0)  # [..., 1]
        return {"q": (x / scale).round().clamp(-127, 127).to(torch.int8), "s": scale}
    g = group_size(d, group)
    q, scale, zero = quantize_asym(x.reshape(*rows, d // g, g), -1, bits)  # q [..., d/g, g], scale [..., d/g, 1]
    return {"q": pack_bits(q.reshape(*rows, d), bits), "s": scale.reshape(*rows, d // g),
            "z": zero.reshape(*rows, d // g)}


def dequantize_tokens(parts: dict[str, Tensor], bits: int, group: int, d: int) -> Tensor:
    if bits == 8:
        return parts["q"].float() * parts["s"]
    scale = parts["s"]
    *rows, ngroups = scale.shape
    q = unpack_bits(parts["q"], bits, d).reshape(*rows, ngroups, d // ngroups)
    return dequantize_asym(q, scale[..., None], parts["z"][..., None]).reshape(*rows, d)


def token_quant_bytes(rows: int, d: int, bits: int, group: int) -> int:
    """Bytes that `quantize_tokens` writes for `rows` rows of d channels."""
    if bits == 8:
        return rows * (d + 4)
    return rows * (math.ceil(d * bits / 8) + 4 * (d // group_size(d, group)))


def group_size(d: int, group: int) -> int:
    """`group` when it divides d, else the whole head dimension (one group per token and head)."""
    return group if d % group == 0 else d


def prefixed(prefix: str, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + name: t for name, t in parts.items()}


def unprefixed(prefix: str, parts: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name[len(prefix):]: t for name, t in parts.items() if name.startswith(prefix)}


class Cast(PerTensor):
    """Tensors stored in a narrower float type, clamped to its finite range."""

    dtype: torch.dtype
    limit: float

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        return {"": x.clamp(-self.limit, self.limit).to(self.dtype)}

    def decode(self, parts: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        return parts[""].float()

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return self.dtype.itemsize * math.prod(shape)


@register
@dataclass
class FP16(Cast):
    """IEEE half precision (the storage format of most LLM KV caches): 2x, nearly lossless."""

    name = "fp16"
    dtype = torch.float16
    limit = FP16_MAX


@register
@dataclass
class BF16(Cast):
    """bfloat16: fp32's range with 8 bits of mantissa; 2x, coarser than fp16 for values near 1."""

    name = "bf16"
    dtype = torch.bfloat16
    limit = float(torch.finfo(torch.bfloat16).max)


@register
@dataclass
class FP8(PerTensor):
    """float8 e4m3 codes with an fp32 absmax scale per token and head (the FP8 KV caches of vLLM and
    TensorRT-LLM): about 4x."""

    name = "fp8"

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        scale = absmax_scale(x, FP8_MAX)  # [..., 1]
        return {"q": (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), "s": scale}

    def decode(self, parts: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        return parts["q"].float() * parts["s"]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) + 4 * math.prod(shape[:-1])


@register
@dataclass
class Int8(PerTensor):
    """Symmetric int8 with an fp32 absmax scale per token and head (per-token quantization as in
    ZeroQuant / LLM.int8's vector-wise scheme): about 4x."""

    name = "int8"

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        return quantize_tokens(x, 8, 0)

    def decode(self, parts: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        return dequantize_tokens(parts, 8, 0, shape[-1])

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return token_quant_bytes(math.prod(shape[:-1]), shape[-1], 8, 0)


@register
@dataclass
class Int4(PerTensor):
    """Asymmetric 4-bit codes per group of `group` channels of each token, fp16 scale and zero per group
    (the group-wise scheme of FlexGen / Atom KV quantization): about 6x at group 32."""

    name = "int4"
    group: int = 32

    def __post_init__(self) -> None:
        self.check(self.group >= 1, f"group must be >= 1, got {self.group}")

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        return quantize_tokens(x, 4, self.group)

    def decode(self, parts: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        return dequantize_tokens(parts, 4, self.group, shape[-1])

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return token_quant_bytes(math.prod(shape[:-1]), shape[-1], 4, self.group)


@register
@dataclass
class Kivi(KVStorage):
    """KIVI (Liu et al., ICML 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

    Keys are quantized per channel over groups of `group` consecutive tokens, values per token (groups of
    `group` channels), both asymmetric with `bits` 2 or 4; the most recent tokens stay in fp32: the last
    `residual` always, plus those that do not yet fill a whole key group (so between `residual` and
    `residual + group - 1`). Groups are counted from the oldest kept token, so without eviction a group,
    once quantized, holds the same tokens in every later blob and re-encoding it changes nothing.
    """

    name = "kivi"
    bits: int = 2
    residual: int = 32
    group: int = 32

    def __post_init__(self) -> None:
        self.check(self.bits in (2, 4), f"bits must be 2 or 4, got {self.bits}")
        self.check(self.residual >= 0, f"residual must be >= 0, got {self.residual}")
        self.check(self.group >= 1, f"group must be >= 1, got {self.group}")

    def quantized_tokens(self, tokens: int) -> int:
        return max(tokens - self.residual, 0) // self.group * self.group

    def pack_layer(self, state: State, layer: int) -> dict[str, Tensor]:
        k, v = state.k[layer], state.v[layer]  # [H, T, d_k], [H, T, d_v]
        h, t, d_k = k.shape
        n = self.quantized_tokens(t)
        kq, ks, kz = quantize_asym(k[:, :n].reshape(h, n // self.group, self.group, d_k), 2, self.bits)
        # kq [H, n/G, G, d_k]; ks, kz [H, n/G, 1, d_k]: one scale per channel and token group
        return {"kq": pack_bits(kq.reshape(h, n * d_k), self.bits), "ks": ks, "kz": kz,
                **prefixed("v", quantize_tokens(v[:, :n], self.bits, self.group)),
                "kr": k[:, n:].float(), "vr": v[:, n:].float()}

    def unpack_layer(self, layer: int, parts: dict[str, Tensor], tokens: int, dims: Dims) -> tuple[Tensor, Tensor]:
        n = self.quantized_tokens(tokens)
        kq = unpack_bits(parts["kq"], self.bits, n * dims.d_k)
        kq = kq.reshape(dims.heads, n // self.group, self.group, dims.d_k)
        k = dequantize_asym(kq, parts["ks"], parts["kz"]).reshape(dims.heads, n, dims.d_k)
        v_parts = unprefixed("v", {p: x for p, x in parts.items() if p != "vr"})
        v = dequantize_tokens(v_parts, self.bits, self.group, dims.d_v)
        return torch.cat([k, parts["kr"]], 1), torch.cat([v, parts["vr"]], 1)

    def kv_bytes(self, tokens: int, dims: Dims) -> int:
        """Monotone bound: every token priced as quantized plus a full-precision tail of the largest size."""
        h = dims.heads
        keys = h * math.ceil(tokens * dims.d_k * self.bits / 8) + 4 * h * math.ceil(tokens / self.group) * dims.d_k
        values = token_quant_bytes(h * tokens, dims.d_v, self.bits, self.group)
        tail = 4 * h * min(tokens, self.residual + self.group - 1) * (dims.d_k + dims.d_v)
        return keys + values + tail


@register
@dataclass
class Intact(KVStorage):
    """IntactKV (Liu et al., ACL Findings 2024, "IntactKV: Improving Large Language Model Quantization by
    Keeping Pivot Tokens Intact").

    A few pivot tokens are kept in fp32 and the rest quantized per token (`bits` 8, or 4 with groups of
    `group` channels). IntactKV's pivots are the attention sinks; here they are the `sink` oldest kept
    tokens plus the `pivots` tokens with the highest accumulated attention (`extras["acc"]`, summed over
    heads: for HSTU the magnitude with which a key's value has entered the outputs so far).
    """

    name = "intact"
    uses_acc = True
    sink: int = 4
    pivots: int = 16
    bits: int = 8
    group: int = 32

    def __post_init__(self) -> None:
        self.check(self.bits in (4, 8), f"bits must be 4 or 8, got {self.bits}")
        self.check(self.sink >= 0 and self.pivots >= 0, "sink and pivots must be >= 0")
        self.check(self.group >= 1, f"group must be >= 1, got {self.group}")

    def pivot_index(self, state: State, layer: int) -> Tensor:
        """Ascending indices [P] of the pivot tokens of `layer`."""
        t = state.tokens(layer)
        sink = min(self.sink, t)
        score = state.extras["acc"][layer].sum(0)[sink:]  # [T - sink]
        top = torch.topk(score, min(self.pivots, t - sink)).indices + sink
        return torch.cat([torch.arange(sink), top]).sort().values

    def pack_layer(self, state: State, layer: int) -> dict[str, Tensor]:
        k, v = state.k[layer], state.v[layer]
        pivots = self.pivot_index(state, layer)
        rest = torch.ones(k.shape[1], dtype=torch.bool)
        rest[pivots] = False
        return {"pi": pivots.int(), "pk": k[:, pivots].float(), "pv": v[:, pivots].float(),
                **prefixed("k", quantize_tokens(k[:, rest], self.bits, self.group)),
                **prefixed("v", quantize_tokens(v[:, rest], self.bits, self.group))}

    def unpack_layer(self, layer: int, parts: dict[str, Tensor], tokens: int, dims: Dims) -> tuple[Tensor, Tensor]:
        pivots = parts["pi"].long()
        rest = torch.ones(tokens, dtype=torch.bool)
        rest[pivots] = False
        out = []
        for name, d in (("k", dims.d_k), ("v", dims.d_v)):
            x = torch.empty(dims.heads, tokens, d)
            x[:, pivots] = parts["p" + name]
            x[:, rest] = dequantize_tokens(unprefixed(name, {p: t for p, t in parts.items() if p[0] == name}),
                                           self.bits, self.group, d)
            out.append(x)
        return out[0], out[1]

    def kv_bytes(self, tokens: int, dims: Dims) -> int:
        p = min(tokens, self.sink + self.pivots)
        h = dims.heads
        return (4 * p + 4 * h * p * (dims.d_k + dims.d_v)
                + token_quant_bytes(h * tokens, dims.d_k, self.bits, self.group)
                + token_quant_bytes(h * tokens, dims.d_v, self.bits, self.group))
