"""What every policy is: a dataclass of hyperparameters with one job, in one of two roles.

A *token* policy decides which tokens (or merged tokens) a state keeps after each `extend`; it works on
dense fp32 tensors and returns dense fp32 tensors. A *storage* policy decides how a state's tensors are
written into the blob (casts, quantization, low-rank coefficients, pruned channels, shared cross-layer
directions); it runs inside the codec, so the state the service keeps working with is always what a
decode of the stored blob gives back. A pipeline is at most one of each (`h2o:budget=256+kivi:bits=2`).
Each policy declares the states it applies to (`Policy.requires`, `Policy.applies_to`): a token policy
needs per-token tensors, a K/V storage needs exactly keys and values, a per-tensor storage (casts,
int8, int4) encodes any state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from kvrec.models.state import AttentionStats, Events, LayerState, State
from torch import Tensor

if TYPE_CHECKING:
    from kvrec.models.recommender import SequentialRecommender


class PolicyError(ValueError):
    """A spec that names no policy, an unknown or invalid parameter, or a policy that cannot run here."""


@dataclass
class PolicyContext:
    """What some policies need beyond their hyperparameters: `svd` finds (or fits and saves) its bases
    beside the checkpoint, fitting them on `calibration` histories when no saved bases exist."""

    model: SequentialRecommender | None = None
    checkpoint_path: str | Path | None = None
    calibration: list[Events] | None = None


READ = "read"  # carried extra [2, T] float64: position + 1 and weight of each token as its blob was read
Shapes = dict[str, tuple[int, ...]]  # one layer's dense tensors by name: token [G, T, d], fixed any shape


@dataclass(frozen=True)
class Dims:
    """Shape of one layer's K/V apart from the token count."""

    heads: int
    d_k: int
    d_v: int


