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

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kvrec.models.state import Events, State
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
    tensors by name. `layer_bytes` is an upper bound of what `pack` writes for one layer of those
    shapes, which byte budgets use to find how many tokens fit. Part names must not contain ':'.
    """

    role = "storage"

    def pack(self, state: State) -> dict[str, Tensor]:
        raise NotImplementedError

    def unpack(self, parts: dict[str, Tensor], shapes: list[Shapes]) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def layer_bytes(self, shapes: Shapes) -> int:
        raise NotImplementedError


def layer_parts(parts: dict[str, Tensor], layer: int) -> dict[str, Tensor]:
    """The parts of one layer, with the "{layer}." prefix taken off."""
    prefix = f"{layer}."
    return {name[len(prefix):]: x for name, x in parts.items() if name.startswith(prefix)}


class PerTensor(Storage):
    """A storage that encodes every float tensor of a state on its own, whatever the state's kind:
    token tensors [G, T, d] and fixed ones alike, as rows along the last dimension."""

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """x [..., d] float -> parts ("" names the single part of a format that has one)."""
        raise NotImplementedError

    def decode(self, parts: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Exactly what `encode` writes for a tensor of `shape`."""
        raise NotImplementedError

    def pack(self, state: State) -> dict[str, Tensor]:
        out = {}
        for layer, part in enumerate(state.layers):
            for name, x in part.tensors().items():
                for p, t in self.encode(x).items():
                    out[f"{layer}.{name}" + (f".{p}" if p else "")] = t
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
        """Upper bound of what `pack_layer` writes for T tokens."""
        raise NotImplementedError


def kv_dims(shapes: Shapes) -> tuple[int, Dims]:
    """(tokens, Dims) of a K/V layer from its dense shapes."""
    heads, tokens, d_k = shapes["k"]
    return tokens, Dims(heads, d_k, shapes["v"][2])
