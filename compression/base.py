"""What every policy is: a dataclass of hyperparameters with one job, in one of two roles.

A *token* policy decides which tokens (or merged tokens) a state keeps after each `extend`; it works on
dense fp32 tensors and returns dense fp32 tensors. A *storage* policy decides how the kept K/V are written
into the blob (casts, quantization, low-rank coefficients, pruned channels, shared cross-layer
directions); it runs inside the codec, so the state the service keeps working with is always what a
decode of the stored blob gives back. A pipeline is at most one of each (`h2o:budget=256+kivi:bits=2`).
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


@dataclass(frozen=True)
class Dims:
    """Shape of one layer's K/V apart from the token count."""

    heads: int
    d_k: int
    d_v: int


class Policy:
    """Base of all policies. Subclasses are dataclasses whose fields are the hyperparameters."""

    name: ClassVar[str]
    role: ClassVar[str]  # "token", "storage" or "baseline"
    uses_acc: ClassVar[bool] = False  # needs accumulated attention in state.extras["acc"] (see pipeline)

    def bind(self, context: PolicyContext | None) -> None:
        """Load what the policy needs besides its hyperparameters (default: nothing)."""

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
    """Writes the kept K/V of a state as named tensors and reads them back.

    The default works layer by layer through `pack_layer` / `unpack_layer`; part names must not contain
    '.' or ':'. `kv_bytes` is an upper bound of what `pack_layer` writes for T tokens, which byte budgets
    use to find how many tokens fit.
    """

    role = "storage"

    def pack(self, state: State) -> dict[str, Tensor]:
        out = {}
        for layer in range(state.num_layers):
            for part, t in self.pack_layer(state, layer).items():
                out[f"{layer}.{part}"] = t
        return out

    def unpack(self, parts: dict[str, Tensor], tokens: list[int], dims: Dims) -> tuple[list[Tensor], list[Tensor]]:
        ks, vs = [], []
        for layer, t in enumerate(tokens):
            prefix = f"{layer}."
            mine = {name[len(prefix):]: x for name, x in parts.items() if name.startswith(prefix)}
            k, v = self.unpack_layer(layer, mine, t, dims)
            ks.append(k)
            vs.append(v)
        return ks, vs

    def pack_layer(self, state: State, layer: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def unpack_layer(self, layer: int, parts: dict[str, Tensor], tokens: int, dims: Dims) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def kv_bytes(self, tokens: int, dims: Dims) -> int:
        raise NotImplementedError