class Policy:
    """Base of all policies. Subclasses are dataclasses whose fields are the hyperparameters.

    `requires` names what a state must have for the policy to apply: "tokens" (any per-token tensors,
    for policies that select or merge tokens) or the names of per-token tensors ("k", "v"). `applies_to`
    turns that into a reason to refuse, so a spec that cannot run on the served model is refused when it
    is parsed, not when the first request arrives.
    """

    name: ClassVar[str]
    role: ClassVar[str]  # "token", "storage" or "baseline"
    requires: ClassVar[tuple[str, ...]] = ()
    uses_acc: ClassVar[bool] = False  # needs accumulated attention in state.extras["acc"] (see pipeline)

    def bind(self, context: PolicyContext | None) -> None:
        """Load what the policy needs besides its hyperparameters (default: nothing)."""

    @classmethod
    def applies_to(cls, state: State) -> str | None:
        """None when the policy can run on states like `state` (any state of the model's kind, e.g. an
        empty one), else why not."""
        names = state.token_names()
        for need in cls.requires:
            if need == "tokens" and not names:
                return f"{cls.name} selects tokens, and a {state.kind!r} state keeps none"
            if need != "tokens" and need not in names:
                return f"{cls.name} needs per-token {need!r} tensors, and a {state.kind!r} state has " + (
                    ", ".join(sorted(names)) or "none")
        return None

    def params(self) -> dict[str, Any]:
        """Hyperparameters that differ from None, in field order (None means "not given")."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init and getattr(self, f.name) is not None}

    def spec(self) -> str:
        params = self.params()
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            raise PolicyError(f"{self.name}: {message}")


class Storage(Policy):
    """Writes the tensors of a state as named parts ("{layer}.{part}") and reads them back.

    `unpack` gets each layer's dense shapes (the codec records them) and returns each layer's dense
    tensors by name. `layer_bytes` is what `pack` writes for one layer of those shapes: exactly (every
    precision format, tested against the encoder), or at most where a storage says it is a bound
    (token-dependent layouts such as MiniCache's merged pairs). Part names must not contain ':'.

    A storage whose encoding of a token depends on what an earlier blob stored (KIVI's key groups, fixed
    once quantized) carries that record between requests in per-token extras named in `carries`
    ([..., T], token axis last): `unpack` returns them with the layer's dense tensors, the model's
    `extend` pads them with zeros for new tokens, token policies select (or sum, when merging) them with
    their tokens, and `pack` reads them to re-emit what it stored for each token untouched since. The
    codec adds one of them, `READ` ([2, T] float64: each token's position + 1 and weight as the blob was
    read), by which `pack` tells an untouched token from one a token stage rewrote: a token stage only
    rewrites a kept token's tensors by merging into it (its weight grows, or its summed READ no longer
    matches) or by moving it (StreamingLLM renumbers its position), which tests/test_storage_kivi.py
    checks for every token policy. The codec stores no copy of the carried extras (the parts hold that
    information) and sizing does not count them as metadata. For such a storage `layer_bytes` is exact
    for a layer that carries nothing, and `layer_bound` reads the record to bound a layer that does.
    """

    role = "storage"
    carries: ClassVar[tuple[str, ...]] = ()

    def pack(self, state: State) -> dict[str, Tensor]:
        raise NotImplementedError

    def unpack(self, parts: dict[str, Tensor], shapes: list[Shapes]) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def layer_bytes(self, shapes: Shapes) -> int:
        raise NotImplementedError

    def restore(self, state: State, parts: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """What `unpack` gives back for the parts `pack(state)` just wrote, tensor for tensor, without
        reading them from a blob. Default: unpack them; a storage that re-emits what it carried can
        take `state`'s tensors where they are what decoding gives (KIVI)."""
        return self.unpack(parts, [kept_shapes(part, part.num_tokens) for part in state.layers])

    def layer_bound(self, part: LayerState, carried: dict[str, Tensor]) -> Callable[[int], int]:
        """Upper bound of what `pack` writes for layer `part` after a token stage keeps `tokens` of its
        tokens (tokens <= part.num_tokens), as a function of `tokens`; `carried` holds the layer's
        carried extras by name (empty when there are none). Default: `layer_bytes` of the kept shapes."""
        return lambda tokens: self.layer_bytes(kept_shapes(part, tokens))

    def observe(self, state: State, stats: AttentionStats | None) -> None:
        """Run by the pipeline on every freshly extended state after its token stage, with the
        extension's statistics: a storage whose encoding depends on what the current queries read
        (ThinK's key channels) decides it here and applies it to the dense tensors, replacing them in
        `state` (whose containers the pipeline copied), so that `pack` finds the decision in the state
        and the state the service goes on with is what a decode of its blob gives back. Default: nothing."""

    def check_token_stage(self, token: Policy | None) -> None:
        """Raise PolicyError when this storage would not do what its name says after `token` (a token
        stage, or None); parse_policy asks once per pipeline. Default: any token stage is fine."""


def kept_shapes(part: LayerState, tokens: int) -> Shapes:
    """The dense shapes of layer `part` when it keeps `tokens` tokens: token tensors [G, T, d] shortened,
    fixed tensors as they are."""
    shapes = {name: (x.shape[0], tokens, *x.shape[2:]) for name, x in part.tokens.items()}
    shapes.update({name: tuple(x.shape) for name, x in part.fixed.items()})
    return shapes


def layer_parts(parts: dict[str, Tensor], layer: int) -> dict[str, Tensor]:
    """The parts of one layer, with the "{layer}." prefix taken off."""
    prefix = f"{layer}."
    return {name[len(prefix):]: x for name, x in parts.items() if name.startswith(prefix)}


