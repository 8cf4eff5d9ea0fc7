"""How many tokens fit in a byte budget: an upper bound of the blob size as a function of tokens kept.

The bound is the codec's layout with nothing shared or omitted: a fixed reserve for the prefix and the
JSON header (the codec keeps both under `HEADER_RESERVE`), the last hidden state, and per token and layer
the storage's bytes for the layer's tensors plus position (int32), timestamp (int64), multiplicity (fp32) and every fp32
extra a policy carries. The codec only ever writes less (it shares metadata that is identical across
layers and drops multiplicities that are all one), so a budget met here is met by the blob.
"""

from __future__ import annotations

import math

from kvrec.compression.base import Storage
from kvrec.models.state import State

HEADER_RESERVE = 1024
META_BYTES_PER_TOKEN = 4 + 8 + 4  # pos int32, ts int64, weight fp32


def extra_floats_per_token(state: State) -> int:
    """fp32 values per token and layer that the extras add (e.g. H for accumulated attention [H, T])."""
    return sum(math.prod(per_layer[0].shape[:-1]) for per_layer in state.extras.values())


def blob_bound(storage: Storage, state: State, tokens: int) -> int:
    """Upper bound of the blob size when every layer keeps min(T_l, tokens) tokens."""
    per_token_meta = META_BYTES_PER_TOKEN + 4 * extra_floats_per_token(state)
    hidden = 0 if state.last_hidden is None else 4 * state.last_hidden.numel()
    total = HEADER_RESERVE + hidden
    for part in state.layers:
        t = min(part.num_tokens, tokens)
        shapes = {name: (x.shape[0], t, *x.shape[2:]) for name, x in part.tokens.items()}
        shapes.update({name: tuple(x.shape) for name, x in part.fixed.items()})
        total += storage.layer_bytes(shapes) + t * per_token_meta
    return total


def tokens_for_bytes(storage: Storage, state: State, nbytes: int) -> int:
    """Largest per-layer token count whose blob bound fits in `nbytes` (at least 1: never empty a state)."""
    lo, hi = 1, max(state.tokens(layer) for layer in range(state.num_layers))
    while lo < hi:  # the answer stays in [lo, hi]; blob_bound is monotone in tokens
        mid = (lo + hi + 1) // 2
        if blob_bound(storage, state, mid) <= nbytes:
            lo = mid
        else:
            hi = mid - 1
    return lo
