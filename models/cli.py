"""`kvrec data`, `kvrec train` and `kvrec eval-model`: registered by the models package."""

from __future__ import annotations

from models import data_cli


def register(sub) -> None:
    data_cli.register(sub)
