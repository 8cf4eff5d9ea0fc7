"""Quantization kernels shared by the precision policies: bit packing, asymmetric and absmax scaling.

Scales and zero points of the low-bit formats are fp16 (as KIVI stores them): at 2 bits and groups of
32 an fp32 pair would cost as much as the codes. Codes are computed against the fp16-rounded scale and
zero, so dequantize(quantize(x)) is what a re-encode starts from, and re-encoding is a fixed point up to
rounding: the group's min and max survive exactly (codes 0 and 2^bits - 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

FP16_MAX = 65504.0


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """q [..., n] uint8 codes < 2^bits (bits in 1, 2, 4, 8) -> [..., ceil(n * bits / 8)] uint8."""
    if bits == 8:
        return q
    per = 8 // bits
    m = -(-q.shape[-1] // per)
    q = torch.nn.functional.pad(q, (0, m * per - q.shape[-1])).view(*q.shape[:-1], m, per)  # [..., m, per]
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    return (q << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(p: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack_bits: p [..., m] uint8 -> [..., n] uint8 codes."""
    if bits == 8:
        return p
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    q = (p[..., None] >> shifts) & ((1 << bits) - 1)  # [..., m, per]
    return q.flatten(-2)[..., :n]


def quantize_asym(x: Tensor, dim: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Min/max quantization along `dim` -> codes (uint8, shape of x), scale and zero (fp16, dim kept as 1)."""
    qmax = (1 << bits) - 1
    lo = x.amin(dim, keepdim=True).clamp(-FP16_MAX, FP16_MAX).half()
    hi = x.amax(dim, keepdim=True).clamp(-FP16_MAX, FP16_MAX)
    scale = ((hi - lo.float()) / qmax).half()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code is 0
    q = ((x - lo.float()) / scale.float()).round().clamp(0, qmax).to(torch.uint8)
    return q, scale, lo


def dequantize_asym(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return zero.float() + q.float() * scale.float()


def absmax_scale(x: Tensor, limit: float) -> Tensor:
    """Per-row (last dim) fp32 scale mapping the row's largest magnitude to `limit`; 1 for zero rows."""
    s = x.abs().amax(-1, keepdim=True) / limit
    return torch.where(s > 0, s, torch.ones_like(s))
