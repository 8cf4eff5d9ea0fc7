"""Name -> policy class. Policy modules register themselves on import (`compression.policies`)."""

from __future__ import annotations

from kvrec.compression.base import Policy

POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make `cls` reachable from specs under `cls.name`."""
    if cls.name in POLICIES:
        raise ValueError(f"policy name {cls.name!r} registered twice")
    POLICIES[cls.name] = cls
    return cls


def all_policies() -> dict[str, type[Policy]]:
    import kvrec.compression.policies  # noqa: F401  (registers every policy)

    return POLICIES
