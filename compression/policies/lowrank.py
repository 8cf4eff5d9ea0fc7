"""Low-rank and channel level: fewer numbers per token by dropping directions of the head dimension."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kvrec.compression.base import Dims, KVStorage, PolicyContext, PolicyError, Storage
from kvrec.compression.registry import register
from kvrec.models.state import Events, State
from safetensors.torch import load_file, save_file
from torch import Tensor

FLOAT_TYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def float_type(policy: Storage, name: str) -> torch.dtype:
    policy.check(name in FLOAT_TYPES, f"dtype must be one of {', '.join(FLOAT_TYPES)}, got {name!r}")
    return FLOAT_TYPES[name]


def flat(x: Tensor) -> Tensor:
    """[H, T, d] -> [T, H*d]: one row per token, heads side by side."""
    return x.transpose(0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2])


def unflat(x: Tensor, heads: int) -> Tensor:
    """[T, H*d] -> [H, T, d]."""
    return x.reshape(x.shape[0], heads, x.shape[1] // heads).transpose(0, 1)


def bases_path(checkpoint_path: str | Path) -> Path:
    """Where `svd` keeps the bases fitted for a checkpoint: beside it."""
    return Path(f"{checkpoint_path}.svd.safetensors")


@torch.no_grad()
def fit_svd_bases(model, histories: list[Events], max_tokens: int = 65536) -> dict[str, Tensor]:
    """Right singular vectors of the stacked per-token K and V of each layer over calibration histories.

    Returns {"k.{l}": [H*d_k, H*d_k], "v.{l}": [H*d_v, H*d_v]}, columns ordered by singular value, so the
    first r columns are the best rank-r basis (uncentred: the state stores plain coefficients).
    """
    rows: dict[str, list[Tensor]] = {}
    seen = 0
    for events in histories:
        if seen >= max_tokens:
            break
        state, _, _ = model.prefill(events)
        for layer in range(state.num_layers):
            rows.setdefault(f"k.{layer}", []).append(flat(state.k[layer]))
            rows.setdefault(f"v.{layer}", []).append(flat(state.v[layer]))
        seen += len(events)
    if not seen:
        raise PolicyError("svd: no calibration events to fit bases on")
    return {name: torch.linalg.svd(torch.cat(parts).double(), full_matrices=False).Vh.T.float().contiguous()
            for name, parts in rows.items()}


@register
@dataclass
class SVD(KVStorage):
    """Palu-style low-rank state (Chang et al., ICLR 2025, "Palu: KV-Cache Compression with Low-Rank
    Projection"): per layer, fixed rank-`rank` bases for K and for V (heads concatenated), fitted offline
    by SVD of calibration states and saved beside the checkpoint; the blob stores each token's `rank`
    coefficients in `dtype`. A state inside the bases' span is reconstructed exactly. Bind with a
    `PolicyContext` holding the model and a checkpoint path (saved bases) or calibration histories."""

    name = "svd"
    rank: int = 16
    dtype: str = "fp32"
    bases: dict[str, Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        float_type(self, self.dtype)

    def bind(self, context: PolicyContext | None) -> None:
        if context is None or context.model is None:
            raise PolicyError("svd: needs a PolicyContext with the model, and a checkpoint path or calibration")
        path = bases_path(context.checkpoint_path) if context.checkpoint_path else None
        if path is not None and path.is_file():
            self.bases = load_file(str(path))
        elif context.calibration:
            self.bases = fit_svd_bases(context.model, context.calibration)
            if path is not None:
                save_file(self.bases, str(path))
        else:
            raise PolicyError(f"svd: no bases at {path} and no calibration histories to fit them "
                              "(`kvrec bench offline` with the model's dataset fits and saves them)")

    def basis(self, kind: str, layer: int) -> Tensor:
        if self.bases is None:
            raise PolicyError("svd: bases not loaded; parse the spec with a PolicyContext")
        b = self.bases[f"{kind}.{layer}"]
        return b[:, : self.rank]  # [H*d, r]

    def pack_layer(self, state: State, layer: int) -> dict[str, Tensor]:
        dtype = FLOAT_TYPES[self.dtype]
        return {"k": (flat(state.k[layer]) @ self.basis("k", layer)).to(dtype),  # [T, r]
                "v": (flat(state.v[layer]) @ self.basis("v", layer)).to(dtype)}

    def unpack_layer(self, layer: int, parts: dict[str, Tensor], tokens: int, dims: Dims) -> tuple[Tensor, Tensor]:
        return (unflat(parts["k"].float() @ self.basis("k", layer).T, dims.heads),
                unflat(parts["v"].float() @ self.basis("v", layer).T, dims.heads))

    def kv_bytes(self, tokens: int, dims: Dims) -> int:
        rank_k, rank_v = min(self.rank, dims.heads * dims.d_k), min(self.rank, dims.heads * dims.d_v)
        return FLOAT_TYPES[self.dtype].itemsize * tokens * (rank_k + rank_v)


@register
@dataclass
class Think(KVStorage):
    """ThinK (Xu et al., ICLR 2025, "ThinK: Thinner Key Cache by Query-Driven Pruning"): prune the least
    important key channels of each head, keeping the fraction `keep`. ThinK scores channel c by
    |Q_c| |K_c| with the latest queries; the state holds no queries, so the score here is the key
    channel's weighted L2 norm over the kept tokens (|Q_c| taken as uniform). Values are untouched; K
    and V are stored in `dtype`."""

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