class PerTensor(Storage):
    """A storage that encodes every float tensor of a state on its own, whatever the state's kind:
    token tensors [G, T, d] and fixed ones alike, as rows along the last dimension.

    A format that makes many torch calls per tensor (`batched`: int4, some twenty, each a few
    microseconds, which at 1,000 tokens cost more than its arithmetic) encodes all tensors of one width
    as a single batch of rows, at the price of one copy; the parts are the same either way. int8 and fp8
    make a handful of calls, each a full pass: there the copy costs more than it saves (measured: 10%
    faster at 1,000 tokens, 18% slower at 4,000).
    """

    batched: ClassVar[bool] = False

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """x [..., d] float -> parts, each [..., n] ("" names the single part of a format that has one)."""
        raise NotImplementedError

    def decode(self, parts: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Exactly what `encode` writes for a tensor of `shape`."""
        raise NotImplementedError

    def pack(self, state: State) -> dict[str, Tensor]:
        named = {f"{layer}.{name}": x for layer, part in enumerate(state.layers) for name, x in part.tensors().items()}
        widths = {x.shape[-1] for x in named.values()} if self.batched else set()
        batches = [[n for n, x in named.items() if x.shape[-1] == d] for d in sorted(widths)]
        batches += [[n] for n in named if not self.batched]
        out = {}
        for names in batches:
            rows = [named[n].reshape(-1, named[n].shape[-1]) for n in names]  # [R_i, d]
            encoded = self.encode(torch.cat(rows) if len(rows) > 1 else named[names[0]])
            for p, t in encoded.items():
                chunks = t.split([len(r) for r in rows]) if len(rows) > 1 else [t]
                for n, chunk in zip(names, chunks):
                    out[n + (f".{p}" if p else "")] = chunk.reshape(*named[n].shape[:-1], t.shape[-1])
        return out

    def unpack(self, parts: dict[str, Tensor], shapes: list[Shapes]) -> list[dict[str, Tensor]]:
        out = []
        for layer, layer_shapes in enumerate(shapes):
            mine = layer_parts(parts, layer)
            out.append({name: self.decode(tensor_parts(mine, name), tuple(shape))
                        for name, shape in layer_shapes.items()})
        return out

    def layer_bytes(self, shapes: Shapes) -> int:
        return sum(self.nbytes(tuple(shape)) for shape in shapes.values())


def tensor_parts(mine: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """The parts of tensor `name` of one layer: {"": x} for a one-part format, {"q": .., "s": ..} else."""
    if name in mine:
        return {"": mine[name]}
    prefix = name + "."
    return {p[len(prefix):]: x for p, x in mine.items() if p.startswith(prefix)}


class KVStorage(Storage):
    """A storage built for key/value token states: it encodes a layer's "k" [H, T, d_k] and "v" [H, T,
    d_v] together (per-channel keys, shared directions, projections), so it applies only to states
    whose layers hold exactly those two tensors."""

    requires = ("k", "v")

    @classmethod
    def applies_to(cls, state: State) -> str | None:
        reason = super().applies_to(state)
        extra = {n for part in state.layers for n in part.tensors()} - {"k", "v"}
        if reason is None and extra:
            reason = f"{cls.name} encodes only k and v, and a {state.kind!r} state also has {', '.join(sorted(extra))}"
        return reason

    def pack(self, state: State) -> dict[str, Tensor]:
        return {f"{layer}.{p}": t for layer in range(state.num_layers)
                for p, t in self.pack_layer(state, layer).items()}

    def unpack(self, parts: dict[str, Tensor], shapes: list[Shapes]) -> list[dict[str, Tensor]]:
        out = []
        for layer, layer_shapes in enumerate(shapes):
            tokens, dims = kv_dims(layer_shapes)
            k, v = self.unpack_layer(layer, layer_parts(parts, layer), tokens, dims)
            out.append({"k": k, "v": v})
        return out

    def layer_bytes(self, shapes: Shapes) -> int:
        return self.kv_bytes(*kv_dims(shapes))

    def pack_layer(self, state: State, layer: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def unpack_layer(self, layer: int, parts: dict[str, Tensor], tokens: int, dims: Dims) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def kv_bytes(self, tokens: int, dims: Dims) -> int:
        """What `pack_layer` writes for T tokens (see `Storage.layer_bytes`)."""
        raise NotImplementedError


def kv_dims(shapes: Shapes) -> tuple[int, Dims]:
    """(tokens, Dims) of a K/V layer from its dense shapes."""
    heads, tokens, d_k = shapes["k"]
    return tokens, Dims(heads, d_k, shapes["v"][2])
