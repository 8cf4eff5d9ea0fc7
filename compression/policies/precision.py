"""Precision level: the same tokens, fewer bits per number.

The per-tensor formats (fp16, bf16, fp8, int8, int4) encode any state's tensors row by row (a row is
one token of one head, or one row of a fixed-size matrix); KIVI and IntactKV are built for keys and
values. All formats quantize each head's K and V separately. Per-token formats (int8, int4, fp8) give every
token its own scale, so one token's outlier cannot spoil the others; KIVI observes that keys have outlier
*channels* and so quantizes keys per channel (across a group of tokens) and values per token.

Scales and zero points are fp16 (see `quant`): with fp32 ones int8 gave 3.4x where 3.8x is the limit.
Each format's `nbytes` / `kv_bytes` is exactly what it writes (tests/test_storage_bytes.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from kvrec.compression.base import READ, Dims, KVStorage, PerTensor, Policy, Shapes, kv_dims, layer_parts
from kvrec.compression.quant import (
    FP16_MAX,
    absmax_scale,
    dequantize_asym,
    pack_bits,
    quantize_asym,
    unpack_bits,
)
from kvrec.compression.registry import register
from kvrec.compression.selection import heavy_hitter_score
from kvrec.models.state import LayerState, State
from torch import Tensor

FP8_MAX = 448.0  # largest finite float8 e4m3fn


def quantize_tokens(x: Tensor, bits: int, group: int) -> dict[str, Tensor]:
    """Per-row quantization of x [..., d] (a row is one token of one head, or one row of a fixed matrix):
    bits 8 is symmetric absmax with an fp16 scale per row ("q" int8 [..., d], "s" [..., 1]); bits 4 or 2
    is asymmetric per group of `group` channels with fp16 scale and zero ("s", "z" [..., d/g]), codes
    packed ("q" uint8 [..., d * bits / 8])."""
    *rows, d = x.shape
    if bits == 8:
        scale = absmax_scale(x, 127.0)  # [..., 1]
        return {"q": (x / scale.float()).round_().clamp_(-127, 127).to(torch.int8), "s": scale}
    g = group_size(d, group)
    q, scale, zero = quantize_asym(x.reshape(*rows, d // g, g), -1, bits)  # q [..., d/g, g], scale [..., d/g, 1]
    return {"q": pack_bits(q.reshape(*rows, d), bits), "s": scale.reshape(*rows, d // g),
            "z": zero.reshape(*rows, d // g)}


def dequantize_tokens(parts: dict[str, Tensor], bits: int, group: int, d: int, out: Tensor | None = None) -> Tensor:
    """Inverse of `quantize_tokens`: [..., d] float32, written into `out` (a view of that shape) if given."""
    if bits == 8:
        q = parts["q"].float() if out is None else out.copy_(parts["q"])
        return q.mul_(parts["s"].float())
    scale = parts["s"]
    *rows, ngroups = scale.shape
    q = unpack_bits(parts["q"], bits, d).reshape(*rows, ngroups, d // ngroups)
    grouped = None if out is None else out.view(*rows, ngroups, d // ngroups)
    return dequantize_asym(q, scale[..., None], parts["z"][..., None], grouped).view(*rows, d)


def token_quant_bytes(rows: int, d: int, bits: int, group: int) -> int:
    """Bytes that `quantize_tokens` writes for `rows` rows of d channels."""
    if bits == 8:
        return rows * (d + 2)
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
    """float8 e4m3 codes with an fp16 absmax scale per token and head (the FP8 KV caches of vLLM and
    TensorRT-LLM): about 4x."""

    name = "fp8"

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        scale = absmax_scale(x, FP8_MAX)  # [..., 1]
        return {"q": (x / scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), "s": scale}

    def decode(self, parts: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        return parts["q"].float() * parts["s"].float()

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) + 2 * math.prod(shape[:-1])


@register
@dataclass
class Int8(PerTensor):
    """Symmetric int8 with an fp16 absmax scale per token and head (per-token quantization as in
    ZeroQuant / LLM.int8's vector-wise scheme): 3.8x at d = 32."""

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
    batched = True
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

    Keys are quantized per channel over groups of `group` tokens, values per token (groups of `group`
    channels), both asymmetric with `bits` 2 or 4 and an fp16 scale and zero per group. As in KIVI's
    streaming cache, a value leaves full precision (fp32, the model's own) once `residual` newer tokens
    follow it, and keys once `group` of them have: the last `residual` values and between `residual`
    and `residual + group - 1` keys are exact.

    What is quantized stays as it was stored. A key group, once quantized, is a stored unit: when a
    token policy evicts some of its tokens, the survivors keep their codes against the group's own
    scale and zero instead of being regrouped and quantized again, which compounds the error request
    after request (random eviction at 2 bits: key error 0.27 -> 0.39 over 40 requests, where it stays at
    0.26 here). The keys are stored as runs of consecutive tokens, a quantized run (packed codes per
    token and one scale and zero per head and channel) or an exact one, so a group thinned by eviction
    costs its scale and zero for fewer tokens (`layer_bound` prices that for byte budgets). Between
    requests each token carries what was stored for it (`carries`, see `Storage`: key and value codes,
    its group's scale and zero, its run), so a request re-emits untouched tokens as they were and
    quantizes only the new ones: the codec does no arithmetic on the history it already holds.

    Deliberate differences: (1) a key a token stage rewrote (a survivor that merged evicted tokens, a
    sink StreamingLLM moved) keeps its own group if it still decodes to it (HSTU's moved sinks), else is
    quantized against the group beside it (the one before it, else after), codes clamped to that
    group's range, so a rewrite costs no new group; with no group beside it, it waits with the new
    tokens. (2) Under eviction the new tokens that fill a group need not be adjacent: groups form from
    the oldest unquantized keys in token order, whole groups only. (3) A token stage that keeps fewer
    than `residual + group` tokens per layer would leave every key exact forever: the pair is refused
    (`check_token_stage`).
    """

    name = "kivi"
    # per layer, token axis last: packed key codes [H, kb, T] (kb = d_k * bits / 8), the key's group
    # scale and zero [2, H, d_k, T] fp16, its run in the blob [T] int64 (0: exact key), packed value
    # codes [H, vb, T], value scales and zeros [2, H, d_v / group, T] fp16 (0: exact value), READ
    carries = ("kivi_k", "kivi_ks", "kivi_run", "kivi_v", "kivi_vs", READ)
    bits: int = 2
    residual: int = 32
    group: int = 32

    def __post_init__(self) -> None:
        self.check(self.bits in (2, 4), f"bits must be 2 or 4, got {self.bits}")
        self.check(self.residual >= 0, f"residual must be >= 0, got {self.residual}")
        self.check(self.group >= 1, f"group must be >= 1, got {self.group}")
        # run lengths are int16: a quantized run is at most a group, an exact one below residual + group
        self.check(self.residual + self.group <= 32767, "residual + group must be at most 32767")

    def check_token_stage(self, token: Policy | None) -> None:
        budget = None if token is None else token.token_budget()
        keep = self.residual + self.group
        self.check(budget is None or budget >= keep,
                   f"{token.spec() if token else ''} keeps {budget} tokens per layer (pyramid: on average), and "
                   f"keys are quantized only in groups of {self.group} with {self.residual} newer tokens after "
                   f"them, so nothing would ever be quantized; keep at least {keep} tokens or lower residual")

    # ------------------------------------------------------------------------------------------ pack

    def carried(self, state: State, layer: int, heads: int, d_k: int, d_v: int) -> dict[str, Tensor]:
        """The layer's carried record, or an empty one (every token new) when the state has none."""
        if READ in state.extras:
            return {name: state.extras[name][layer] for name in self.carries}
        t = state.tokens(layer)
        return {"kivi_k": torch.zeros(heads, self.code_bytes(d_k), t, dtype=torch.uint8),
                "kivi_ks": torch.zeros(2, heads, d_k, t, dtype=torch.float16),
                "kivi_run": torch.zeros(t, dtype=torch.long),
                "kivi_v": torch.zeros(heads, self.code_bytes(d_v), t, dtype=torch.uint8),
                "kivi_vs": torch.zeros(2, heads, d_v // group_size(d_v, self.group), t, dtype=torch.float16),
                READ: torch.zeros(2, t, dtype=torch.float64)}

    def code_bytes(self, d: int) -> int:
        return math.ceil(d * self.bits / 8)

    def pack_layer(self, state: State, layer: int) -> dict[str, Tensor]:
        part = state.layers[layer]
        k, v = part.tokens["k"].float(), part.tokens["v"].float()  # [H, T, d_k], [H, T, d_v]
        old = self.carried(state, layer, k.shape[0], k.shape[2], v.shape[2])
        untouched = (old[READ][0] == part.pos + 1) & (old[READ][1] == part.weight)  # [T]: as read
        return {**self.pack_keys(k, old, untouched), **self.pack_values(v, old, untouched)}

    def pack_keys(self, k: Tensor, old: dict[str, Tensor], untouched: Tensor) -> dict[str, Tensor]:
        heads, t, d = k.shape
        run, sz = old["kivi_run"], old["kivi_ks"]  # [T] (sums where merged), [2, H, d_k, T]
        stored = self.stored_groups(run, untouched)
        if stored is not None:
            return self.append_groups(k, old, stored)
        recent = torch.arange(t) >= t - self.residual
        # each quantized key's group: an id (one id, one scale and zero) and `column`, where its scale and
        # zero are: a column of `sz` (its own or a neighbour's), or -1 - g for the g-th new group
        ids = torch.where(untouched, run, 0)  # untouched stored keys keep their run; 0: exact or new
        column = torch.arange(t)
        rewritten = (~untouched & (run > 0)).nonzero()[:, 0]
        again = self.rejoin(k, sz, ids, column, rewritten, recent) if len(rewritten) else rewritten
        due = ((ids == 0) & ~recent).nonzero()[:, 0]
        new = due[:len(due) // self.group * self.group]  # [n]: whole groups of the oldest
        if len(new):
            q, scale, zero = quantize_asym(k[:, new].reshape(heads, -1, self.group, d), 2, self.bits)
            group = torch.arange(len(new)) // self.group  # q [H, n/G, G, d_k]; scale, zero [H, n/G, 1, d_k]
            ids[new], column[new] = int(ids.max()) + 1 + group, -1 - group
            new_sz = torch.stack([scale, zero])[:, :, :, 0].transpose(2, 3)  # [2, H, d_k, n/G]

        def sz_of(tokens: Tensor) -> Tensor:  # [2, H, d_k, len(tokens)] fp16
            col = column[tokens]
            if not len(new):
                return sz[..., col]
            out = sz[..., col.clamp(min=0)]
            out[..., col < 0] = new_sz[..., -1 - col[col < 0]]
            return out

        codes = old["kivi_k"].transpose(1, 2)  # [H, T, kb] as stored
        if len(again) or len(new):
            codes = codes.clone(memory_format=torch.contiguous_format)
            codes[:, again] = pack_bits(self.codes_against(k[:, again], sz_of(again)).to(torch.uint8), self.bits)
            if len(new):
                codes[:, new] = pack_bits(q.reshape(heads, -1, d), self.bits)
        # runs: a new one wherever the id changes (0: exact keys); where a rewritten key got an id of its
        # own beside its group's survivors (a moved sink), one run if the scale and zero are the same
        change = torch.ones(t, dtype=torch.bool)
        change[1:] = ids[1:] != ids[:-1]
        if len(again):
            at = (change[1:] & (ids[1:] > 0) & (ids[:-1] > 0)).nonzero()[:, 0] + 1
            change[at] = (sz_of(at) != sz_of(at - 1)).flatten(0, -2).any(0)
        first = change.nonzero()[:, 0]  # [segments]
        length = torch.diff(first, append=torch.tensor([t]))
        kind = ids[first] > 0
        quantized = ids > 0
        return {"kq": codes[:, quantized], "kl": torch.where(kind, length, -length).short(),
                "ks": sz_of(first[kind]).transpose(2, 3).contiguous(),  # [2, H, runs, d_k]
                "kr": k[:, ~quantized]}

    def stored_groups(self, run: Tensor, untouched: Tensor) -> int | None:
        """The number of keys stored as whole groups when the carried record is the layout without
        eviction (groups 1, 2, ... of `group` keys from the first token, every one untouched, the rest
        unquantized), else None: then the keys are re-emitted and new groups appended by `append_groups`,
        a handful of whole-tensor operations, with the very bytes the general path writes."""
        nq = int(torch.count_nonzero(run))
        if nq % self.group or (nq and not (bool(untouched[:nq].all()) and torch.equal(
                run[:nq], torch.arange(nq).floor_divide_(self.group).add_(1)))):
            return None
        return nq

    def append_groups(self, k: Tensor, old: dict[str, Tensor], nq: int) -> dict[str, Tensor]:
        """`pack_keys` of a layer whose first `nq` keys are stored whole groups, untouched: those as
        stored, then whole groups of the oldest unquantized keys outside the residual, the rest exact."""
        heads, t, d = k.shape
        g = self.group
        due = max(t - self.residual - nq, 0) // g * g
        end = nq + due
        codes = old["kivi_k"][..., :nq].transpose(1, 2)  # [H, nq, kb]
        sz = old["kivi_ks"][..., :nq:g].transpose(2, 3)  # [2, H, nq / G, d_k]: each group's first key
        if due:
            q, scale, zero = quantize_asym(k[:, nq:end].reshape(heads, -1, g, d), 2, self.bits)
            codes = torch.cat([codes, pack_bits(q.view(heads, due, d), self.bits)], 1)
            sz = torch.cat([sz, torch.stack([scale, zero])[:, :, :, 0]], 2)
        lengths = [g] * (end // g) + ([end - t] if t > end else [])
        return {"kq": codes, "kl": torch.tensor(lengths, dtype=torch.int16), "ks": sz.contiguous(), "kr": k[:, end:]}

    def rejoin(self, k: Tensor, sz: Tensor, ids: Tensor, column: Tensor, rewritten: Tensor,
               recent: Tensor) -> Tensor:
        """Give the keys a token stage rewrote a group (updating `ids` and `column` in place) and return
        those whose codes are to be computed again: a key its own group still decodes to (moved, not
        changed) keeps that group under an id of its own; one older than the residual joins the group
        beside it (`neighbours`); the rest stay unquantized, exact or new."""
        own = rewritten[self.decodes(k[:, rewritten], sz[..., rewritten])]
        ids[own] = int(ids.max()) + 1 + torch.arange(len(own))
        adopt, source = self.neighbours(ids > 0, rewritten, recent)
        ids[adopt], column[adopt] = ids[source], source
        return torch.cat([own, adopt])

    def pack_values(self, v: Tensor, old: dict[str, Tensor], untouched: Tensor) -> dict[str, Tensor]:
        """Values older than the last `residual` tokens quantized per token: as stored when untouched and
        stored quantized, else from the dense value."""
        n = max(v.shape[1] - self.residual, 0)
        codes = old["kivi_v"][..., :n].transpose(1, 2)  # [H, n, vb]
        sz = old["kivi_vs"][..., :n].transpose(2, 3)  # [2, H, n, groups]
        again = (~(untouched[:n] & (sz[0, 0, :, 0] != 0))).nonzero()[:, 0]  # a stored value has scale > 0
        if len(again):
            codes, sz = (x.clone(memory_format=torch.contiguous_format) for x in (codes, sz))
            fresh = quantize_tokens(v[:, again], self.bits, self.group)
            codes[:, again], sz[:, :, again] = fresh["q"], torch.stack([fresh["s"], fresh["z"]])
        return {"vq": codes, "vs": sz, "vr": v[:, n:]}

    def codes_against(self, x: Tensor, sz: Tensor) -> Tensor:
        """Codes [H, m, d] (float, clamped to the range; NaN where a scale is 0) of keys x [H, m, d]
        against the scales and zeros sz [2, H, d, m] (fp16) of their groups."""
        s, z = sz.transpose(2, 3).float()
        return (x - z).div_(s).round_().clamp_(0, (1 << self.bits) - 1)

    def decodes(self, x: Tensor, sz: Tensor) -> Tensor:
        """[m] bool: which keys x [H, m, d] are exactly what their groups' sz [2, H, d, m] decode to."""
        s, z = sz.transpose(2, 3)
        return (dequantize_asym(self.codes_against(x, sz), s, z) == x).all(2).all(0)

    def neighbours(self, anchored: Tensor, rewritten: Tensor, recent: Tensor) -> tuple[Tensor, Tensor]:
        """Rewritten keys older than the residual that join a neighbouring group, and the token of that
        group each joins: the nearest anchored (quantized) key before it, else after it, with only such
        rewritten keys between. (adopt [A], source [A]) token indices; a key that takes its neighbour's
        column and id decodes against that group (codes clamped to its range)."""
        t = anchored.shape[0]
        idx = torch.arange(t)
        joins = torch.zeros(t, dtype=torch.bool)
        joins[rewritten] = True
        joins &= ~anchored & ~recent
        blocked = ~anchored & ~joins
        before = torch.where(anchored, idx, -1).cummax(0).values
        after = torch.where(anchored, idx, t).flip(0).cummin(0).values.flip(0)
        ok_before = before > torch.where(blocked, idx, -1).cummax(0).values
        ok_after = after < torch.where(blocked, idx, t).flip(0).cummin(0).values.flip(0)
        source = torch.where(ok_before, before, torch.where(ok_after, after, -1))
        adopt = (joins & (source >= 0)).nonzero()[:, 0]
        return adopt, source[adopt]

    # ---------------------------------------------------------------------------------------- unpack

    def unpack(self, parts: dict[str, Tensor], shapes: list[Shapes]) -> list[dict[str, Tensor]]:
        out = []
        for layer, layer_shapes in enumerate(shapes):
            tokens, dims = kv_dims(layer_shapes)
            out.append(self.unpack_kivi(layer_parts(parts, layer), tokens, dims))
        return out

    def unpack_kivi(self, parts: dict[str, Tensor], tokens: int, dims: Dims) -> dict[str, Tensor]:
        """One layer's dense "k" [H, T, d_k] and "v" [H, T, d_v], and its carried record. Each is written
        once into its own tensor: keys of a layout of whole groups (`uniform_runs`) are dequantized in
        place against their run's scale and zero broadcast, not repeated per token."""
        runs = uniform_runs(parts["kl"])
        record = self.record(parts, tokens, dims, runs)
        h, d_k, d_v = dims.heads, dims.d_k, dims.d_v
        k, v = torch.empty(h, tokens, d_k), torch.empty(h, tokens, d_v)
        codes = unpack_bits(parts["kq"], self.bits, d_k)  # [H, Nq, d_k]
        if runs is not None:
            count, length = runs
            nq = count * length
            scale, zero = parts["ks"].float()[:, :, :, None]  # [H, runs, 1, d_k] each
            dequantize_asym(codes.view(h, count, length, d_k), scale, zero,
                            k[:, :nq].view(h, count, length, d_k))
            k[:, nq:] = parts["kr"]
        else:
            lengths = parts["kl"].long()
            scale, zero = repeat_runs(parts["ks"].float(), lengths[lengths > 0], 2)  # [H, Nq, d_k] each
            k = in_token_order(dequantize_asym(codes, scale, zero), parts["kr"], record["kivi_run"] > 0, 1)
        vs, n = parts["vs"], parts["vq"].shape[1]  # [2, H, n, groups]
        dequantize_tokens({"q": parts["vq"], "s": vs[0], "z": vs[1]}, self.bits, self.group, d_v, v[:, :n])
        v[:, n:] = parts["vr"]
        return {"k": k, "v": v, **record}

    def record(self, parts: dict[str, Tensor], tokens: int, dims: Dims,
               runs: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """The carried record of one layer's parts (but READ): each key's codes and its run's scale and
        zero, its run (1, 2, ... in blob order), each value's codes, scale and zero; 0 where exact.
        `runs`: the layer's `uniform_runs`, written straight into place (one pass each)."""
        h, d_k = dims.heads, dims.d_k
        exact = tokens - parts["vs"].shape[2]
        out = {"kivi_v": torch.nn.functional.pad(parts["vq"].transpose(1, 2), (0, exact)),
               "kivi_vs": torch.nn.functional.pad(parts["vs"].transpose(2, 3), (0, exact))}
        if runs is not None:
            count, length = runs
            nq = count * length
            codes = torch.empty(h, parts["kq"].shape[2], tokens, dtype=torch.uint8)
            codes[..., :nq] = parts["kq"].transpose(1, 2)
            codes[..., nq:] = 0
            sz = torch.empty(2, h, d_k, tokens, dtype=torch.float16)
            sz[..., :nq].view(2, h, d_k, count, length).copy_(parts["ks"].transpose(2, 3)[..., None])
            sz[..., nq:] = 0
            run = torch.arange(tokens).floor_divide_(length).add_(1)
            run[nq:] = 0
            return {"kivi_k": codes, "kivi_ks": sz, "kivi_run": run, **out}
        segments = parts["kl"].long()
        kind, length = segments > 0, segments.abs()
        quantized = torch.repeat_interleave(kind, length)  # [T]
        table = torch.zeros(2, h, d_k, len(segments), dtype=torch.float16)
        table[..., kind] = parts["ks"].transpose(2, 3)
        run = torch.zeros(len(segments), dtype=torch.long)
        run[kind] = torch.arange(1, int(kind.sum()) + 1)
        return {"kivi_k": in_token_order(parts["kq"].transpose(1, 2), None, quantized, 2),
                "kivi_ks": repeat_runs(table, length), "kivi_run": torch.repeat_interleave(run, length), **out}

    def restore(self, state: State, parts: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """What decoding the parts just packed gives, from `state`: a key or value re-emitted as stored
        decodes to what `state` holds (it is the decoding of those very codes), so only the tokens
        quantized now (new, rewritten) are dequantized; exact ones are `state`'s."""
        out = []
        for layer, part in enumerate(state.layers):
            mine = layer_parts(parts, layer)
            k, v = part.tokens["k"].float(), part.tokens["v"].float()  # [H, T, d_k], [H, T, d_v]
            dims = Dims(k.shape[0], k.shape[2], v.shape[2])
            old = self.carried(state, layer, dims.heads, dims.d_k, dims.d_v)
            untouched = (old[READ][0] == part.pos + 1) & (old[READ][1] == part.weight)
            runs = uniform_runs(mine["kl"])
            record = self.record(mine, part.num_tokens, dims, runs)
            stored = None if runs is None else self.stored_groups(old["kivi_run"], untouched)
            if stored is not None:  # whole groups, the first `stored` keys as they were: dequantize the rest
                g, end = runs[1], runs[0] * runs[1]
                if end > stored:
                    k = k.clone()
                    h, d = dims.heads, dims.d_k
                    scale, zero = mine["ks"][:, :, stored // g:, None].float()  # [H, groups, 1, d_k] each
                    codes = unpack_bits(mine["kq"][:, stored:], self.bits, d).view(h, -1, g, d)
                    dequantize_asym(codes, scale, zero, k[:, stored:end].view(h, -1, g, d))
                redo = ()
            else:
                quantized = record["kivi_run"] > 0
                rank = quantized.cumsum(0) - 1  # [T]: each quantized key's row among the stored ones
                redo = (quantized & ~(untouched & (old["kivi_run"] > 0))).nonzero()[:, 0]
            if len(redo):
                run = record["kivi_run"][redo] - 1
                scale, zero = mine["ks"].float()[:, :, run]  # [H, m, d_k] each
                k = k.clone()
                k[:, redo] = dequantize_asym(unpack_bits(mine["kq"][:, rank[redo]], self.bits, dims.d_k), scale, zero)
            n, vs = mine["vs"].shape[2], mine["vs"]
            again = (~(untouched[:n] & (old["kivi_vs"][0, 0, 0, :n] != 0))).nonzero()[:, 0]
            if len(again):
                v = v.clone()
                v[:, again] = dequantize_tokens({"q": mine["vq"][:, again], "s": vs[0][:, again],
                                                 "z": vs[1][:, again]}, self.bits, self.group, dims.d_v)
            out.append({"k": k, "v": v, **record})
        return out

    # ----------------------------------------------------------------------------------------- bytes

    def kv_bytes(self, tokens: int, dims: Dims) -> int:
        """Exactly what `pack_layer` writes for T tokens carrying no groups: floor((T - residual) / group)
        whole groups from the oldest token, the rest exact."""
        quantized = max(tokens - self.residual, 0) // self.group * self.group
        runs = quantized // self.group
        return (self.key_bytes(dims, quantized, tokens - quantized, runs, runs + (tokens > quantized))
                + self.value_bytes(tokens, dims))

    def key_bytes(self, dims: Dims, quantized: int, exact: int, runs: int, segments: int) -> int:
        """Packed codes of `quantized` keys, an fp16 scale and zero per quantized run (per head and
        channel), `exact` fp32 keys and an int16 length per run of either kind."""
        h, d = dims.heads, dims.d_k
        return h * quantized * self.code_bytes(d) + 4 * h * d * (runs + exact) + 2 * segments

    def value_bytes(self, tokens: int, dims: Dims) -> int:
        quantized = max(tokens - self.residual, 0)
        return (token_quant_bytes(dims.heads * quantized, dims.d_v, self.bits, self.group)
                + 4 * dims.heads * (tokens - quantized) * dims.d_v)

    def layer_bound(self, part: LayerState, carried: dict[str, Tensor]) -> Callable[[int], int]:
        """What a layer can cost after a token stage keeps `tokens` of its T tokens, read off its carried
        runs: each stored run may survive as a run, new groups form from the unquantized keys (plus the
        keys a token stage rewrites, at most one per token it evicts; the ceiling's extra group covers
        StreamingLLM's few moved sinks), each unquantized stretch may split into quantized and exact
        runs, and at most `residual + group - 1` keys stay exact."""
        now = part.num_tokens
        dims = kv_dims({name: tuple(x.shape) for name, x in part.tokens.items()})[1]
        run = carried.get("kivi_run", torch.zeros(now, dtype=torch.long))
        starts = torch.ones(len(run), dtype=torch.bool)
        starts[1:] = run[1:] != run[:-1]
        stretches, fresh = int((starts & (run != 0)).sum()), int((run == 0).sum())
        fresh_stretches = int((starts & (run == 0)).sum())

        def bound(tokens: int) -> int:
            rewritten = now - tokens if now > tokens else 0
            runs = min(tokens, stretches + fresh_stretches + rewritten
                       + math.ceil(min(tokens, fresh + rewritten) / self.group))
            exact = min(tokens, self.residual + self.group - 1)
            segments = min(tokens, runs + fresh_stretches + rewritten + 1)
            return self.key_bytes(dims, tokens, exact, runs, segments) + self.value_bytes(tokens, dims)

        return bound


def uniform_runs(kl: Tensor) -> tuple[int, int] | None:
    """(count, length) when a layer's signed run lengths `kl` are `count` quantized runs of one length and
    then at most one exact run (the layout without eviction: whole groups, the exact tail), else None."""
    segments = kl.tolist()
    count = len(segments) - (1 if segments and segments[-1] <= 0 else 0)
    head = segments[:count]
    if not count or min(head) <= 0 or min(head) != max(head):
        return None
    return count, head[0]


def in_token_order(first: Tensor, second: Tensor | None, is_first: Tensor, dim: int) -> Tensor:
    """Tensors of the tokens where is_first [T] holds (`first`) and of the others (`second`, zeros when
    None) interleaved along `dim` into token order. The layout without eviction (quantized keys, then
    the exact tail) is a concatenation; others are placed by index."""
    n = first.shape[dim]
    if second is None:
        shape = list(first.shape)
        shape[dim] = len(is_first) - n
        second = first.new_zeros(shape)
    if bool(is_first[:n].all()):
        return torch.cat([first, second], dim)
    shape = list(first.shape)
    shape[dim] = len(is_first)
    out = first.new_empty(shape)
    out.index_copy_(dim, is_first.nonzero()[:, 0], first)
    return out.index_copy_(dim, (~is_first).nonzero()[:, 0], second)


def repeat_runs(table: Tensor, lengths: Tensor, dim: int = -1) -> Tensor:
    """table [..., S, ...] -> [..., sum(lengths), ...]: entry s repeated lengths[s] times along `dim`. A
    layout of runs all of one length but the last (KIVI's without eviction: whole groups, then the exact
    tail) expands as a view in one copy; others gather (index_select copies one small row per token,
    several times slower, and is met only on evicted, so short, states)."""
    dim = dim % table.dim()
    s = table.shape[dim]
    if s and bool((lengths[:-1] == lengths[0]).all()):
        shape = list(table.shape)
        head = table.narrow(dim, 0, s - 1).unsqueeze(dim + 1)
        head = head.expand(*shape[:dim], s - 1, int(lengths[0]), *shape[dim + 1:]).flatten(dim, dim + 1)
        shape[dim] = int(lengths[-1])
        return torch.cat([head, table.narrow(dim, s - 1, 1).expand(shape)], dim)
    return table.index_select(dim, torch.repeat_interleave(torch.arange(s), lengths))


@register
@dataclass
class Intact(KVStorage):
    """IntactKV (Liu et al., ACL Findings 2024, "IntactKV: Improving Large Language Model Quantization by
    Keeping Pivot Tokens Intact").

    A few pivot tokens are kept in fp32 and the rest quantized per token (`bits` 8, or 4 with groups of
    `group` channels). IntactKV's pivots are the attention sinks; here they are the `sink` oldest kept
    tokens plus the `pivots` tokens with the highest heavy-hitter score (attention accumulated in
    `extras["acc"]`, summed over heads, per query that could see the token: the score `h2o` and `merge`
    keep by, so an old token is not a pivot for its age alone).
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
        score = heavy_hitter_score(state, layer)[sink:]  # [T - sink], the score h2o and merge keep by
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
        """Exact: int32 index and fp32 K/V of each pivot, per-token codes of the rest."""
        p = min(tokens, self.sink + self.pivots)
        h = dims.heads
        return (4 * p + 4 * h * p * (dims.d_k + dims.d_v)
                + token_quant_bytes(h * (tokens - p), dims.d_k, self.bits, self.group)
                + token_quant_bytes(h * (tokens - p), dims.d_v, self.bits, self.group))
