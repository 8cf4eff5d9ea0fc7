"""The spec grammar: `stage(+stage)*`, `stage = name[:key=value(,key=value)*]`.

Examples: `full`, `int8`, `kivi:bits=2,residual=32`, `h2o:budget=256,recent=64`,
`streaming:sink=4,window=252+int8`, `h2o:bytes=65536+int4`. Values are typed by the policy's dataclass
fields. The same canonical string (`Pipeline.spec`: stages in order, the parameters that are set in field
order) names the policy in configs, CLI flags, blobs, metrics and reports; parse(print(p)) == p.
"""

from __future__ import annotations

import dataclasses
import typing

from kvrec.compression.base import Policy, PolicyContext, PolicyError
from kvrec.compression.pipeline import Pipeline
from kvrec.compression.registry import all_policies
from kvrec.compression.selection import TokenPolicy
from kvrec.models.state import State

__all__ = ["PolicyError", "parse_policy", "parse_stage", "describe_policies"]


def parse_policy(spec: str, context: PolicyContext | None = None) -> Pipeline:
    """Parse a spec into a bound pipeline; a bad spec raises PolicyError saying what is valid."""
    text = spec.strip()
    if not text:
        raise PolicyError(f"empty policy spec; policies: {', '.join(sorted(all_policies()))}")
    stages = [parse_stage(part) for part in text.split("+")]
    if any(s.role == "baseline" for s in stages):
        if len(stages) > 1:
            raise PolicyError("recompute keeps no state and cannot be combined with other policies")
        return Pipeline(token=None, storage=all_policies()["full"](), keeps_state=False)
    tokens = [s for s in stages if isinstance(s, TokenPolicy)]
    storages = [s for s in stages if s.role == "storage"]
    if len(tokens) > 1 or len(storages) > 1 or (tokens and stages[0] is not tokens[0]):
        raise PolicyError(
            f"{spec!r}: a pipeline is at most one token policy ({names_of('token')}) followed by at most "
            f"one storage policy ({names_of('storage')})")
    pipeline = Pipeline(token=tokens[0] if tokens else None,
                        storage=storages[0] if storages else all_policies()["full"]())
    pipeline.storage.check_token_stage(pipeline.token)
    if context is not None and context.model is not None:
        check_applies(pipeline, context.model.empty_state())
    for stage in pipeline.stages:
        stage.bind(context)
    return pipeline


def check_applies(pipeline: Pipeline, state: State) -> None:
    """Refuse a pipeline with a stage that cannot run on states like `state`, naming those that can."""
    for stage in pipeline.stages:
        reason = stage.applies_to(state)
        if reason is not None:
            fitting = sorted(name for name, cls in all_policies().items()
                             if cls.role == "baseline" or cls.applies_to(state) is None)
            raise PolicyError(f"{reason}; policies for {state.kind!r} states: {', '.join(fitting)}")


def parse_stage(text: str) -> Policy:
    name, _, params_text = text.strip().partition(":")
    name = name.strip()
    registry = all_policies()
    if name not in registry:
        raise PolicyError(f"unknown policy {name!r}; policies: {', '.join(sorted(registry))}")
    cls = registry[name]
    hints = typing.get_type_hints(cls)
    valid = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in params_text.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if key not in valid or not eq:
            raise PolicyError(f"{name}: bad parameter {item!r}; valid: {describe_params(cls) or 'none'}")
        if key in kwargs:
            raise PolicyError(f"{name}: parameter {key!r} given twice")
        kwargs[key] = convert(name, key, value, hints[key])
    try:
        return cls(**kwargs)
    except PolicyError:
        raise
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"{name}: {exc}; valid: {describe_params(cls)}") from exc


def convert(policy: str, key: str, value: str, hint: object) -> object:
    types = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    target = types[0]
    try:
        if target is int:
            return int(value)
        if target is float:
            return float(value)
    except ValueError:
        raise PolicyError(f"{policy}: {key} must be {target.__name__}, got {value!r}") from None
    return value


def describe_params(cls: type[Policy]) -> str:
    """Each parameter with its type and the value a bare spec gets (after the policy's own defaulting:
    a bare `h2o` keeps 256 tokens although its `budget` field starts as None)."""
    hints = typing.get_type_hints(cls)
    bare = cls()
    out = []
    for f in dataclasses.fields(cls):
        if f.init:
            types = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
            value = getattr(bare, f.name)
            shown = f.metadata.get("none", value) if value is None else value  # what None stands for
            out.append(f"{f.name} ({types[0].__name__}, default {shown})")
    return ", ".join(out)


def names_of(role: str) -> str:
    return ", ".join(sorted(n for n, c in all_policies().items() if c.role == role))


def describe_policies() -> str:
    """One line per policy: name, role, parameters and the start of its docstring."""
    lines = []
    for name, cls in sorted(all_policies().items()):
        doc = " ".join((cls.__doc__ or "").split())
        doc = doc if len(doc) <= 100 else doc[:97] + "..."
        lines.append(f"{name} [{cls.role}] {describe_params(cls) or '-'}: {doc}")
    return "\n".join(lines)
