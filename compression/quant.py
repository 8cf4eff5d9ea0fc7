"""Quantization kernels shared by the precision policies: bit packing, asymmetric and absmax scaling.

Scales and zero points are fp16 (as KIVI stores them): at 2 bits and groups of 32 an fp32 pair would
cost as much as the codes. The zero is rounded down to fp16, so no code falls below 0, and the scale to
the nearest fp16: values above the top code (by at most 2^bits x 2^-11 of a step) are clamped to it, so
every element is within half a step of its value, the bound the tests check. Codes are computed against
the rounded scale and zero, so a decoded group re-quantizes to itself wherever fp16 holds its zero to
within half a step (a zero under 2^9 steps from 0, as every K/V row's is: about half its range): its min
decodes to the zero, its max to the top code, and the scale recomputed from them is the stored one.
Re-encoding a decoded state gives the same blob, request after request.

Everything is whole-tensor torch code (a handful of passes over the data, no Python loop over tokens):
the codec runs on every request, and its target is a tenth of the service time.
"""

from __future__ import annotations

import torch
from torch import Tensor

FP16_MAX = 65504.0
_INF = torch.tensor(float("inf"), dtype=torch.float16)


def fp16(x: Tensor) -> Tensor:
    """The nearest fp16 to x (x float32), clamped to fp16's finite range."""
    return x.clamp(-FP16_MAX, FP16_MAX).half()


def fp16_down(x: Tensor) -> Tensor:
    """The largest fp16 <= x (x float32), clamped to fp16's finite range."""
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, -_INF), h).clamp(-FP16_MAX, FP16_MAX)


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """Codes q [..., n] uint8 < 2^bits (bits 2, 4 or 8) -> [..., ceil(n * bits / 8)] uint8, the first code
    in the lowest bits of each byte.

    The codes of a byte are gathered by one multiplication of a wider integer view of the code bytes:
    4 codes of 2 bits a, b, c, d in an int32 word a + b<<8 + c<<16 + d<<24, times 2^6 + 2^12 + 2^18 +
    2^24, hold a | b<<2 | c<<4 | d<<6 in their top byte (the other products land below bit 24 without
    carrying into it, or overflow away); 2 codes of 4 bits in an int16, times 2^4 + 2^8, likewise. Three
    passes over a quarter (a half) of the data. Views of bytes as wider integers assume little-endian.
    """
    n = q.shape[-1]
    if bits == 8 or n == 0:
        return q
    per = 8 // bits
    if n % per:
        q = torch.nn.functional.pad(q, (0, per - n % per))
    if bits == 4:
        return ((q.contiguous().view(torch.int16) * 0x0110) >> 8).to(torch.int8).view(torch.uint8)
    return ((q.contiguous().view(torch.int32) * 0x01041040) >> 24).to(torch.int8).view(torch.uint8)


_BYTE = torch.arange(256, dtype=torch.int32)
# the 4 codes of 2 bits in byte value b, as the bytes of an int32 (a lookup: one gather per packed byte)
_UNPACK2 = (_BYTE & 3) | ((_BYTE >> 2) & 3) << 8 | ((_BYTE >> 4) & 3) << 16 | ((_BYTE >> 6) & 3) << 24


def unpack_bits(p: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack_bits: p [..., m] uint8 -> [..., n] uint8 codes."""
    if bits == 8:
        return p
    if bits == 4:
        w = p.to(torch.int16)
        q = ((w | (w << 4)) & 0x0F0F).view(torch.uint8)  # [..., 2m]
    else:
        q = _UNPACK2.index_select(0, p.reshape(-1).int()).view(torch.uint8).view(*p.shape[:-1], 4 * p.shape[-1])
    return q if q.shape[-1] == n else q[..., :n]


def quantize_asym(x: Tensor, dim: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Min/max quantization of x (float32) along `dim` to `bits` 2 or 4 -> codes (uint8, shape of x),
    scale and zero (fp16, `dim` kept as 1). A constant group gets scale 1 and codes 0 (its value is the
    zero)."""
    q, scale, lo = asym_codes(x, dim, bits)
    return q.to(torch.int8).view(torch.uint8), scale, lo


def asym_codes(x: Tensor, dim: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """`quantize_asym` with the codes left as float32 integers."""
    qmax = (1 << bits) - 1
    lo = fp16_down(x.amin(dim, keepdim=True))
    low = lo.float()
    step = (x.amax(dim, keepdim=True) - low) / qmax
    scale = fp16(torch.where(step > 0, step, 1.0))
    scale = torch.where(scale > 0, scale, 1.0)  # a step below fp16's smallest
    return (x - low).mul_(scale.float().reciprocal()).round_().clamp_(0, qmax), scale, lo


def dequantize_asym(q: Tensor, scale: Tensor, zero: Tensor, out: Tensor | None = None) -> Tensor:
    """q * scale + zero in float32 (broadcasting), as two correctly rounded operations, so that the
    same code, scale and zero give the same value whatever the tensor's shape (a fused multiply-add in
    a vectorised body but not in its scalar tail would not): KIVI recognises a key it stored this way.
    The result is written into `out` (a view of its shape, e.g. a slice of a larger tensor) when given:
    the codes are copied into it (exactly: small integers), then scaled and shifted in place."""
    x = q.float() if out is None else out.copy_(q)  # a mixed uint8 x float32 multiply is slower
    return x.mul_(scale.float()).add_(zero.float())


def absmax_scale(x: Tensor, limit: float) -> Tensor:
    """Per-row (last dim) fp16 scale mapping the row's largest magnitude to `limit` (to the nearest fp16:
    codes are clamped to +-limit); 1 for zero rows. Two reductions rather than |x| (a full copy)."""
    s = fp16(torch.maximum(x.amax(-1, keepdim=True), -x.amin(-1, keepdim=True)) / limit)
    return torch.where(s > 0, s, torch.ones_like(s))
