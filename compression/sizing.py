"""How many tokens fit in a byte budget: an upper bound of the blob size as a function of tokens kept.

The bound is the codec's layout with nothing shared or elided: a fixed reserve for the prefix and the
JSON header (the codec keeps both under `HEADER_RESERVE`), the last hidden state, and per layer the
storage's bound for the kept tokens (`Storage.layer_bound`: exactly `layer_bytes` for every format but
KIVI's, whose groups survive eviction) plus per token the metadata: position and time deltas at the
width that the layer's whole span of positions or times needs (the deltas of any kept subset fit in
it), a weight (fp32) and every fp32 extra a policy carries. The codec only ever writes less (it shares
metadata that is identical across layers, elides evenly spaced sequences and drops weights that are
all one), so a budget met here is met by the blob.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from kvrec.compression.base import Storage
from kvrec.models.state import LayerState, State
from torch import Tensor

HEADER_RESERVE = 1024
WEIGHT_BYTES = 4  # fp32 multiplicity per token, written when any token of the state was merged


def extra_floats_per_token(state: State, storage: Storage) -> int:
    """fp32 values per token and layer that the stored extras add (e.g. H for accumulated attention
    [H, T]); the extras a storage carries (`Storage.carries`) are not stored: its parts hold them."""
    return sum(math.prod(per_layer[0].shape[:-1]) for name, per_layer in state.extras.items()
               if name not in storage.carries)


def delta_bytes(x: Tensor) -> int:
    """Bytes per token of the deltas of any subsequence of x [T] (int64): the narrowest signed integer
    type that holds +-(max - min), as `codec.sequence` would pick at worst."""
    span = int(x.max() - x.min()) if len(x) else 0
    return next(t.itemsize for t in (torch.int8, torch.int16, torch.int32, torch.int64)
                if span <= torch.iinfo(t).max)


def layer_bounds(storage: Storage, state: State) -> list[Callable[[int], int]]:
    """Per layer, the bound of its stored bytes (tensors and metadata) when it keeps min(T_l, tokens)."""
    extras = extra_floats_per_token(state, storage)

    def layer(index: int, part: LayerState) -> Callable[[int], int]:
        carried = {name: state.extras[name][index] for name in storage.carries if name in state.extras}
        tensors = storage.layer_bound(part, carried)
        per_token = delta_bytes(part.pos) + delta_bytes(part.ts) + WEIGHT_BYTES + 4 * extras
        return lambda tokens: tensors(min(part.num_tokens, tokens)) + min(part.num_tokens, tokens) * per_token

    return [layer(index, part) for index, part in enumerate(state.layers)]


def blob_bound(storage: Storage, state: State, tokens: int) -> int:
    """Upper bound of the blob size when every layer keeps min(T_l, tokens) tokens."""
    return fixed_bytes(state) + sum(bound(tokens) for bound in layer_bounds(storage, state))


def fixed_bytes(state: State) -> int:
    """The reserve for prefix and header, and the last hidden state (fp32)."""
    return HEADER_RESERVE + (0 if state.last_hidden is None else 4 * state.last_hidden.numel())


def tokens_for_bytes(storage: Storage, state: State, nbytes: int) -> int:
    """Largest per-layer token count whose blob bound fits in `nbytes` (at least 1: never empty a state)."""
    bounds, fixed = layer_bounds(storage, state), fixed_bytes(state)
    lo, hi = 1, max(state.tokens(layer) for layer in range(state.num_layers))
    while lo < hi:  # the answer stays in [lo, hi]; the bound is monotone in tokens
        mid = (lo + hi + 1) // 2
        if fixed + sum(bound(mid) for bound in bounds) <= nbytes:
            lo = mid
        else:
            hi = mid - 1
    return lo
